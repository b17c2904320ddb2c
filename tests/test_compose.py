"""`capsctl train --compose overlap`: training on pairs of overlapping digits (MultiMNIST).

The pairs themselves (two classes, every image first once an epoch, the canvas, re-drawn per epoch and
the same for the same (seed, epoch), independent of how a batch is sliced), what the loop feeds the
trainer, exact resume on each backend, the two-hot "correct" count of each backend's trainer, and the
refusals."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from ._helpers import (
    BACKENDS,
    TINY,
    assert_one_line_error,
    metrics_rows,
    run_cli,
    stop_after_first_epoch,
    write_set,
)


@pytest.fixture(scope="module")
def train_digits(mnist):
    """The first 500 mnist-5k training digits and labels."""
    split = mnist.train()
    return split.images[:500], split.labels[:500]


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(TINY))
    return path


# -- the pairs --------------------------------------------------------------------------------------------


def test_pairs_are_two_classes_and_every_image_is_a_first_digit_once(train_digits):
    from capsctl.training.compose import compose_batch, draw_pairs
    from capsctl.training.config import TrainConfig, batches

    x, y = train_digits
    cfg = TrainConfig(seed=5, batch_size=64, shift=0, compose="overlap")
    for epoch in range(3):
        pairs = draw_pairs(y, cfg.seed, epoch)
        assert np.all(y[pairs.partners] != y)  # always two distinct classes
        # each partner is drawn from every other class, not from a few
        for c in range(10):
            assert set(y[pairs.partners[y == c]]) == set(range(10)) - {c}
        assert pairs.offsets.shape == (len(y), 2, 2)
        assert pairs.offsets.min() == 0 and pairs.offsets.max() == 8
        firsts = []
        for _, idx in batches(cfg, epoch, len(y)):
            images, target = compose_batch(x, y, pairs, idx, 10)
            assert images.shape == (len(idx), 36, 36, 1) and images.dtype == np.float32
            assert target.dtype == np.float32 and set(np.unique(target)) == {0.0, 1.0}
            assert np.all(target.sum(axis=1) == 2)
            assert np.all(target[np.arange(len(idx)), y[idx]] == 1)
            assert np.all(target[np.arange(len(idx)), y[pairs.partners[idx]]] == 1)
            firsts.append(idx)
        # every training image is the first digit of exactly one composite of the epoch
        np.testing.assert_array_equal(np.sort(np.concatenate(firsts)), np.arange(len(y)))


def test_a_composite_is_both_digits_placed_in_the_canvas_merged_by_maximum(train_digits):
    from capsctl.training.compose import compose_batch, draw_pairs

    x, y = train_digits
    pairs = draw_pairs(y, 0, 0)
    idx = np.arange(40)
    images, _ = compose_batch(x, y, pairs, idx, 10)
    for b, i in enumerate(idx):
        expected = np.zeros((36, 36, 1), np.float32)
        for digit, (r, c) in zip((x[i], x[pairs.partners[i]]), pairs.offsets[i], strict=True):
            expected[r : r + 28, c : c + 28] = np.maximum(expected[r : r + 28, c : c + 28], digit)
        np.testing.assert_array_equal(images[b], expected)


def test_composites_of_dark_ink_on_light_are_the_ink_merged_on_white(train_digits):
    from capsctl.training.augment import augment_batch
    from capsctl.training.compose import compose_batch, digit_targets, draw_pairs

    x, y = train_digits
    pairs = draw_pairs(y, 0, 0)
    idx = np.arange(40)
    images, target = compose_batch(x, y, pairs, idx, 10)
    light, light_target = compose_batch(1 - x, y, pairs, idx, 10, light=True)
    np.testing.assert_allclose(light, 1 - images, atol=1e-6)
    np.testing.assert_array_equal(light_target, target)
    np.testing.assert_allclose(digit_targets(1 - x, y, pairs, idx, 10, light=True).images,
                               1 - digit_targets(x, y, pairs, idx, 10).images, atol=1e-6)
    # shifted and zoomed single digits: what comes into view is white, as the paper around them
    for scale in (0.0, 0.2):
        dark = augment_batch(x[:40], 4, scale, np.random.default_rng(3))
        paper = augment_batch(1 - x[:40], 4, scale, np.random.default_rng(3), light=True)
        np.testing.assert_allclose(paper, 1 - dark, atol=1e-5)
        assert paper.dtype == x.dtype


def test_pairs_are_redrawn_each_epoch_and_the_same_for_the_same_seed_and_epoch(train_digits):
    from capsctl.training.compose import compose_batch, draw_pairs

    x, y = train_digits
    a, again = draw_pairs(y, 3, 1), draw_pairs(y, 3, 1)
    np.testing.assert_array_equal(a.partners, again.partners)
    np.testing.assert_array_equal(a.offsets, again.offsets)
    for other in (draw_pairs(y, 3, 2), draw_pairs(y, 4, 1)):  # another epoch, another seed
        assert np.mean(other.partners != a.partners) > 0.8
        assert np.mean(other.offsets != a.offsets) > 0.8
    # per global sample: a rank's slice of a composed batch is the composition of its slice of the batch
    idx = np.random.default_rng(0).permutation(len(y))[:64]
    whole, target = compose_batch(x, y, a, idx, 10)
    for part in (slice(0, 21), slice(21, 43), slice(43, 64)):
        images, t = compose_batch(x, y, a, idx[part], 10)
        np.testing.assert_array_equal(images, whole[part])
        np.testing.assert_array_equal(t, target[part])


def test_digit_targets_are_each_digit_alone_at_its_place_in_the_composite(train_digits):
    """What the decoder redraws (--compose with a decoder): each digit alone on the canvas, at the place it
    has in the composite, with its own class; together, by maximum, they are the composite."""
    from capsctl.training.compose import compose_batch, digit_targets, draw_pairs

    x, y = train_digits
    pairs = draw_pairs(y, 2, 1)
    idx = np.arange(7, 40)
    images, target = compose_batch(x, y, pairs, idx, 10)
    digits = digit_targets(x, y, pairs, idx, 10)
    assert digits.images.shape == (len(idx), 2, 36, 36, 1) and digits.images.dtype == np.float32
    np.testing.assert_array_equal(digits.images.max(axis=1), images)
    np.testing.assert_array_equal(digits.onehots.sum(axis=1), target)  # the two classes, one each
    for b, i in enumerate(idx):
        for k, (digit, (r, c)) in enumerate(zip((x[i], x[pairs.partners[i]]), pairs.offsets[i], strict=True)):
            alone = np.zeros((36, 36, 1), np.float32)
            alone[r : r + 28, c : c + 28] = digit
            np.testing.assert_array_equal(digits.images[b, k], alone)
        assert digits.onehots[b, 0].argmax() == y[i] and digits.onehots[b, 1].argmax() == y[pairs.partners[i]]


def _decoder_spec():
    from capsctl.model.spec import ModelSpec

    d = json.loads(json.dumps(TINY))
    d["decoder"] = {"hidden": [16, 32], "image_shape": [36, 36, 1]}
    return ModelSpec.from_dict(d)


def _two_digit_loss(spec, w, x, y, digits, recon_weight):
    """The --compose loss with a decoder, in numpy: margin loss on the two-hot target + weight × Σ_k
    Σ_pixels (digit k redrawn from its capsule alone − digit k alone)², mean over the batch."""
    from capsctl.model import reference

    v = reference.capsules(spec, w, x)
    p = np.sqrt((v * v).sum(-1) + 1e-7)
    margin = y * np.maximum(0.9 - p, 0) ** 2 + 0.25 * (1 - y) * np.maximum(p - 0.1, 0) ** 2
    sq = sum(
        ((reference.decode(spec, w, v * digits.onehots[:, k, :, None]) - digits.images[:, k]) ** 2)
        .reshape(len(x), -1).sum(1)
        for k in range(digits.images.shape[1])
    )
    return margin.mean(1).mean() + recon_weight * sq.mean()


def _composite_batch(train_digits, seed: int, n: int):
    """The first n composites of epoch 0's pairs drawn with `seed`, with each digit alone as a target."""
    from capsctl.training.compose import compose_batch, digit_targets, draw_pairs

    x, y = train_digits
    pairs, idx = draw_pairs(y, seed, 0), np.arange(n)
    return (*compose_batch(x, y, pairs, idx, 10), digit_targets(x, y, pairs, idx, 10))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_decoder_redraws_each_digit_of_a_composite_from_its_own_capsule(backend_name, train_digits):
    from capsctl.backend import OptimConfig, get_backend
    from capsctl.model.spec import default_recon_weight

    from ._helpers import routing_weights

    images, target, digits = _composite_batch(train_digits, seed=0, n=6)
    spec = _decoder_spec()
    w = routing_weights(spec)
    weight = default_recon_weight(spec)
    want = _two_digit_loss(spec, w, images, target, digits, weight)
    # not the single-digit loss (the composite redrawn from both capsules together): the test can tell
    from ._helpers import reference_loss_with_decoder

    whole = reference_loss_with_decoder(spec, w, images, target, weight)
    assert abs(want - whole) > 1e-3 * want
    loss, _ = get_backend(backend_name).trainer(spec, w, OptimConfig()).step(images, target, 1e-3, digits)
    assert loss == pytest.approx(want, rel=1e-4)


@pytest.mark.torch
@pytest.mark.keras
def test_a_step_with_digit_targets_is_the_same_on_both_backends(train_digits):
    from capsctl.backend import OptimConfig, get_backend
    from capsctl.model.weights import init_weights

    from ._helpers import snapshot

    images, target, digits = _composite_batch(train_digits, seed=1, n=16)
    spec = _decoder_spec()
    start = init_weights(spec, 0)
    trainers = [get_backend(n).trainer(spec, snapshot(start), OptimConfig()) for n in ("torch", "keras")]
    for _ in range(3):
        losses = [t.step(images, target, 1e-3, digits)[0] for t in trainers]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    wt, wk = (t.weights() for t in trainers)
    assert max(float(np.abs(wt[k] - wk[k]).max()) for k in wt) < 1e-5
    # and the decoder did learn from the digits: its last layer moved
    assert float(np.abs(wt["decoder.dense2.kernel"] - start["decoder.dense2.kernel"]).max()) > 0


def test_eval_pairs_reconstruction_compares_each_digit_at_its_place(tmp_path, capsys, mnist_dir, mnist):
    """A decoder trained with --compose overlap draws the canvas: eval-pairs --reconstruction compares each
    digit's redraw with that digit alone at its place (and the floor redraws it from that image)."""
    from capsctl.data.composites import make_composites, overlay
    from capsctl.model import reference
    from capsctl.model.weights import save_model

    from ._helpers import routing_weights

    spec = _decoder_spec()
    w = routing_weights(spec)
    save_model(tmp_path / "m.safetensors", spec, w)
    code, out, err = run_cli(["eval-pairs", tmp_path / "m.safetensors", "--layout", "overlap", "--data-dir",
                              mnist_dir, "--eval-limit", "12", "--reconstruction", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    test = mnist.test()
    comp = make_composites(test.images, test.labels, layout="overlap", seed=0, limit=12)
    v = reference.capsules(spec, w, comp.images)
    errors, floor = np.zeros((12, 2)), np.zeros((12, 2))

    def mse(capsules, hot, target):
        return ((reference.decode(spec, w, capsules * hot[..., None]) - target) ** 2).reshape(12, -1).mean(1)

    for k in range(2):
        alone = overlay(test.images[comp.indices[:, k : k + 1]], comp.offsets[:, k : k + 1])
        hot = np.eye(10, dtype=np.float32)[comp.labels[:, k]]
        errors[:, k] = mse(v, hot, alone)
        floor[:, k] = mse(reference.capsules(spec, w, alone), hot, alone)
    assert got["reconstruction_mse"] == pytest.approx(errors.mean(), rel=1e-4)
    assert got["reconstruction_mse_by_position"] == pytest.approx(list(errors.mean(0)), rel=1e-4)
    assert got["reconstruction_mse_alone"] == pytest.approx(floor.mean(), rel=1e-4)
    # the default (vertical) layout: refused before any scoring, naming the layout its decoder draws
    code, out, err = run_cli(["eval-pairs", tmp_path / "m.safetensors", "--data-dir", mnist_dir,
                              "--eval-limit", "12", "--reconstruction"], capsys)
    assert_one_line_error(code, out, err, "m.safetensors: --reconstruction: its decoder draws 36x36 images",
                          "add --layout overlap", "test digits are 28x28")


class _Recorder:
    """A trainer that records what the loop gives it, and trains nothing."""

    def __init__(self, weights, log):
        self._weights, self.log = dict(weights), log

    def step(self, x, y, lr):
        self.log.append((np.array(x), np.array(y)))
        return 0.5, 0

    def scores(self, images, batch_size=512):
        self.log.append(("scored", np.array(images)))
        return np.zeros((len(images), 10), np.float32)

    def weights(self):
        return self._weights

    def optimizer_state(self):
        return {}

    def load_optimizer_state(self, state):
        pass


def test_the_loop_trains_on_the_pairs_and_scores_overlap_pairs_of_test_digits(tmp_path, mnist):
    from capsctl.data.composites import make_composites
    from capsctl.data.datasets import Split
    from capsctl.model.spec import ModelSpec
    from capsctl.training.compose import compose_batch, draw_pairs
    from capsctl.training.config import TrainConfig, batches
    from capsctl.training.loop import train

    log: list = []

    class Backend:
        name = "recorder"

        def trainer(self, spec, weights, optim):
            return _Recorder(weights, log)

    tr, te = mnist.train(), mnist.test()
    train_split = Split(tr.images[:100], tr.labels[:100])
    cfg = TrainConfig(epochs=2, batch_size=32, shift=0, compose="overlap", eval_limit=50, curve_images=20)
    spec = ModelSpec.from_json(json.dumps(TINY))
    rows = train(Backend(), spec, cfg, train_split, te, tmp_path / "run", show_progress=False)  # type: ignore[arg-type]

    expected = []
    for epoch in range(2):
        pairs = draw_pairs(train_split.labels, cfg.seed, epoch)
        expected += [compose_batch(train_split.images, train_split.labels, pairs, idx, 10)
                     for _, idx in batches(cfg, epoch, 100)]
        expected.append(("scored", None))
    assert len(log) == len(expected) == 10
    for got, want in zip(log, expected, strict=True):
        if isinstance(want[0], str):
            assert isinstance(got[0], str) and got[0] == "scored"
            continue
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # scored on what `eval-pairs --layout overlap --eval-limit 50` scores (the epochs before on the first 20)
    pairs_50 = make_composites(te.images, te.labels, layout="overlap", seed=0, limit=50)
    np.testing.assert_array_equal(log[-1][1], pairs_50.images)
    np.testing.assert_array_equal(log[4][1], pairs_50.images[:20])
    assert [(r["test_images"], r["compose"]) for r in rows] == [(20, "overlap"), (50, "overlap")]

    # a model of dark ink on light (its spec's background) trains and is scored on the ink merged on white
    log.clear()
    light_split = Split(1 - train_split.images, train_split.labels)
    light_test = Split(1 - te.images, te.labels)
    train(Backend(), spec.replace(background="light"), cfg, light_split, light_test, tmp_path / "light",  # type: ignore[arg-type]
          show_progress=False)
    np.testing.assert_allclose(log[0][0], 1 - expected[0][0], atol=1e-6)
    np.testing.assert_allclose(log[-1][1], 1 - pairs_50.images, atol=1e-6)


# -- training and resuming on each backend ---------------------------------------------------------------


@pytest.mark.parametrize("decoder", [False, True], ids=["", "decoder"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_an_interrupted_compose_run_resumes_exactly(
    tmp_path, capsys, monkeypatch, mnist_dir, backend_name, decoder
):
    """Stopped after epoch 1 and resumed (which keeps --compose), a run ends with the uninterrupted run's
    weights, bit for bit, and its metrics rows; --compose on a resume is refused. With --decoder, the
    decoder draws the 36x36 canvas (each digit alone)."""
    from capsctl.model.weights import load_model
    from capsctl.training.run_folder import load_checkpoint

    args = ["train", "--compose", "overlap", "--spec", _spec(tmp_path), "--data-dir", mnist_dir,
            "--backend", backend_name, "--limit", "96", "--batch-size", "32", "--eval-limit", "40",
            "--epochs", "2", "--seed", "3", "-q", *(["--decoder"] if decoder else [])]
    code, out, err = run_cli([*args, "--out", tmp_path / "straight", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["compose"] == "overlap" and result["test_images"] == 40
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        code, _, err = run_cli([*args, "--out", tmp_path / "split"], capsys)
    assert code == 130, err
    assert len(metrics_rows(tmp_path / "split")) == 1

    code, out, err = run_cli(["train", "--resume", tmp_path / "split", "--compose", "overlap"], capsys)
    assert_one_line_error(code, out, err, "--compose")
    code, _, err = run_cli(["train", "--resume", tmp_path / "split", "-q"], capsys)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "split")
    assert (ck.config.compose, ck.config.shift, ck.config.scale) == ("overlap", 0, 0.0)
    assert metrics_rows(tmp_path / "split") == metrics_rows(tmp_path / "straight")
    assert [r["compose"] for r in metrics_rows(tmp_path / "split")] == ["overlap", "overlap"]
    spec, straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, resumed = load_model(tmp_path / "split" / "model.safetensors")
    if decoder:  # the decoder draws the canvas
        assert spec.decoder is not None and spec.decoder.image_shape == (36, 36, 1)
    else:
        assert spec.decoder is None
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("decoder", [False, True], ids=["", "decoder"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_two_ranks_train_on_the_composites_of_one_process(tmp_path, backend_name, decoder):
    """--nproc 2 composes each global batch before the ranks slice it: the job makes one process's
    updates (as tests/test_distributed.py checks for single digits) and counts the same correct pairs.
    With --decoder, each rank takes its slice of the digits to redraw too."""
    from .test_distributed import _relative_gap, _train, _weights

    # 249 images at batch 31: every global batch splits 16 + 15, the last (1 image) 1 + 0
    args = ["--compose", "overlap", "--spec", _spec(tmp_path), "--limit", "249", "--batch-size", "31",
            "--lr", "0.01", "--eval-limit", "100", "--curve-images", "50", "--epochs", "2", "-q",
            "--backend", backend_name, *(["--decoder"] if decoder else [])]
    one = _train([*args, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = _train([*args, "--out", tmp_path / "two", "--nproc", "2"])
    assert two.returncode == 0, two.stderr
    gap = _relative_gap(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    assert gap < 1e-5, gap
    for a, b in zip(metrics_rows(tmp_path / "one"), metrics_rows(tmp_path / "two"), strict=True):
        assert a["train_accuracy"] == b["train_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# -- "correct" with two-hot targets ----------------------------------------------------------------------

# scores of 4 classes, the targets, and whether each row counts as correct
HAND_MADE = [
    ([0.9, 0.8, 0.1, 0.0], [0, 1], True),
    ([0.9, 0.1, 0.8, 0.0], [0, 1], False),  # top 2 = {0, 2}
    ([0.1, 0.2, 0.3, 0.4], [0, 1], False),  # both labels at the bottom
    ([0.2, 0.3, 0.9, 0.95], [3, 2], True),
    ([0.5, 0.5, 0.5, 0.0], [0, 1], True),  # a tie ranks the lower class first (as eval-pairs does)
    ([0.5, 0.5, 0.5, 0.0], [1, 2], False),
    ([0.1, 0.7, 0.7, 0.0], [1], True),  # one-hot: argmax == argmax, the first maximum
    ([0.1, 0.7, 0.7, 0.0], [2], False),
    ([0.2, 0.1, 0.0, 0.3], [3], True),
    ([0.2, 0.1, 0.0, 0.3], [0], False),
]


def _correctmetrics_rows(backend_name: str, scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    fn = importlib.import_module(f"capsctl_{backend_name}._trainer").correct_rows
    if backend_name == "torch":
        import torch

        return fn(torch.from_numpy(scores), torch.from_numpy(targets)).numpy()
    import tensorflow as tf

    return fn(tf.constant(scores), tf.constant(targets)).numpy()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_correct_means_the_top_k_set_is_the_label_set(backend_name):
    from capsctl.data.composites import set_matches

    scores = np.array([s for s, _, _ in HAND_MADE], np.float32)
    targets = np.zeros_like(scores)
    for row, (_, labels, _) in enumerate(HAND_MADE):
        targets[row, labels] = 1.0
    expected = np.array([ok for _, _, ok in HAND_MADE])
    got = _correctmetrics_rows(backend_name, scores, targets)
    np.testing.assert_array_equal(got, expected)
    assert int(got.sum()) == 5
    # the two-hot rows agree with eval-pairs' rule
    two = [i for i, (_, labels, _) in enumerate(HAND_MADE) if len(labels) == 2]
    pairs = np.array([HAND_MADE[i][1] for i in two])
    np.testing.assert_array_equal(got[two], set_matches(scores[two], pairs)[0])
    # and one-hot rows are argmax == argmax, as before, on random scores too
    rng = np.random.default_rng(0)
    scores = rng.random((200, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 200)
    one_hot = np.eye(10, dtype=np.float32)[labels]
    np.testing.assert_array_equal(
        _correctmetrics_rows(backend_name, scores, one_hot), scores.argmax(1) == labels
    )


# -- refusals --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_class_data(tmp_path_factory, mnist) -> Path:
    """A data set whose training and test images are all of one class (3)."""
    tr, te = mnist.train(), mnist.test()
    threes, test_threes = tr.labels == 3, te.labels == 3
    folder = tmp_path_factory.mktemp("threes")
    write_set(folder, {
        "train-images": (tr.images[threes][:40, :, :, 0] * 255).round().astype(np.uint8),
        "train-labels": tr.labels[threes][:40].astype(np.uint8),
        "t10k-images": (te.images[test_threes][:20, :, :, 0] * 255).round().astype(np.uint8),
        "t10k-labels": te.labels[test_threes][:20].astype(np.uint8),
    })
    return folder


def test_one_class_is_refused_and_writes_nothing(tmp_path, capsys, one_class_data):
    run = tmp_path / "runs" / "r"
    code, out, err = run_cli(["train", "--compose", "overlap", "--spec", _spec(tmp_path), "--data-dir",
                              one_class_data, "--epochs", "1", "--out", run, "-q"], capsys)
    assert_one_line_error(code, out, err, "--compose overlap", "two different classes", "only class 3")
    assert not (tmp_path / "runs").exists()


def test_a_limit_leaving_one_class_is_refused_and_writes_nothing(tmp_path, capsys, mnist_dir, mnist):
    first = int(mnist.train().labels[0])
    run = tmp_path / "runs" / "r"
    code, out, err = run_cli(["train", "--compose", "overlap", "--spec", _spec(tmp_path), "--data-dir",
                              mnist_dir, "--limit", "1", "--epochs", "1", "--out", run, "-q"], capsys)
    assert_one_line_error(code, out, err, "(the first 1)", f"only class {first}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--compose", "stacked"], ["--compose", "'stacked' is not one of 'overlap'"]),
        (["--compose", "overlap", "--shift", "2"], ["--compose overlap", "--shift"]),
        (["--compose", "overlap", "--scale", "0.1"], ["--compose overlap", "--scale"]),
    ],
    ids=["unknown-value", "shift", "scale"],
)
def test_bad_compose_settings_are_refused_and_write_nothing(tmp_path, capsys, mnist_dir, extra, fragments):
    run = tmp_path / "runs" / "r"
    code, out, err = run_cli(["train", *extra, "--data-dir", mnist_dir, "--limit", "32", "--epochs", "1",
                              "--out", run, "-q"], capsys)
    assert_one_line_error(code, out, err, *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_decoder_drawing_another_size_than_the_canvas_is_refused(tmp_path, capsys, mnist_dir):
    spec = json.loads(json.dumps(TINY))
    spec["decoder"] = {"hidden": [8], "image_shape": [28, 28, 1]}  # the digits' size, not the 36x36 canvas
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = tmp_path / "runs" / "r"
    code, out, err = run_cli(["train", "--compose", "overlap", "--spec", tmp_path / "spec.json", "--data-dir",
                              mnist_dir, "--limit", "32", "--epochs", "1", "--out", run, "-q"], capsys)
    assert_one_line_error(code, out, err, "decoder.image_shape is [28, 28, 1]", "[36, 36, 1] canvas")
    assert not (tmp_path / "runs").exists()


def test_a_config_without_compose_loads_as_single_digits():
    from dataclasses import asdict

    from capsctl.training.config import TrainConfig

    old = asdict(TrainConfig())
    old.pop("compose")
    assert TrainConfig.from_json(json.dumps(old)).compose is None
