"""Every backend against the numpy reference and against the Backend protocol's contract: scores and
routing traces for every routing/squash variant and both heads, the trainer (loss, AdamW step,
optimiser state), resuming from a checkpoint, and the isolation of the frameworks.

Each test takes the `backend` fixture (tests/conftest.py) and so runs once per backend, marked
`torch` or `keras`. Comparisons between backends live in tests/test_parity.py.

Tolerance policy: float32 forward passes are compared with the float64 reference at 1e-4 absolute
(scores and couplings lie in [0, 1]; agreements at 1e-4 of their own scale, at least 1e-4). A
backend's optimiser step is compared with the AdamW formula evaluated on that backend's own
gradient and slots, so it is exact to float32 rounding on any CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from capsctl.backend import OptimConfig
from capsctl.model import reference
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights, load_model

from ._helpers import VARIANTS, real_digits, rel_diff, routing_weights, run_cli, snapshot

ATOL = 1e-4  # float32 backend against the float64 reference, on values of order 1


def _assert_agreement_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=ATOL * max(1.0, float(np.abs(want).max())))


def _batch(mnist, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist.train().images[:n], mnist.train().labels[:n]
    return x, np.eye(10, dtype=np.float32)[y]


# -- inference against the reference -------------------------------------------------------------------


@pytest.mark.parametrize(("routing", "squash"), VARIANTS)
@pytest.mark.parametrize("height", [28, 56])
def test_capsule_scores_and_trace_match_reference(backend, mnist, routing, squash, height):
    spec = ModelSpec().with_capsule(routing=routing, squash=squash)
    w = routing_weights(spec)
    x = real_digits(mnist, 4, height)
    runner = backend.runner(spec, w)
    ref_scores, ref_trace = reference.forward(spec, w, x)
    assert ref_trace is not None
    assert ref_scores.std() > 1e-3  # the comparison is not between constants
    np.testing.assert_allclose(runner.scores(x, batch_size=3), ref_scores, atol=ATOL)
    lengths, trace = runner.trace(x)
    np.testing.assert_allclose(lengths, ref_scores, atol=ATOL)
    np.testing.assert_allclose(trace.couplings, ref_trace.couplings, atol=ATOL)
    _assert_agreement_close(trace.agreement, ref_trace.agreement)
    assert trace.couplings.shape == (4, 3, 10, spec.trunk_grid(height, 28)[0] * 8)
    np.testing.assert_allclose(trace.couplings.sum(axis=2), 1.0, atol=1e-5)


def test_routings_override_and_variants_differ(backend, mnist):
    x = real_digits(mnist, 3)
    scores = {}
    for routing in ("su", "sabour", "su-unit"):
        spec = ModelSpec().with_capsule(routing=routing)
        w = routing_weights(spec)
        runner = backend.runner(spec, w)
        scores[routing] = runner.scores(x)
        lengths, trace = runner.trace(x, routings=6)
        assert trace.couplings.shape[1] == 6
        np.testing.assert_allclose(lengths, reference.forward(spec, w, x, routings=6)[0], atol=ATOL)
    # the three update rules are really different computations
    assert not np.allclose(scores["su"], scores["sabour"], atol=1e-6)
    assert not np.allclose(scores["su"], scores["su-unit"], atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(head="pool"), ModelSpec().with_capsule(shared=False, num_inputs=64),
     ModelSpec().with_capsule(shared=False, num_inputs=64, routing="sabour", squash="sabour")],
    ids=["pool", "non-shared", "non-shared-sabour"],
)
def test_pool_head_and_non_shared_match_reference(backend, mnist, spec):
    x = real_digits(mnist, 5)
    w = routing_weights(spec)
    want = reference.forward(spec, w, x)[0]
    assert want.std() > 1e-3
    runner = backend.runner(spec, w)
    np.testing.assert_allclose(runner.scores(x), want, atol=ATOL)  # one batch
    np.testing.assert_allclose(runner.scores(x, batch_size=2), want, atol=ATOL)  # a short last batch


def test_pool_head_takes_any_image_size_and_refuses_trace(backend, mnist):
    spec = ModelSpec(head="pool")
    w = routing_weights(spec)
    x = real_digits(mnist, 2, 56)[:, :, :40]  # 56 x 40
    runner = backend.runner(spec, w)
    np.testing.assert_allclose(runner.scores(x), reference.forward(spec, w, x)[0], atol=ATOL)
    with pytest.raises(ValueError, match="pooling head"):
        runner.trace(x)


# -- the trainer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("trunk", [[], [{"type": "avgpool", "size": 2}]], ids=["no layer", "pool only"])
def test_a_trunk_without_convolutions_trains(backend, mnist, trunk):
    # (torch's trainer took its device from the first conv's weight: a KeyError and a traceback)
    spec = ModelSpec.from_json(json.dumps({"trunk": trunk, "capsule": {"dim": 4, "routings": 2}}))
    x, y1 = _batch(mnist, 16)
    trainer = backend.trainer(spec, init_weights(spec, 0), OptimConfig())
    loss, correct = trainer.step(x, y1, 1e-3)
    assert np.isfinite(loss) and 0 <= correct <= 16
    np.testing.assert_allclose(trainer.scores(x), reference.forward(spec, trainer.weights(), x)[0], atol=ATOL)


def test_training_steps_lower_the_margin_loss(backend, mnist):
    spec = ModelSpec()
    x, y1 = _batch(mnist, 64)
    trainer = backend.trainer(spec, init_weights(spec, 0), OptimConfig())
    assert trainer.optimizer_state() == {}  # no slots before the first step
    before = reference.margin_loss(trainer.scores(x), y1)
    losses = [trainer.step(x, y1, 1e-3)[0] for _ in range(5)]
    after = reference.margin_loss(trainer.scores(x), y1)
    assert losses[0] == pytest.approx(before, rel=1e-4)  # the backend's loss is the contract's margin loss
    assert after < before
    state = trainer.optimizer_state()
    assert state["step"][0] == 5
    # canonical keys and shapes, so a checkpoint resumes in any backend
    weights = trainer.weights()
    assert set(state) == {f"{slot}.{name}" for slot in ("m", "v") for name in weights} | {"step"}
    for name, value in weights.items():
        assert state[f"m.{name}"].shape == state[f"v.{name}"].shape == value.shape, name
    assert state["m.head.capsule.kernel"].shape == (128, 160)
    assert state["m.trunk.0.kernel"].shape == (3, 3, 1, 64)


def test_adamw_steps_follow_the_formula(backend, mnist):
    """Each step is AdamW (torch's form: epsilon after the bias correction, decoupled decay) applied
    to the gradient the backend computed. The gradient is read back from the first moment
    (m_t = beta1 m_t-1 + (1 - beta1) g_t), so the check needs no second framework and is exact to
    float32 rounding on any CPU; it sees a wrong learning rate, betas, epsilon or bias correction,
    and a missing weight decay. (That the gradients themselves agree is tests/test_parity.py's job.)"""
    spec = ModelSpec()
    x, y1 = _batch(mnist, 32)
    optim = OptimConfig(weight_decay=0.05)
    b1, b2, eps, wd, lr = optim.beta1, optim.beta2, optim.eps, optim.weight_decay, 1e-3
    w0 = init_weights(spec, 0)
    trainer = backend.trainer(spec, w0, optim)
    # float32 rounding of the step: measured <= 2.2e-5 lr
    atol = 2e-4 * lr
    w_prev = {k: v.astype(np.float64) for k, v in w0.items()}
    m_prev = {k: np.zeros_like(v) for k, v in w_prev.items()}
    v_prev = {k: np.zeros_like(v) for k, v in w_prev.items()}
    largest_decay = 0.0
    for t in (1, 2, 3):
        trainer.step(x, y1, lr)
        w = {k: v.astype(np.float64) for k, v in snapshot(trainer.weights()).items()}
        state = {k: v.astype(np.float64) for k, v in snapshot(trainer.optimizer_state()).items()}
        assert state["step"][0] == t
        for name in w0:
            m, v = state[f"m.{name}"], state[f"v.{name}"]
            g = (m - b1 * m_prev[name]) / (1 - b1)  # this step's gradient
            g2 = (v - b2 * v_prev[name]) / (1 - b2)  # its square, as the second moment saw it
            assert np.abs(g).max() > 0, (t, name)
            assert rel_diff(g2, g * g) < 1e-3, (t, name)  # both moments saw the same gradient
            if t == 1:  # v_1 = (1 - beta2) g^2 exactly: Keras' float32 (1 - beta2) was 1.3e-5 off
                assert rel_diff(g2, g * g) < 2e-6, (t, name)
            update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            want = w_prev[name] * (1 - lr * wd) - lr * update
            np.testing.assert_allclose(w[name], want, rtol=0, atol=atol, err_msg=f"step {t}, {name}")
            largest_decay = max(largest_decay, float(np.abs(lr * wd * w_prev[name]).max()))
        w_prev, m_prev, v_prev = w, {k: state[f"m.{k}"] for k in w0}, {k: state[f"v.{k}"] for k in w0}
    assert largest_decay > 10 * atol  # the tolerance is fine enough to see the weight decay


def test_optimizer_state_round_trips_between_trainers(backend, mnist):
    spec = ModelSpec(head="pool")
    x, y1 = _batch(mnist, 16)
    a = backend.trainer(spec, init_weights(spec, 0), OptimConfig())
    a.step(x, y1, 1e-3)
    a.step(x, y1, 1e-3)
    state = snapshot(a.optimizer_state())
    b = backend.trainer(spec, snapshot(a.weights()), OptimConfig())
    b.load_optimizer_state(snapshot(state))
    got = b.optimizer_state()
    assert sorted(got) == sorted(state)
    for key, value in got.items():
        assert value.tobytes() == state[key].tobytes(), key
    # the next step is then the same step in both
    assert b.step(x, y1, 1e-3) == a.step(x, y1, 1e-3)
    for name, value in b.weights().items():
        assert value.tobytes() == a.weights()[name].tobytes(), name


@pytest.mark.parametrize("arch", ["seed", "efficient"])
def test_cli_train_resumes_exactly(backend, tmp_path, capsys, mnist_dir, arch):
    """Two epochs straight == one epoch, stop, --resume: bit-identical weights (efficient: with batch
    norms, whose running statistics are weights without optimiser slots).

    The 'stopped' run is made by training one epoch and raising the stored epoch count to two,
    which is what a run killed after its first epoch's checkpoint looks like. The constant
    schedule makes the one-epoch run's steps identical to the first epoch of the two-epoch run.
    """
    from capsctl.training.run_folder import load_checkpoint, save_checkpoint

    args = ["train", "--backend", backend.name, "--data-dir", mnist_dir, "--limit", "192",
            "--batch-size", "64", "-q", "--schedule", "constant", "--test-limit", "100", "--arch", arch]
    code, _, err = run_cli([*args, "--epochs", "2", "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--epochs", "1", "--out", tmp_path / "split"], capsys)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "split")
    assert (ck.epoch, ck.step) == (1, 0) and ck.optimizer["step"][0] == 3
    assert ck.config.backend == backend.name
    save_checkpoint(tmp_path / "split", replace(ck, config=replace(ck.config, epochs=2)))
    code, _, err = run_cli(["train", "--resume", tmp_path / "split", "-q", "--data-dir", mnist_dir,
                            "--test-limit", "100"], capsys)
    assert code == 0, err
    assert "resuming" in err
    _, straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, resumed = load_model(tmp_path / "split" / "model.safetensors")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
        assert not np.array_equal(straight[k], ck.weights[k]), k  # the second epoch really trained
    assert load_checkpoint(tmp_path / "split").optimizer["step"][0] == 6
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


# -- framework isolation --------------------------------------------------------------------------------

FRAMEWORKS = {"torch": ["torch"], "keras": ["keras", "tensorflow"]}


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    # a fresh process as a user starts it: without the TF_CPP_MIN_LOG_LEVEL this one may have set
    base = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env},
                          timeout=300)


def test_a_backend_imports_only_its_own_framework(backend):
    code = (
        "import sys, numpy as np\n"
        "from capsctl.backend import get_backend\n"
        "from capsctl.model.spec import ModelSpec\n"
        "from capsctl.model.weights import init_weights\n"
        "spec = ModelSpec(head='pool')\n"
        f"runner = get_backend({backend.name!r}).runner(spec, init_weights(spec, 0))\n"
        "runner.scores(np.zeros((1, 28, 28, 1), np.float32))\n"
        "print('LOADED', sorted(m for m in ('torch', 'keras', 'tensorflow', 'jax') if m in sys.modules))\n"
        "if 'keras' in sys.modules:\n    import keras; print('KERAS', keras.backend.backend())\n"
    )
    res = _python(code, KERAS_BACKEND="jax")  # a user's setting must not reach capsctl's keras
    assert res.returncode == 0, res.stderr
    assert f"LOADED {sorted(FRAMEWORKS[backend.name])}" in res.stdout, (res.stdout, res.stderr)
    if backend.name == "keras":
        assert "KERAS tensorflow" in res.stdout, res.stderr
        assert "oneDNN" not in res.stderr  # TensorFlow's start-up banners stay off a CLI's stderr


@pytest.mark.keras
def test_keras_already_on_another_backend_is_refused():
    # a stand-in for keras imported earlier on another backend (jax is not installed here)
    code = (
        "import sys, types\n"
        "sys.modules['keras'] = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: 'jax'))\n"
        "from capsctl.errors import CapsctlError\n"
        "try:\n    import capsctl_keras._env\nexcept CapsctlError as e:\n    print('REFUSED', e)\n"
        "print('TF', 'tensorflow' in sys.modules)\n"
    )
    res = _python(code)
    assert "REFUSED keras was already imported with the 'jax' backend" in res.stdout, res.stderr
    assert "TF False" in res.stdout

