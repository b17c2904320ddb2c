"""The Keras 3 (TensorFlow) backend against the numpy reference, for every routing/squash variant
and both heads; its trainer; and the isolation of the two frameworks."""

import os
import subprocess
import sys

import numpy as np
import pytest

from capsctl.backend import OptimConfig, get_backend
from capsctl.model import reference
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights

from ._helpers import VARIANTS, real_digits, routing_weights

pytestmark = pytest.mark.keras


@pytest.mark.parametrize(("routing", "squash"), VARIANTS)
@pytest.mark.parametrize("height", [28, 56])
def test_capsule_scores_and_trace_match_reference(mnist, routing, squash, height):
    spec = ModelSpec().with_capsule(routing=routing, squash=squash)
    w = routing_weights(spec)
    x = real_digits(mnist, 4, height)
    runner = get_backend("keras").runner(spec, w)
    ref_scores, ref_trace = reference.forward(spec, w, x)
    np.testing.assert_allclose(runner.scores(x, batch_size=3), ref_scores, atol=1e-4)
    lengths, trace = runner.trace(x)
    np.testing.assert_allclose(lengths, ref_scores, atol=1e-4)
    np.testing.assert_allclose(trace.couplings, ref_trace.couplings, atol=1e-4)
    np.testing.assert_allclose(trace.agreement, ref_trace.agreement, atol=1e-4 * max(1.0, np.abs(ref_trace.agreement).max()))
    assert trace.couplings.shape == (4, 3, 10, spec.trunk_grid(height, 28)[0] * 8)
    np.testing.assert_allclose(trace.couplings.sum(axis=2), 1.0, atol=1e-5)
    assert ref_scores.std() > 1e-3  # the comparison is not between constants


def test_routings_override_and_variants_differ(mnist):
    x = real_digits(mnist, 3)
    scores = {}
    for routing in ("su", "sabour", "su-unit"):
        spec = ModelSpec().with_capsule(routing=routing)
        runner = get_backend("keras").runner(spec, routing_weights(spec))
        scores[routing] = runner.scores(x)
        lengths, trace = runner.trace(x, routings=6)
        assert trace.couplings.shape[1] == 6
        np.testing.assert_allclose(lengths, reference.forward(spec, routing_weights(spec), x, routings=6)[0], atol=1e-4)
    assert not np.allclose(scores["su"], scores["sabour"], atol=1e-6)
    assert not np.allclose(scores["su"], scores["su-unit"], atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(head="pool"), ModelSpec().with_capsule(shared=False, num_inputs=64),
     ModelSpec().with_capsule(shared=False, num_inputs=64, routing="sabour", squash="sabour")],
    ids=["pool", "non-shared", "non-shared-sabour"],
)
def test_pool_head_and_non_shared_match_reference(mnist, spec):
    x = real_digits(mnist, 5)
    w = routing_weights(spec)
    want = reference.forward(spec, w, x)[0]
    np.testing.assert_allclose(get_backend("keras").runner(spec, w).scores(x, batch_size=2), want, atol=1e-4)
    assert want.std() > 1e-3


def test_pool_head_takes_any_image_size_and_refuses_trace(mnist):
    spec = ModelSpec(head="pool")
    w = routing_weights(spec)
    x = real_digits(mnist, 2, 56)[:, :, :40]  # 56 x 40
    runner = get_backend("keras").runner(spec, w)
    np.testing.assert_allclose(runner.scores(x), reference.forward(spec, w, x)[0], atol=1e-4)
    with pytest.raises(ValueError, match="pooling head"):
        runner.trace(x)


def test_training_steps_lower_the_loss_and_match_torch(mnist):
    """Same start, same batches: the two trainers' losses, weights and Adam slots agree closely,
    and the slots use the same canonical keys (a checkpoint resumes in either backend)."""
    spec = ModelSpec()
    x, y = mnist.train().images[:32], mnist.train().labels[:32]
    y1 = np.eye(10, dtype=np.float32)[y]
    w0 = init_weights(spec, 0)
    optim = OptimConfig(weight_decay=0.05)  # decoupled decay too (wd=0 is covered by the resume test)
    kt = get_backend("keras").trainer(spec, w0, optim)
    tt = get_backend("torch").trainer(spec, w0, optim)
    assert kt.optimizer_state() == {}
    before = reference.margin_loss(kt.scores(x), y1)
    k_losses = [kt.step(x, y1, 1e-3)[0] for _ in range(3)]
    t_losses = [tt.step(x, y1, 1e-3)[0] for _ in range(3)]
    assert k_losses[0] == pytest.approx(before, rel=1e-4)  # the backend's loss is the contract's
    np.testing.assert_allclose(k_losses, t_losses, rtol=1e-3)
    assert reference.margin_loss(kt.scores(x), y1) < before
    ks, ts = kt.optimizer_state(), tt.optimizer_state()
    assert sorted(ks) == sorted(ts) and ks["step"][0] == 3
    for key in ks:
        assert ks[key].shape == ts[key].shape, key
    kw, tw = kt.weights(), tt.weights()
    for name in kw:
        np.testing.assert_allclose(kw[name], tw[name], atol=2e-4, err_msg=name)


def test_optimizer_state_round_trips_between_trainers(mnist):
    spec = ModelSpec(head="pool")
    x, y = mnist.train().images[:16], mnist.train().labels[:16]
    y1 = np.eye(10, dtype=np.float32)[y]
    a = get_backend("keras").trainer(spec, init_weights(spec, 0), OptimConfig())
    a.step(x, y1, 1e-3)
    a.step(x, y1, 1e-3)
    state = a.optimizer_state()
    b = get_backend("keras").trainer(spec, a.weights(), OptimConfig())
    b.load_optimizer_state(state)
    for key, value in b.optimizer_state().items():
        assert value.tobytes() == state[key].tobytes(), key
    # the next step is then the same step in both
    assert b.step(x, y1, 1e-3) == a.step(x, y1, 1e-3)
    for name, value in b.weights().items():
        assert value.tobytes() == a.weights()[name].tobytes(), name


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    # a fresh process as a user starts it: without the TF_CPP_MIN_LOG_LEVEL this one may have set
    base = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})


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


@pytest.mark.torch
def test_torch_path_never_imports_keras_and_keras_path_pins_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from capsctl.backend import get_backend\n"
        "from capsctl.spec import ModelSpec\nfrom capsctl.weights import init_weights\n"
        "spec = ModelSpec(head='pool')\n"
        "get_backend('torch').runner(spec, init_weights(spec, 0)).scores(np.zeros((1, 28, 28, 1), np.float32))\n"
        "print('TORCH', sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))\n"
        "get_backend('keras').runner(spec, init_weights(spec, 0))\n"
        "import keras; print('KERAS', keras.backend.backend())\n"
    )
    res = _python(code, KERAS_BACKEND="jax")  # a user's setting must not reach capsctl's keras
    assert "TORCH []" in res.stdout, res.stderr
    assert "KERAS tensorflow" in res.stdout, res.stderr
    assert "oneDNN" not in res.stderr  # TensorFlow's start-up banners stay off a CLI's stderr


def test_cli_train_keras_resumes_exactly_and_in_torch(tmp_path, capsys, mnist_dir):
    """Two Keras epochs straight == one epoch, stop, --resume (bit for bit); and the same stopped
    run resumed with --backend torch lands on the same weights up to float rounding (the
    checkpoint's Adam slots are canonical, and both backends take the same Adam step)."""
    import shutil
    from dataclasses import replace

    from capsctl.model.weights import load_model
    from capsctl.training.run_folder import load_checkpoint, save_checkpoint

    from .conftest import run_cli

    args = ["train", "--backend", "keras", "--data-dir", mnist_dir, "--limit", "192", "--batch-size", "64", "-q",
            "--schedule", "constant", "--test-limit", "100"]
    code, _, err = run_cli([*args, "--epochs", "2", "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--epochs", "1", "--out", tmp_path / "split"], capsys)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "split")
    assert ck.optimizer["step"][0] == 3 and ck.config.backend == "keras"
    save_checkpoint(tmp_path / "split", replace(ck, config=replace(ck.config, epochs=2)))
    shutil.copytree(tmp_path / "split", tmp_path / "in-torch")
    for run, backend in (("split", "keras"), ("in-torch", "torch")):
        code, _, err = run_cli(["train", "--resume", tmp_path / run, "--backend", backend, "-q", "--data-dir", mnist_dir,
                                "--test-limit", "100"], capsys)
        assert code == 0, err
    _, straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, resumed = load_model(tmp_path / "split" / "model.safetensors")
    _, in_torch = load_model(tmp_path / "in-torch" / "model.safetensors")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
        np.testing.assert_allclose(in_torch[k], straight[k], atol=1e-4, err_msg=k)
        assert not np.array_equal(straight[k], ck.weights[k]), k  # the second epoch really trained
    assert load_checkpoint(tmp_path / "in-torch").optimizer["step"][0] == 6
