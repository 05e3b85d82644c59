"""The end-to-end demo meets its targets: int8 within 0.5 points of float, torch's int8 agrees with jquant's."""

from interop import demo


def test_demo_targets(capsys):
    results = demo.run()
    assert results["int_acc"] >= results["float_acc"] - 0.005, results
    assert results["int_vs_fake_agreement"] >= 0.995, results
    assert results["torch_vs_int_agreement"] >= 0.995, results
    sizes = {name: size for name, _, size in results["rows"]}
    assert sizes["int8 (jquant.convert)"] * 3 < sizes["float32"]
