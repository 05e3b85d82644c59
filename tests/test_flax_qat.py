"""QAT in an ordinary Flax + optax loop: schedule phases, calibration, orbax resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jquant
from jquant.examples.digits import DigitsCNN, accuracy, batches, cross_entropy, load_digits_split
from jquant.flax import QATSchedule, QATTrainState, calibrate, restore_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def _setup(digits, schedule):
    x_train = digits[0]
    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(0), x_train[:2])

    def train_fn(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    qf = jquant.quantize(train_fn, jquant.presets.qat_int8())
    state = QATTrainState.create_qat(
        qfn=qf, params=variables, tx=optax.adam(3e-3), example_args=(x_train[:32],), schedule=schedule
    )
    return model, qf, state


def _train_step(state, xb, yb):
    def loss_fn(params):
        (logits, updates), qstate = state.scheduled_apply(params, xb)
        return cross_entropy(logits, yb), (updates, qstate)

    (_, (updates, qstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # batch statistics are not trained: drop their (zero) gradients and take the new running stats
    grads = {"params": grads["params"], "batch_stats": jax.tree.map(jnp.zeros_like, grads["batch_stats"])}
    state = state.apply_gradients(grads=grads, qstate=qstate)
    return state.replace(params={"params": state.params["params"], "batch_stats": updates["batch_stats"]})


train_step = jax.jit(_train_step)

# One schedule for the schedule and resume tests: they share the compiled train step (same static qf).
PHASES = QATSchedule(fake_quant_start=2, observer_freeze=4)


@pytest.fixture(scope="module")
def phased(digits):
    return _setup(digits, PHASES)


def test_schedule_phases_follow_the_step(digits, phased):
    x_train, y_train = digits[0][:64], digits[1][:64]
    _, qf, state = phased
    float_out, _ = qf.apply(state.qstate, state.params, x_train, mode="calibrate")
    (out0, _), qstate0 = state.scheduled_apply(state.params, x_train)
    assert np.array_equal(np.asarray(out0), np.asarray(float_out[0])), "before fake_quant_start: float forward"
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), qstate0, state.qstate)))
    for _ in range(4):
        state = train_step(state, x_train, y_train)
    assert int(state.step) == 4
    (_, _), qstate_frozen = state.scheduled_apply(state.params, x_train)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), qstate_frozen, state.qstate)
    assert all(jax.tree.leaves(same)), "after observer_freeze the qstate no longer changes"
    (out_frozen, _), _ = state.scheduled_apply(state.params, x_train)
    (out_eval, _), _ = qf.apply(state.qstate, state.params, x_train, mode="eval")
    assert np.array_equal(np.asarray(out_frozen), np.asarray(out_eval))


def test_qat_reaches_float_accuracy(digits):
    x_train, y_train, x_test, y_test = digits
    model, qf, state = _setup(digits, QATSchedule(fake_quant_start=20, observer_freeze=150))
    for epoch in range(6):
        for xb, yb in batches(x_train, y_train, 64, epoch):
            state = train_step(state, xb, yb)
    eval_qf = jquant.quantize(lambda v, x: model.apply(v, x), jquant.presets.qat_int8())
    logits, _ = eval_qf.apply(state.qstate, state.params, x_test, mode="eval")
    assert accuracy(logits, y_test) > 0.95


def test_calibrate_loop_updates_observers(digits):
    x_train = digits[0]
    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(0), x_train[:2])
    qf = jquant.quantize(lambda v, x: model.apply(v, x))
    qstate = qf.init(variables, x_train[:32])
    calibrated = calibrate(qf, qstate, ((variables, xb) for xb, _ in batches(x_train, digits[1], 32, 0)), progress=True)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), calibrated, qstate)
    assert any(jax.tree.leaves(changed))
    with pytest.raises(TypeError, match="batches: each item must be a tuple"):
        calibrate(qf, qstate, [x_train[:4]], progress=False)


def test_orbax_checkpoint_resumes_bit_exactly(digits, phased, tmp_path):
    x_train, y_train = digits[0], digits[1]
    data = list(batches(x_train, y_train, 64, 0))[:6]  # steps 0-1 calibrate, 2-3 fake quant, 4-5 frozen
    _, _, fresh = phased
    state = fresh
    for xb, yb in data[:3]:
        state = train_step(state, xb, yb)
    save_checkpoint(tmp_path / "ckpt", state)
    straight = state
    for xb, yb in data[3:]:
        straight = train_step(straight, xb, yb)
    # The template is the untrained state (step 0, initial params and qstate): everything comes from the file.
    resumed = restore_checkpoint(tmp_path / "ckpt", fresh)
    assert int(resumed.step) == 3
    for xb, yb in data[3:]:
        resumed = train_step(resumed, xb, yb)
    for name in ("params", "qstate", "opt_state", "step"):
        equal = jax.tree.map(
            lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), getattr(straight, name), getattr(resumed, name)
        )
        assert all(jax.tree.leaves(equal)), f"{name} differs after resuming"
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(tmp_path / "ckpt", state)
