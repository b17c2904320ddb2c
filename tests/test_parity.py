"""Cross-backend parity.

Inference: a model trained a few hundred steps with one framework, run by the other, gives the same
scores (1e-4), the same eval-pairs counts and the same routing, on real MNIST test digits and 56x28
composites; both agree with the numpy reference.

Training: from the same weights and batches the two trainers compute the same gradients and take
the same AdamW steps, and a checkpoint written by one resumes in the other. "The same" is stated so
that it holds on any CPU (see test_training_steps_match_across_backends).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from capsctl.backend import OptimConfig, get_backend
from capsctl.choices import ARCHS
from capsctl.data.composites import make_composites, score_sets, single_accuracy
from capsctl.model import reference
from capsctl.model.presets import design_size
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights, load_model
from capsctl.model.weights import trained as is_trained
from capsctl.training.config import TrainConfig
from capsctl.training.loop import train

from ._helpers import BACKENDS, VARIANTS, on_canvas, real_digits, rel_diff, routing_weights, run_cli, snapshot

pytestmark = [pytest.mark.torch, pytest.mark.keras]

NAMES = ("torch", "keras")
OTHER = {"torch": "keras", "keras": "torch"}
ATOL = 1e-4


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request, mnist, tmp_path_factory):
    """(backend that trained it, model path): 200 steps of batch 8 on real digits (~13 s)."""
    name = request.param
    run = tmp_path_factory.mktemp(f"parity-{name}")
    cfg = TrainConfig(backend=name, epochs=1, batch_size=8, lr=3e-3, schedule="onecycle", shift=0, limit=1600)
    train(get_backend(name), ModelSpec(), cfg, mnist.train(), None, run, show_progress=False)
    return name, run / "model.safetensors"


@pytest.fixture(scope="module")
def composites(mnist):
    test = mnist.test()
    return make_composites(test.images, test.labels, digits=2, layout="vertical", seed=0, limit=400)


def _both_scores(model, images):
    spec, weights = load_model(model)
    return {name: get_backend(name).runner(spec, weights).scores(images, batch_size=128) for name in NAMES}


def _kth_is_ambiguous(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows whose top-k set or confidence could flip under a 1e-4 perturbation."""
    s = -np.sort(-scores, axis=1)
    return (np.abs(s[:, k - 1] - s[:, k]) <= 2 * ATOL) | (np.abs(s[:, k - 1] - 0.5) <= ATOL)


def _assert_same_pairs(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> None:
    ra, rb = score_sets(a, labels), score_sets(b, labels)
    if ra == rb:
        return
    k = labels.shape[1]
    # any difference must come from composites whose decision sits within 1e-4 of a tie or of 0.5
    def verdicts(s):
        top = np.sort(np.argsort(-s, axis=1, kind="stable")[:, :k], axis=1)
        ok = np.all(top == np.sort(labels, axis=1), axis=1)
        kth = -np.sort(-s, axis=1)[:, k - 1]
        return ok, ok & (kth > 0.5)

    (oka, ca), (okb, cb) = verdicts(a), verdicts(b)
    differ = (oka != okb) | (ca != cb)
    assert np.all(_kth_is_ambiguous(a, k)[differ] | _kth_is_ambiguous(b, k)[differ]), (ra, rb)


def _assert_same_predictions(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> None:
    """Scores within ATOL of each other predict the same class wherever the top two are more than
    2 ATOL apart; a closer call may go either way under float rounding, and only those may change
    the accuracy."""
    top2 = -np.sort(-a, axis=1)[:, :2]
    close = top2[:, 0] - top2[:, 1] <= 2 * ATOL
    np.testing.assert_array_equal(a.argmax(1)[~close], b.argmax(1)[~close])
    assert abs(single_accuracy(a, labels) - single_accuracy(b, labels)) <= close.mean()


def test_scores_agree_on_real_test_digits(trained, mnist):
    _, model = trained
    test = mnist.test()
    x, y = test.images[:500], test.labels[:500]
    got = _both_scores(model, x)
    assert np.abs(got["torch"] - got["keras"]).max() < ATOL
    _assert_same_predictions(got["torch"], got["keras"], y)
    assert single_accuracy(got["torch"], y) > 0.5  # a trained model (~75%), so the agreement means something
    spec, weights = load_model(model)
    want = reference.forward(spec, weights, x[:24])[0]
    for name in ("torch", "keras"):
        np.testing.assert_allclose(got[name][:24], want, atol=ATOL, err_msg=name)


def test_eval_pairs_agree_on_56x28_composites(trained, composites):
    _, model = trained
    assert composites.images.shape[1:] == (56, 28, 1)
    got = _both_scores(model, composites.images)
    assert np.abs(got["torch"] - got["keras"]).max() < ATOL
    _assert_same_pairs(got["torch"], got["keras"], composites.labels)
    assert score_sets(got["torch"], composites.labels)["accuracy"] > 0.06  # well above chance (1/45)
    spec, weights = load_model(model)
    want = reference.forward(spec, weights, composites.images[:12])[0]
    for name in ("torch", "keras"):
        np.testing.assert_allclose(got[name][:12], want, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("which", ["digit", "composite"])
def test_routing_coefficients_of_one_image_agree(trained, mnist, composites, which):
    _, model = trained
    x = mnist.test().images[:1] if which == "digit" else composites.images[:1]
    spec, weights = load_model(model)
    traces = {name: get_backend(name).runner(spec, weights).trace(x) for name in NAMES}
    _, ref = reference.forward(spec, weights, x)
    assert ref is not None
    for name, (lengths, trace) in traces.items():
        np.testing.assert_allclose(trace.couplings, ref.couplings, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(lengths, reference.forward(spec, weights, x)[0], atol=ATOL, err_msg=name)
    np.testing.assert_allclose(traces["torch"][1].couplings, traces["keras"][1].couplings, atol=ATOL)
    assert traces["torch"][1].couplings.std() > 1e-4  # routing really moved away from uniform


def test_cli_eval_pairs_with_the_other_backend(trained, mnist, mnist_dir, capsys):
    """The README flow: train with one framework, eval-pairs with the other."""
    trainer_name, model = trained
    results = {}
    for name in (trainer_name, OTHER[trainer_name]):
        code, out, err = run_cli(
            ["eval-pairs", model, "--backend", name, "--data-dir", mnist_dir, "--limit", "300", "--json"],
            capsys,
        )
        assert code == 0, err
        results[name] = json.loads(out)
    a, b = results.values()
    assert a["pairs"] == b["pairs"] == 300
    if a != b:  # then the scores must explain it (checked in detail above); recompute here
        comp = make_composites(mnist.test().images, mnist.test().labels, limit=300)
        got = _both_scores(model, comp.images)
        _assert_same_pairs(got["torch"], got["keras"], comp.labels)


# -- training ------------------------------------------------------------------------------------------------
#
# Adam divides by sqrt(v): at step 1 an element moves by lr * g / (|g| + eps), i.e. by +-lr whatever the
# size of g. Where the gradient is ~0 its sign is float noise (another summation order, another CPU's
# kernels), so such an element moves by +-lr in either framework: comparing all weights after training
# with an absolute tolerance is not a sound test (it failed on an AVX2-only Zen 3 machine: 6 of 36,864
# elements off by 3e-4). What is compared instead:
#   - the gradients, through Adam's slots (m_1 = (1 - beta1) g, v_1 = (1 - beta2) g^2), relative to
#     their size;
#   - the first update element by element, but only where |g| is well above float noise;
#   - the losses, and the total update of several steps relative to its own size.
# Each backend's step is also checked against the AdamW formula on its own numbers (test_backend.py).

GRAD_RTOL = 5e-3  # |g_keras - g_torch| / |g_torch| per tensor (measured <= 2.3e-4)
SIGNIFICANT = 1e-2  # an element's gradient counts when |g| >= this much of the tensor's largest |g| ...
SIGNIFICANT_EPS = 1e3  # ... and >= this many Adam epsilons (so |g| / (|g| + eps) is ~1 in both)
UPDATE_ATOL = 1e-2  # the first update of those elements, in units of lr (measured <= 1.2e-4)
LATER_RTOL = 2e-2  # slots after several steps; the weights have drifted by the noisy elements (measured 2e-3)
TOTAL_RTOL = 0.1  # the total update of several steps, relative to its size (measured 1.1e-2)


def _train(trainer, x: np.ndarray, y1: np.ndarray, steps: int, lr: float) -> tuple[list[float], list, list]:
    losses, weights, states = [], [], []
    for _ in range(steps):
        losses.append(trainer.step(x, y1, lr)[0])
        weights.append(snapshot(trainer.weights()))
        states.append(snapshot(trainer.optimizer_state()))
    return losses, weights, states


def _assert_same_slots(a: dict, b: dict, names, rtol: float, note: str) -> None:
    assert sorted(a) == sorted(b), note
    assert a["step"][0] == b["step"][0], note
    for name in names:
        for slot in ("m", "v"):
            key = f"{slot}.{name}"
            assert a[key].shape == b[key].shape, (note, key)
            assert rel_diff(a[key], b[key]) < rtol, (note, key, rel_diff(a[key], b[key]))


def _assert_same_total_update(start: dict, a: dict, b: dict, note: str) -> None:
    for name in start:
        da, db = a[name] - start[name], b[name] - start[name]
        assert np.abs(db).max() > 0, (note, name)
        assert rel_diff(da, db) < TOTAL_RTOL, (note, name, rel_diff(da, db))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_match_across_backends(mnist, arch):
    """Same start, same batch: the two trainers compute the same gradients and take the same AdamW
    steps (with decoupled decay), and their slots use the same canonical keys; on every preset (batch
    norms included: the same running statistics after the step)."""
    spec = _filled(arch)
    x, y = on_canvas(mnist.train().images[:32], design_size(arch)), mnist.train().labels[:32]
    y1 = np.eye(10, dtype=np.float32)[y]
    everything = init_weights(spec, 0)
    w0 = {name: a for name, a in everything.items() if is_trained(name)}
    optim, lr = OptimConfig(weight_decay=0.05), 1e-3
    run = {name: _train(get_backend(name).trainer(spec, everything, optim), x, y1, 3, lr) for name in NAMES}
    (t_losses, t_weights, t_states), (k_losses, k_weights, k_states) = run["torch"], run["keras"]

    assert k_losses[0] == pytest.approx(t_losses[0], rel=1e-5)  # the same forward pass from the same weights
    np.testing.assert_allclose(k_losses, t_losses, rtol=1e-3)
    assert t_losses[2] < t_losses[0]

    # step 1: the same gradient, and the same update wherever the gradient is not float noise
    if arch != "seed":
        # The other presets start with tiny gradients (capsules squashed twice from Glorot scale; conv
        # biases whose gradient a batch norm nearly cancels): many elements are within a few Adam epsilons,
        # where float noise decides the update. Their gradients are compared per tensor, looser.
        _assert_same_slots(k_states[0], t_states[0], w0, LATER_RTOL, "step 1")
    else:
        _assert_same_slots(k_states[0], t_states[0], w0, GRAD_RTOL, "step 1")
        for name in w0:
            g = np.abs(t_states[0][f"m.{name}"]) / (1 - optim.beta1)
            significant = g >= max(SIGNIFICANT * g.max(), SIGNIFICANT_EPS * optim.eps)
            assert significant.mean() > 0.25, name  # the element-wise check covers much of every tensor
            dk, dt = k_weights[0][name] - w0[name], t_weights[0][name] - w0[name]
            np.testing.assert_allclose(dk[significant], dt[significant], rtol=0, atol=UPDATE_ATOL * lr,
                                       err_msg=name)

    # the running statistics of step 1's batch (the forward pass from the same weights)
    for name in set(everything) - set(w0):
        np.testing.assert_allclose(k_weights[0][name], t_weights[0][name], rtol=1e-4, err_msg=name)

    # three steps: the slots and the total update agree relative to their size (the seed's model; on the
    # others the near-epsilon elements of steps 1 and 2 have already moved the weights apart by then)
    if arch == "seed":
        _assert_same_slots(k_states[2], t_states[2], w0, LATER_RTOL, "step 3")
    assert k_states[2]["step"][0] == 3
    _assert_same_total_update(w0, k_weights[2], t_weights[2], "3 steps")


def _filled(arch: str) -> ModelSpec:
    """The preset as `capsctl train` completes it for its design size (28x28 digits, or 36x36)."""
    from capsctl.model.presets import for_images

    return for_images(arch)


@pytest.mark.parametrize("first", ["torch", "keras"])
def test_optimizer_state_moves_between_backends(mnist, first):
    """Three steps in one backend, then three more either in the same trainer or in a trainer of the
    other backend built from the first one's weights and slots: the same training."""
    spec = ModelSpec()
    x, y = mnist.train().images[32:64], mnist.train().labels[32:64]
    y1 = np.eye(10, dtype=np.float32)[y]
    optim, lr = OptimConfig(), 1e-3
    a = get_backend(first).trainer(spec, init_weights(spec, 1), optim)
    _train(a, x, y1, 3, lr)
    w3, state = snapshot(a.weights()), snapshot(a.optimizer_state())
    b = get_backend(OTHER[first]).trainer(spec, snapshot(w3), optim)
    b.load_optimizer_state(snapshot(state))
    _assert_same_slots(snapshot(b.optimizer_state()), state, w3, 1e-6, "loaded")
    a_losses, a_weights, a_states = _train(a, x, y1, 3, lr)
    b_losses, b_weights, b_states = _train(b, x, y1, 3, lr)
    np.testing.assert_allclose(b_losses, a_losses, rtol=1e-3)
    _assert_same_slots(b_states[2], a_states[2], w3, LATER_RTOL, "steps 4-6")
    assert b_states[2]["step"][0] == 6  # the step count (Adam's bias correction) came along
    _assert_same_total_update(w3, b_weights[2], a_weights[2], "steps 4-6")


def test_cli_checkpoint_from_keras_resumes_in_torch(tmp_path, capsys, mnist_dir):
    """A Keras run stopped after one epoch and resumed with --backend torch lands where the Keras
    run lands (the checkpoint's Adam slots are canonical, and both backends take the same Adam step),
    in the sense above: the second epoch's update and the slots agree relative to their size."""
    import shutil
    from dataclasses import replace

    from capsctl.training.run_folder import load_checkpoint, save_checkpoint

    args = ["train", "--backend", "keras", "--data-dir", mnist_dir, "--limit", "192", "--batch-size", "64",
            "-q", "--schedule", "constant", "--test-limit", "100"]
    code, _, err = run_cli([*args, "--epochs", "2", "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--epochs", "1", "--out", tmp_path / "split"], capsys)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "split")
    assert ck.optimizer["step"][0] == 3 and ck.config.backend == "keras"
    save_checkpoint(tmp_path / "split", replace(ck, config=replace(ck.config, epochs=2)))
    shutil.copytree(tmp_path / "split", tmp_path / "in-torch")
    code, _, err = run_cli(["train", "--resume", tmp_path / "in-torch", "--backend", "torch", "-q",
                            "--data-dir", mnist_dir, "--test-limit", "100"], capsys)
    assert code == 0, err
    _, straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, in_torch = load_model(tmp_path / "in-torch" / "model.safetensors")
    _assert_same_total_update(ck.weights, in_torch, straight, "epoch 2 in torch")
    done = load_checkpoint(tmp_path / "in-torch")
    assert done.config.backend == "torch"
    _assert_same_slots(done.optimizer, load_checkpoint(tmp_path / "straight").optimizer, straight, LATER_RTOL,
                       "epoch 2 in torch")
    assert done.optimizer["step"][0] == 6


# -- the reconstruction decoder ------------------------------------------------------------------------

@pytest.mark.parametrize("routing, squash", VARIANTS)
def test_decoder_models_agree_with_reference(routing, squash, mnist):
    """Decoder models: both backends give the numpy reference's scores and reconstructions (1e-4), on
    every routing × squash, from each image's top capsule and from a class that is not its top one."""
    from capsctl.model.spec import DecoderSpec

    spec = ModelSpec().with_capsule(routing=routing, squash=squash)
    spec = spec.replace(decoder=DecoderSpec(hidden=(64, 128), image_shape=(28, 28, 1)))
    w = routing_weights(spec)
    x = real_digits(mnist, 4)
    want_scores = reference.forward(spec, w, x)[0]
    classes = [want_scores.argmax(1), (want_scores.argmax(1) + 3) % 10]
    wants = [reference.reconstruct(spec, w, x, c) for c in classes]
    for name in NAMES:
        runner = get_backend(name).runner(spec, w)
        assert np.abs(runner.scores(x) - want_scores).max() <= ATOL, name
        for c, want in zip(classes, wants, strict=True):
            got = runner.reconstruct(x, c)
            assert got.shape == (4, 28, 28, 1)
            assert np.abs(got - want).max() <= ATOL, (name, c)
    assert np.abs(wants[0] - wants[1]).max() > 10 * ATOL  # the capsule chosen matters


@pytest.mark.parametrize("name", BACKENDS)
def test_efficient_squash_is_exact_for_short_capsules(name):
    """(1 - e^-|s|) cancelled in float32 for a short capsule (|s| = 1e-3: 3e-5 relative error, and torch,
    Keras and numpy each rounded it their own way); -expm1(-|s|) keeps it to float32 rounding."""
    import importlib

    layers = importlib.import_module(f"capsctl_{name}._layers")
    rng = np.random.default_rng(0)
    s = rng.normal(size=(64, 16))
    s *= (np.logspace(-3, 0, 64) / np.linalg.norm(s, axis=1))[:, None]  # lengths 1e-3 .. 1
    n = np.sqrt((s * s).sum(axis=1, keepdims=True) + 1e-7)
    want = -np.expm1(-n) * s / n  # float64
    if name == "torch":
        import torch

        got = layers.squash(torch.tensor(s, dtype=torch.float32), "efficient").numpy()
    else:
        got = np.asarray(layers.squash(layers.ops.convert_to_tensor(s.astype(np.float32)), "efficient"))
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    assert rel.max() < 2e-6, float(rel.max())
    np.testing.assert_allclose(reference.squash(s.astype(np.float32), "efficient"), want, rtol=2e-6, atol=0)
