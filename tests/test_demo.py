"""The end-to-end demo meets its targets: int8 within 0.5 points of float, torch's int8 agrees with jquant's.
It prints no warnings of its own (torch's expected deprecation notices are silenced at the call site) and ends
by saying where its code is and what to try next."""

import warnings

from interop import demo


def test_demo_targets(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = demo.main()
    out = capsys.readouterr().out
    assert results["int_acc"] >= results["float_acc"] - 0.005, results
    assert results["int_vs_fake_agreement"] >= 0.995, results
    assert results["torch_vs_int_agreement"] >= 0.995, results
    sizes = {name: size for name, _, size in results["rows"]}
    assert sizes["int8 (jquant.convert)"] * 3 < sizes["float32"]
    shown = [f"{w.category.__name__}: {str(w.message).splitlines()[0]} ({w.filename})" for w in caught]
    assert not [w for w in shown if "torch.ao.quantization" in w or "demo.py" in w], shown
    assert "the code: interop/demo.py" in out
    assert out.rstrip().splitlines()[-1].startswith("  - torch checkpoints: jquant-convert --help")
    print("\n".join(shown))
