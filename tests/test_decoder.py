"""The reconstruction decoder: spec, weight file, masking, loss, exports, training, and the CLI
(`inspect --reconstruct/--perturb`, `eval-pairs --reconstruction`, `train --decoder`).
Backend-vs-reference parity on every routing × squash is in test_parity.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from capsctl.errors import CapsctlError
from capsctl.model import reference
from capsctl.model.spec import DecoderSpec, ModelSpec, default_recon_weight
from capsctl.model.weights import expected_shapes, init_weights, load_model, save_model

from ._helpers import (
    BACKENDS,
    TINY,
    assert_one_line_error,
    real_digits,
    reference_loss_with_decoder,
    routing_weights,
    run_cli,
)

DEC = {"hidden": [16, 32], "image_shape": [28, 28, 1]}


def tiny_decoder_spec(**caps: object) -> ModelSpec:
    d = json.loads(json.dumps(TINY))
    d["capsule"].update(caps)
    d["decoder"] = DEC
    return ModelSpec.from_dict(d)


@pytest.fixture(scope="module")
def decoder_model(tmp_path_factory):
    spec = tiny_decoder_spec()
    path = tmp_path_factory.mktemp("decoder") / "dec.safetensors"
    save_model(path, spec, routing_weights(spec))
    return path


# -- spec and weight file ---------------------------------------------------------------------------


def test_spec_without_decoder_keeps_its_json():
    assert "decoder" not in ModelSpec().to_json()
    assert ModelSpec.from_json(ModelSpec().to_json()).decoder is None
    assert ModelSpec.from_dict({"decoder": None}) == ModelSpec()


def test_decoder_spec_round_trips_through_json():
    spec = tiny_decoder_spec()
    d = json.loads(spec.to_json())
    assert d["decoder"] == DEC
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.decoder == DecoderSpec(hidden=(16, 32), image_shape=(28, 28, 1))
    assert ModelSpec.from_dict({"decoder": {}}).decoder == DecoderSpec()  # hidden defaults to [512, 1024]


@pytest.mark.parametrize(
    "decoder, fragment",
    [
        ({"hidden": [0]}, "decoder.hidden[0]"),
        ({"hidden": 512}, "must be lists"),
        ({"image_shape": [28, 28]}, "[H, W, C]"),
        ({"image_shape": [28, 28, 3]}, "in_channels is 1"),
        ({"depth": 2}, "decoder.depth"),
        ([512], "null or an object"),
    ],
)
def test_bad_decoder_spec_is_named(decoder, fragment):
    with pytest.raises(CapsctlError) as info:
        ModelSpec.from_dict({"decoder": decoder})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_decoder_on_pool_head_is_a_spec_error():
    with pytest.raises(CapsctlError, match="only a capsule head can have a decoder"):
        ModelSpec(head="pool", decoder=DecoderSpec(image_shape=(28, 28, 1)))
    with pytest.raises(CapsctlError, match="only a capsule head can have a decoder"):
        ModelSpec.from_dict({"head": "pool", "decoder": {"hidden": [8]}})


def test_weight_names_shapes_and_init():
    spec = replace(ModelSpec(), decoder=DecoderSpec(image_shape=(28, 28, 1)))
    shapes = expected_shapes(spec)
    assert shapes["decoder.dense0.kernel"] == (160, 512)
    assert shapes["decoder.dense1.kernel"] == (512, 1024)
    assert shapes["decoder.dense2.kernel"] == (1024, 784)
    assert shapes["decoder.dense2.bias"] == (784,)
    assert "decoder.dense3.kernel" not in shapes
    w = init_weights(spec, 0)
    assert not w["decoder.dense1.bias"].any()
    limit = np.sqrt(6 / (512 + 1024))
    k = w["decoder.dense1.kernel"]
    assert k.max() <= limit and k.min() >= -limit and k.std() > limit / 3
    with pytest.raises(CapsctlError, match="image_shape is not set"):
        expected_shapes(replace(ModelSpec(), decoder=DecoderSpec()))


def test_default_recon_weight_scales_with_image_size():
    assert default_recon_weight(tiny_decoder_spec()) == pytest.approx(0.0005)
    spec = replace(ModelSpec(), decoder=DecoderSpec(image_shape=(56, 28, 1)))
    assert default_recon_weight(spec) == pytest.approx(0.00025)


def test_weight_file_round_trip_is_bit_for_bit(tmp_path):
    spec = tiny_decoder_spec()
    w = routing_weights(spec)
    save_model(tmp_path / "m.safetensors", spec, w)
    spec2, w2 = load_model(tmp_path / "m.safetensors")
    assert spec2 == spec
    assert set(w2) == set(w) and all(np.array_equal(w2[k], w[k]) for k in w)


# -- masking and the loss -----------------------------------------------------------------------------


def _runners(spec, w):
    from capsctl.backend import get_backend

    out = {}
    for param in BACKENDS:
        name = param.values[0]
        try:
            out[name] = get_backend(name).runner(spec, w)
        except CapsctlError:
            continue
    return out


@pytest.mark.torch
@pytest.mark.keras
def test_only_the_chosen_capsule_reaches_the_decoder(mnist):
    spec = tiny_decoder_spec()
    w = routing_weights(spec)
    v = reference.capsules(spec, w, real_digits(mnist, 2)).astype(np.float32)  # (2, J, D)
    masked = reference.mask(v, np.array([3, 7]))
    assert np.count_nonzero(np.abs(masked).sum(-1)) == 2
    other = masked.copy()
    other[:, 5] = 0.7  # a capsule that is not the chosen one: the mask zeroes it before the decoder
    chosen = masked.copy()
    chosen[0, 3] += 0.3
    for name, runner in _runners(spec, w).items():
        base = runner.decode(masked)
        recon = runner.reconstruct(real_digits(mnist, 2), np.array([3, 7]))
        assert np.allclose(recon, base, atol=1e-5), name
        own = runner.capsules(real_digits(mnist, 2))
        assert np.allclose(recon, runner.decode(reference.mask(own, np.array([3, 7]))), atol=1e-6), name
        assert not np.allclose(runner.decode(own), recon, atol=1e-4), name  # unmasked capsules differ
        # a changed non-chosen capsule is zeroed by the mask: the drawing is exactly the same
        assert np.array_equal(runner.decode(reference.mask(other, np.array([3, 7]))), base), name
        assert not np.allclose(runner.decode(chosen)[0], base[0], atol=1e-4), name
    ref = reference.decode(spec, w, masked)
    assert np.array_equal(reference.decode(spec, w, reference.mask(other, np.array([3, 7]))), ref)


@pytest.mark.parametrize("name", BACKENDS)
def test_colour_non_square_reconstruction_shape_parity_and_loss(name):
    # a 20x24 RGB input: the decoder draws (H, W, C) = (20, 24, 3), the same on the backend and the reference
    from capsctl.backend import OptimConfig, get_backend

    d = json.loads(json.dumps(TINY))
    d.update(in_channels=3, num_classes=4, decoder={"hidden": [16, 32], "image_shape": [20, 24, 3]})
    spec = ModelSpec.from_dict(d)
    w = routing_weights(spec)
    x = np.random.default_rng(0).uniform(0, 1, (3, 20, 24, 3)).astype(np.float32)
    classes = np.array([0, 3, 1])
    recon = get_backend(name).runner(spec, w).reconstruct(x, classes)
    assert recon.shape == (3, 20, 24, 3)
    np.testing.assert_allclose(recon, reference.reconstruct(spec, w, x, classes), atol=1e-4)
    assert default_recon_weight(spec) == pytest.approx(0.0005 * 784 / (20 * 24 * 3))
    y = np.eye(4, dtype=np.float32)[classes]
    loss, _ = get_backend(name).trainer(spec, w, OptimConfig()).step(x, y, 1e-3)
    want = reference_loss_with_decoder(spec, w, x, y, default_recon_weight(spec))
    assert loss == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_trainer_loss_is_margin_plus_weighted_reconstruction(name, mnist):
    from capsctl.backend import OptimConfig, get_backend

    spec = tiny_decoder_spec()
    w = routing_weights(spec)
    x = real_digits(mnist, 6)
    labels = mnist.test().labels[:6]
    y = np.eye(10, dtype=np.float32)[labels]
    want = reference_loss_with_decoder(spec, w, x, y, 0.0005)
    assert want > reference.margin_loss(reference.forward(spec, w, x)[0], y) + 1e-3  # the term counts
    loss, _ = get_backend(name).trainer(spec, w, OptimConfig()).step(x, y, 1e-3)
    assert loss == pytest.approx(want, rel=1e-4)
    loss2, _ = get_backend(name).trainer(spec, w, OptimConfig(recon_weight=0.01)).step(x, y, 1e-3)
    assert loss2 == pytest.approx(reference_loss_with_decoder(spec, w, x, y, 0.01), rel=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_few_steps_lower_the_loss(name, mnist):
    from capsctl.backend import OptimConfig, get_backend

    spec = tiny_decoder_spec()
    trainer = get_backend(name).trainer(spec, init_weights(spec, 0), OptimConfig())
    x = mnist.train().images[:32]
    y = np.eye(10, dtype=np.float32)[mnist.train().labels[:32]]
    losses = [trainer.step(x, y, 3e-3)[0] for _ in range(15)]
    assert losses[-1] < 0.85 * losses[0], losses
    assert "decoder.dense2.kernel" in trainer.weights()


@pytest.mark.torch
@pytest.mark.keras
def test_decoder_optimizer_state_moves_between_backends(mnist):
    from capsctl.backend import OptimConfig, get_backend

    from ._helpers import snapshot

    spec = tiny_decoder_spec()
    x = mnist.train().images[:8]
    y = np.eye(10, dtype=np.float32)[mnist.train().labels[:8]]
    torch_trainer = get_backend("torch").trainer(spec, init_weights(spec, 0), OptimConfig())
    for _ in range(2):
        torch_trainer.step(x, y, 1e-3)
    state = snapshot(torch_trainer.optimizer_state())
    assert "m.decoder.dense2.kernel" in state and "v.decoder.dense0.bias" in state
    keras_trainer = get_backend("keras").trainer(spec, snapshot(torch_trainer.weights()), OptimConfig())
    keras_trainer.load_optimizer_state(state)
    a, b = torch_trainer.step(x, y, 1e-3)[0], keras_trainer.step(x, y, 1e-3)[0]
    assert a == pytest.approx(b, rel=1e-5)
    wt, wk = torch_trainer.weights(), keras_trainer.weights()
    assert max(float(np.abs(wt[k] - wk[k]).max()) for k in wt) < 1e-5


# -- exports --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, suffix", [pytest.param("torch", ".pt", marks=pytest.mark.torch),
                                          pytest.param("keras", ".keras", marks=pytest.mark.keras)])
def test_native_export_import_is_bit_for_bit(name, suffix, tmp_path):
    from capsctl.backend import get_backend

    spec = tiny_decoder_spec()
    w = routing_weights(spec)
    be = get_backend(name)
    path = tmp_path / f"m{suffix}"
    path.write_bytes(be.export_bytes(spec, w, name))
    spec2, w2 = be.import_native(str(path))
    assert spec2 == spec
    assert set(w2) == set(w) and all(np.array_equal(w2[k], w[k]) for k in w)


@pytest.mark.torch
def test_onnx_has_scores_and_reconstruction_outputs(mnist):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from capsctl.backend import get_backend

    spec = tiny_decoder_spec()
    w = routing_weights(spec)
    be = get_backend("torch")
    sess = ort.InferenceSession(be.export_bytes(spec, w, "onnx"))
    assert [o.name for o in sess.get_outputs()] == ["scores", "reconstruction"]
    x = real_digits(mnist, 4)
    scores, recon = sess.run(None, {"images": x})
    runner = be.runner(spec, w)
    assert np.abs(scores - runner.scores(x)).max() <= 1e-4
    assert recon.shape == (4, 28, 28, 1)
    assert np.abs(recon - runner.reconstruct(x, scores.argmax(1))).max() <= 1e-4


# -- the command line -----------------------------------------------------------------------------------


@pytest.mark.torch
def test_inspect_reconstruct_json_and_figure(decoder_model, tmp_path, capsys, mnist):
    from PIL import Image

    img = tmp_path / "pair.png"
    pair = real_digits(mnist, 1, height=56)[0, :, :, 0]
    Image.fromarray(np.round(pair * 255).astype(np.uint8)).save(img)
    args = ["inspect", decoder_model, img, "--reconstruct"]
    code, out, err = run_cli([*args, "--class", "4", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert list(d["reconstructions"]) == ["4"]
    rec = np.array(d["reconstructions"]["4"])
    assert rec.shape == (28, 28, 1) and rec.min() >= 0 and rec.max() <= 1
    spec, w = load_model(decoder_model)
    want = reference.reconstruct(spec, w, pair[None, :, :, None], np.array([4]))[0]
    assert np.abs(rec - want).max() <= 1e-4
    fig = tmp_path / "recon.png"
    code, _, err = run_cli([*args, "--top", "2", "--out", fig], capsys)
    assert code == 0, err
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reconstructing" not in err
    # more classes than are drawn: the 5 highest, said on stderr (they were left out without a word)
    code, out, err = run_cli([*args, "--top", "7", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["reconstructions"]) == 5
    assert "7 classes selected; reconstructing the 5 highest-scoring (--class C for another)" in err


@pytest.mark.torch
def test_inspect_perturb_grid(decoder_model, tmp_path, capsys, mnist):
    from PIL import Image

    img = tmp_path / "one.png"
    Image.fromarray(np.round(real_digits(mnist, 1)[0, :, :, 0] * 255).astype(np.uint8)).save(img)
    args = ["inspect", decoder_model, img, "--perturb", "--class", "2", "--range", "0.5", "--steps", "3"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    p = json.loads(out)["perturbation"]
    assert p["class"] == 2 and p["offsets"] == [-0.5, 0.0, 0.5]
    grid = np.array(p["reconstructions"])
    assert grid.shape == (4, 3, 28, 28, 1)  # D = 4 dimensions × 3 steps
    spec, w = load_model(decoder_model)
    unmoved = reference.reconstruct(spec, w, real_digits(mnist, 1), np.array([2]))
    assert np.abs(grid[:, 1] - unmoved).max() < 1e-4  # offset 0: the plain reconstruction
    assert np.abs(grid[0, 0] - grid[0, 2]).max() > 1e-6  # moving a dimension changes the drawing
    fig = tmp_path / "grid.png"
    code, _, err = run_cli([*args, "--out", fig], capsys)
    assert code == 0, err
    assert fig.stat().st_size > 1000


@pytest.mark.torch
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--perturb", "--class", "10"], "--class must be in 0..9"),
        (["--perturb", "--class", "-1"], "--class must be in 0..9"),
        (["--perturb", "--range", "0"], "--range must be in (0, 5]"),
        (["--perturb", "--range", "nan"], "--range must be in (0, 5]"),
        (["--perturb", "--steps", "1"], "--steps must be in 2..51"),
        (["--perturb", "--steps", "500"], "--steps must be in 2..51"),
        (["--reconstruct", "--class", "12"], "--class must be in 0..9"),
        (["--steps", "5"], "go with --perturb"),
        (["--reconstruct", "--perturb"], "not both"),
    ],
)
def test_inspect_bad_decoder_options(decoder_model, tmp_path, capsys, mnist, extra, fragment):
    img = tmp_path / "x.npy"
    np.save(img, real_digits(mnist, 1)[0, :, :, 0])
    code, out, err = run_cli(["inspect", decoder_model, img, *extra], capsys)
    assert_one_line_error(code, out, err, fragment)


@pytest.mark.torch
@pytest.mark.parametrize("head", ["pool", "capsule"])
def test_inspect_reconstruct_needs_a_decoder(head, tmp_path, capsys, mnist):
    spec = ModelSpec(head=head)
    model = tmp_path / f"{head}.safetensors"
    save_model(model, spec, init_weights(spec, 0))
    img = tmp_path / "x.npy"
    np.save(img, real_digits(mnist, 1)[0, :, :, 0])
    reason = "pooling head" if head == "pool" else "no reconstruction decoder"
    for flag in ("--reconstruct", "--perturb"):
        code, out, err = run_cli(["inspect", model, img, flag], capsys)
        assert_one_line_error(code, out, err, flag, reason)
    code, out, err = run_cli(["eval-pairs", model, "--reconstruction", "--eval-limit", "5"], capsys)
    assert_one_line_error(code, out, err, "--reconstruction", reason)


@pytest.mark.torch
def test_eval_pairs_reconstruction(decoder_model, mnist_dir, capsys):
    code, out, err = run_cli(
        ["eval-pairs", decoder_model, "--data-dir", mnist_dir, "--eval-limit", "12", "--reconstruction",
         "--json"],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["pairs"] == 12 and len(d["reconstruction_mse_by_position"]) == 2
    assert d["reconstruction_mse"] == pytest.approx(np.mean(d["reconstruction_mse_by_position"]))
    # the hand computation for the first composite's top digit
    from capsctl.data import datasets
    from capsctl.data.composites import make_composites

    test = datasets.Dataset("mnist", mnist_dir).test()
    comp = make_composites(test.images, test.labels, limit=12)
    spec, w = load_model(decoder_model)
    assert comp.indices is not None
    rec = reference.reconstruct(spec, w, comp.images, comp.labels[:, 0])
    want = ((rec - test.images[comp.indices[:, 0]]) ** 2).mean()
    assert d["reconstruction_mse_by_position"][0] == pytest.approx(want, rel=1e-4)
    assert 0 < d["reconstruction_mse_alone"] < 1


@pytest.mark.parametrize("name", BACKENDS)
def test_train_decoder_fills_image_shape_and_records_weight(name, mnist_dir, tmp_path, capsys):
    from capsctl.training.run_folder import load_checkpoint

    spec_file = tmp_path / "spec.json"
    d = json.loads(json.dumps(TINY))
    spec_file.write_text(json.dumps(d))
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "--spec", spec_file, "--decoder", "--backend", name, "--data-dir", mnist_dir,
         "--limit", "128", "--epochs", "2", "--batch-size", "32", "--eval-limit", "20", "--out", run, "-q"],
        capsys,
    )
    assert code == 0, err
    ck = load_checkpoint(run)
    assert ck.spec.decoder == DecoderSpec(image_shape=(28, 28, 1))
    assert ck.config.recon_weight == pytest.approx(0.0005)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] < rows[0]["loss"]
    _, w = load_model(run / "model.safetensors")
    assert w["decoder.dense2.kernel"].shape == (1024, 784)


@pytest.mark.torch
def test_train_decoder_refused_on_pool_head(capsys, tmp_path):
    code, out, err = run_cli(["train", "--head", "pool", "--decoder", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "--decoder needs the capsule head")
    code, out, err = run_cli(["train", "--recon-weight", "0.1", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "--recon-weight needs a model with a decoder")
    # routing options on the pooling head were taken and ignored
    for extra, named in ((["--routings", "5"], "--routings"), (["--routing", "sabour", "--no-shared"],
                                                                 "--routing, --no-shared")):
        code, out, err = run_cli(["train", "--head", "pool", *extra, "--out", tmp_path / "r"], capsys)
        assert_one_line_error(code, out, err, f"{named}: the pooling head has no capsule layer")
    assert not (tmp_path / "r").exists()


def test_the_overlay_marks_the_ink_of_dark_ink_on_light(monkeypatch):
    """For a model of dark ink on light the overlay painted the paper and left the strokes dark."""
    from capsctl.inspect import reconstruction

    ink = np.zeros((8, 8))
    ink[2:6, 3:5] = 1.0
    monkeypatch.setattr(reconstruction, "placement", lambda res, j, hw: (0, 0))  # (drawn over the input)
    dark = reconstruction.overlay(ink, {0: ink[..., None]}, None)  # type: ignore[arg-type]
    light = reconstruction.overlay(1 - ink, {0: 1 - ink[..., None]}, None, light=True)  # type: ignore[arg-type]
    np.testing.assert_allclose(light, dark, atol=1e-12)
    assert light[0, 0].max() == 0.0 and light[3, 3, 0] > 0.9  # the paper dark, the stroke in colour
