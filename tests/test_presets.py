"""Named architectures (`--arch`, capsctl.model.presets): their parameter counts against the papers, the
numpy reference and every backend agreeing on each, and their refusals of what they cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capsctl.choices import ARCHS
from capsctl.model import reference
from capsctl.model.presets import design_size, for_images, preset
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import parameter_count, save_model

from ._helpers import assert_one_line_error, on_canvas, real_digits, routing_weights, run_cli


def filled(name: str) -> ModelSpec:
    """The preset as `capsctl train` completes it for grey images of its design size (28x28 digits, 36x36
    composites for efficient-multimnist) and 10 classes."""
    return for_images(name)


def test_parameter_counts_are_the_papers():
    assert parameter_count(filled("seed")) == 279_488
    sabour = filled("sabour2017")
    # Sabour et al. 2017 on 28x28 MNIST: 1,152 primary capsules; ~8.2M parameters with the decoder
    assert sabour.capsule.num_inputs == 1152
    assert parameter_count(sabour) == 20_992 + 5_308_672 + 1_474_560 + 1_411_344 == 8_215_568
    assert parameter_count(sabour.replace(decoder=None)) == 6_804_224
    # Mazzia et al. 2021: 161,824 trained parameters (the file also holds 576 running statistics)
    from capsctl.model.weights import expected_shapes

    efficient = filled("efficient")
    assert parameter_count(efficient) == 161_824
    assert sum(int(np.prod(s)) for s in expected_shapes(efficient).values()) == 161_824 + 576
    # the authors' MultiMNIST graph on 36x36: convs 832 + 18,496 + 36,928 + 73,856, batch norms' scales
    # and shifts 576, depthwise 5x5 primary capsules 3,328 (1x1x128: 16 capsules), W 16·8·160, b 16·10
    multi = filled("efficient-multimnist")
    assert design_size("efficient-multimnist") == (36, 36) and multi.capsule.num_inputs == 16
    assert parameter_count(multi) == 130_112 + 576 + 3_328 + 20_480 + 160 == 154_656


@pytest.mark.parametrize("name", ARCHS)
def test_every_preset_round_trips_as_json(name):
    spec = filled(name)
    assert ModelSpec.from_json(spec.to_json()) == spec


def preset_weights(spec: ModelSpec, seed: int = 3) -> dict[str, np.ndarray]:
    """routing_weights, with the primary capsules' kernel x3: scores spread over 0.08-0.41 for sabour2017
    (0.004-0.014 at Glorot scale, where 3 images barely tell the classes apart)."""
    w = routing_weights(spec, seed)
    if "head.primary.kernel" in w:
        w["head.primary.kernel"] = w["head.primary.kernel"] * 3
    return w


@pytest.mark.parametrize("name", ARCHS)
def test_backends_agree_with_the_reference_on_every_preset(name, backend, mnist):
    spec = filled(name)
    weights = preset_weights(spec)
    x = on_canvas(real_digits(mnist, 3), design_size(name))
    want, _ = reference.forward(spec, weights, x)
    # non-trivial scores: the agreement below would be empty if every capsule were near zero
    assert want.max() > 0.05 and np.ptp(want, axis=1).min() > 1e-2, want
    got = backend.runner(spec, weights).scores(x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if spec.decoder is not None:  # the reconstruction from the true class's capsule too
        classes = np.asarray(mnist.test().labels[:3])
        recon = backend.runner(spec, weights).reconstruct(x, classes)
        np.testing.assert_allclose(recon, reference.reconstruct(spec, weights, x, classes), atol=1e-4)


def test_an_unknown_arch_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(["train", "--arch", "capsnet9000", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "capsnet9000")
    assert not (tmp_path / "r").exists()


def test_a_preset_with_the_wrong_head_is_one_line(tmp_path, capsys):
    args = ["train", "--arch", "sabour2017", "--head", "pool", "--out", tmp_path / "r"]
    code, out, err = run_cli(args, capsys)
    assert_one_line_error(code, out, err, "--arch sabour2017 has a capsule head")
    assert not (tmp_path / "r").exists()


@pytest.mark.torch
def test_the_multimnist_preset_trains_on_composites_only(tmp_path, capsys, mnist_dir):
    """efficient-multimnist needs 29x29 images at least: on 28x28 digits train and experiment refuse in
    one line that points to --compose overlap (making nothing); with it, it trains on the 36x36 canvas,
    eval-pairs scores overlap pairs while vertical pairs are refused in one line, and an experiment leaves
    out the standard test with a note."""
    small = ["--data-dir", mnist_dir, "--limit", "32", "--epochs", "1", "-q"]
    for cmd in (["train"], ["experiment", "pairs"]):
        args = [*cmd, "--arch", "efficient-multimnist", *small, "--out", tmp_path / "r"]
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, "28x28, too small for the model", "--compose overlap")
        assert not (tmp_path / "r").exists()
    # ablate has no --compose: it points to the experiment that has
    code, out, err = run_cli(["experiment", "ablate", "--arch", "efficient-multimnist", *small, "--out",
                              tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "`capsctl experiment pairs --compose overlap` trains it")
    assert not (tmp_path / "r").exists()
    run = tmp_path / "mm"
    code, out, err = run_cli(["train", "--arch", "efficient-multimnist", "--compose", "overlap", *small,
                              "--eval-limit", "32", "--out", run], capsys)
    assert code == 0, err
    model = run / "model.safetensors"
    code, out, err = run_cli(["eval-pairs", model, "--data-dir", mnist_dir, "--layout", "overlap",
                              "--limit", "20", "--json"], capsys)
    assert code == 0 and json.loads(out)["pairs"] == 20, err
    code, out, err = run_cli(["eval-pairs", model, "--data-dir", mnist_dir, "--limit", "20"], capsys)
    assert_one_line_error(code, out, err, "56x28")
    # the command it suggests scores the same images (it dropped the data options)
    code, out, err = run_cli(["eval", model, "--data-dir", mnist_dir, "--limit", "20"], capsys)
    again = f"capsctl eval-pairs {model} --layout overlap --data-dir {mnist_dir}"
    assert_one_line_error(code, out, err, again)
    # an experiment says which tests it leaves out, once it has passed every check
    code, out, err = run_cli(["experiment", "pairs", "--arch", "efficient-multimnist", "--compose", "overlap",
                              *small, "--eval-limit", "20", "--seeds", "0", "--tests", "test,overlap",
                              "--out", tmp_path / "x"], capsys)
    assert code == 0 and "leaving out test" in err, err
    results = json.loads((tmp_path / "x" / "results.json").read_text())
    assert list(results["models"][0]["tests"]) == ["overlap"]


@pytest.mark.parametrize("shared", [True, False])
def test_primary_capsules_that_do_not_fit_the_image_are_one_line(shared, tmp_path, capsys):
    spec = preset("sabour2017").to_dict()
    spec["capsule"]["primary"]["kernel"] = 25  # 28x28 -> 20x20 after the first conv: no 25x25 window
    spec["capsule"]["shared"] = shared
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    code, out, err = run_cli(
        ["train", "--spec", path, "--limit", "20", "--epochs", "1", "--out", tmp_path / "r"], capsys
    )
    assert_one_line_error(code, out, err, "28x28", "too small for")
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_a_spec_file_refines_a_preset(tmp_path, capsys, monkeypatch):
    """--arch with --spec: the file's top-level fields replace the preset's (here, a smaller capsule)."""
    from capsctl.cli import _train

    path = tmp_path / "spec.json"
    caps = preset("sabour2017").to_dict()["capsule"]
    path.write_text(json.dumps({"capsule": {**caps, "dim": 4}}))
    spec = _train._spec(path, "capsule", None, None, None, None, "sabour2017")[0]
    assert spec.capsule.dim == 4 and spec.capsule.primary == preset("sabour2017").capsule.primary
    assert spec.trunk == preset("sabour2017").trunk and spec.decoder == preset("sabour2017").decoder


def test_model_options_left_out_keep_the_preset_and_given_ones_replace_it():
    from capsctl.cli import _train

    kept = _train._spec(None, "capsule", None, None, None, None, "sabour2017")[0]
    assert kept == preset("sabour2017")
    # --shared given explicitly is applied (it was ignored when it was the option's default value)
    assert _train._spec(None, "capsule", None, None, None, True, "sabour2017")[0].capsule.shared is True
    assert _train._spec(None, "capsule", None, None, None, False, "seed")[0].capsule.shared is False
    changed = _train._spec(None, "capsule", "su", "efficient", 2, None, "sabour2017")[0].capsule
    assert (changed.routing, changed.squash, changed.routings) == ("su", "efficient", 2)
    from capsctl.errors import CapsctlError

    with pytest.raises(CapsctlError, match="^--shared with --arch efficient: .*attention"):  # names --shared
        _train._spec(None, "capsule", None, None, None, True, "efficient")[0]
    # attention runs in one pass: --routings was recorded and did nothing (inspect refuses it likewise)
    with pytest.raises(CapsctlError, match="^--routings: attention routing runs in one pass"):
        _train._spec(None, "capsule", None, None, 4, None, "efficient")[0]
    with pytest.raises(CapsctlError, match="^--routings: attention routing"):
        _train._spec(None, "capsule", "attention", None, 2, False, "seed")[0]
    not_attention = _train._spec(None, "capsule", "su", None, 2, None, "efficient")[0]
    assert not_attention.capsule.routings == 2


def test_a_spec_file_giving_routing_iterations_to_attention_is_refused(tmp_path):
    """--routings with attention routing was refused, but a --spec file saying capsule.routings 5 was taken:
    recorded, without effect, and counted as 5 iterations of dynamic routing in the FLOPs."""
    from capsctl.cli import _train
    from capsctl.errors import CapsctlError

    caps = preset("efficient").to_dict()["capsule"]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"capsule": {**caps, "routings": 5}}))
    with pytest.raises(CapsctlError, match="capsule.routings 5 with attention routing, which runs in one"):
        _train._spec(path, "capsule", None, None, None, None, "efficient")
    assert _train._spec(path, "capsule", "su", None, None, None, "efficient")[0].capsule.routings == 5
    path.write_text(json.dumps({"capsule": {**caps, "routings": 1}}))
    kept = _train._spec(path, "capsule", None, None, None, None, "efficient")[0]
    assert kept.capsule.routing == "attention"


def test_an_input_count_with_shared_weights(tmp_path):
    """A --spec with shared weights and capsule.num_inputs (recorded, unused) is refused; --shared on a
    per-position spec drops its input count and size; a model file holding both still opens."""
    from capsctl.cli import _train
    from capsctl.errors import CapsctlError
    from capsctl.model.weights import init_weights, load_model, save_model

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"capsule": {"shared": True, "num_inputs": 7}}))
    with pytest.raises(CapsctlError, match="^--spec: capsule.num_inputs is for per-position weights"):
        _train._spec(path, "capsule", None, None, None, None)[0]
    assert _train._spec(path, "capsule", None, None, None, False)[0].capsule.num_inputs == 7
    path.write_text(json.dumps({"capsule": {"shared": False, "num_inputs": 64, "image_size": [28, 28]}}))
    shared = _train._spec(path, "capsule", None, None, None, True)[0].capsule
    assert (shared.shared, shared.num_inputs, shared.image_size) == (True, None, None)
    old = ModelSpec().with_capsule(num_inputs=7)  # (what `--spec F --shared` saved before)
    save_model(tmp_path / "old.safetensors", old, init_weights(old, 0))
    assert load_model(tmp_path / "old.safetensors")[0].capsule.num_inputs == 7


@pytest.mark.torch
def test_eval_pairs_refuses_a_non_shared_preset_in_one_line(tmp_path, capsys, mnist_dir):
    spec = filled("sabour2017").replace(decoder=None)
    model = tmp_path / "m.safetensors"
    save_model(model, spec, routing_weights(spec, seed=0))
    code, out, err = run_cli(["eval-pairs", model, "--data-dir", mnist_dir, "--limit", "10"], capsys)
    assert_one_line_error(code, out, err, "not shared", "56x28 composites need a shared-weight model")


def test_a_multimnist_model_is_pointed_at_the_overlap_pairs_and_an_image_at_the_resize_that_fits(
        tmp_path, capsys, mnist_dir):
    from PIL import Image

    spec = filled("efficient-multimnist")  # 36x36 composites: too big a grid for 28x28 digits alone
    model = tmp_path / "mm.safetensors"
    save_model(model, spec, routing_weights(spec, seed=0))
    for args in (["eval", model], ["eval-pairs", model, "--layout", "vertical"]):
        code, out, err = run_cli([*args, "--data-dir", mnist_dir, "--eval-limit", "10"], capsys)
        assert_one_line_error(code, out, err, str(model), f"capsctl eval-pairs {model} --layout overlap")
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(image)
    code, out, err = run_cli(["inspect", model, image, "--resize", "20x20"], capsys)
    assert_one_line_error(code, out, err, "try --resize 36x36")
    sabour = filled("sabour2017").replace(decoder=None)
    save_model(tmp_path / "s.safetensors", sabour, routing_weights(sabour, seed=0))
    code, out, err = run_cli(["predict", tmp_path / "s.safetensors", image, "--json"], capsys)
    assert code == 2 and "try --resize 28x28" in out and "Traceback" not in err


def test_flops_count_the_strided_convolutions_and_the_primary_capsules():
    from capsctl.model.flops import count

    f = count(filled("sabour2017"))
    assert f.convs == (2 * 9 * 9 * 1 * 256 * 20 * 20,)  # Conv 256 9x9 on 28x28 -> 20x20
    assert f.primary == 2 * 9 * 9 * 256 * 256 * 6 * 6  # 9x9 stride 2 -> 6x6, 32 types x 8 dims
    assert f.predictions == 2 * 1152 * 8 * 10 * 16  # û = W u for every input-output pair
    assert f.head == f.primary + f.predictions + f.routing
    # depthwise primary capsules: one 9x9 filter per channel, 128 channels, 1x1 output
    assert count(filled("efficient")).primary == 2 * 9 * 9 * 128 * 1 * 1 * 1


def test_experiments_build_the_preset_as_train_does(tmp_path):
    from capsctl.experiment.plan import DataFacts, Overrides, make_job

    facts = DataFacts(classes=tuple("0123456789"), shape=(28, 28, 1))
    job = make_job(tmp_path, "torch", "mnist-5k", "default", "capsule", 1, None, Overrides(), data=facts,
                   arch="efficient")
    assert job.spec == filled("efficient") and job.run.name == "torch-default-efficient-capsule-s1"
    seed = make_job(tmp_path, "torch", "mnist-5k", "default", "capsule", 1, None, Overrides(), data=facts)
    assert seed.spec == filled("seed") and seed.run.name == "torch-default-capsule-s1"  # unchanged names
    decoder = make_job(tmp_path, "torch", "mnist-5k", "default", "capsule+decoder", 0, None, Overrides(),
                       data=facts, arch="sabour2017")
    assert decoder.spec == filled("sabour2017")


def test_experiments_on_a_fixed_size_preset_score_the_standard_test_only(tmp_path, capsys):
    from capsctl.cli._experiment import _for_arch

    heads, tests, note = _for_arch("sabour2017", ["capsule", "pool"], ["test", "vertical", "overlap"])
    assert heads == ["capsule"] and tests == ["test"]
    assert note is not None and "leaving out vertical, overlap" in note
    assert _for_arch("seed", ["capsule", "pool"], ["vertical"]) == (["capsule", "pool"], ["vertical"], None)
    code, out, err = run_cli(["experiment", "pairs", "--arch", "efficient", "--heads", "pool",
                              "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--arch efficient has a capsule head only")
    # given explicitly, even as the default list (capsule,pool): pool was dropped without a word
    code, out, err = run_cli(["experiment", "pairs", "--arch", "efficient", "--heads", "capsule,pool",
                              "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--arch efficient has a capsule head only")
    code, out, err = run_cli(["experiment", "ablate", "--arch", "efficient", "--tests", "vertical",
                              "--out", tmp_path / "x"], capsys)
    assert code == 2 and "it can score only test" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    # a preset with a decoder of its own: --decoder would train the same model twice
    code, out, err = run_cli(["experiment", "pairs", "--arch", "sabour2017", "--decoder",
                              "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--decoder", "sabour2017 has a decoder already")
    assert not (tmp_path / "x").exists()
    # attention runs in one pass: --routings would train the same capsule model again, as `train` refuses
    for extra in (["--arch", "efficient"], ["--arch", "efficient", "--routing", "attention"]):
        code, out, err = run_cli(["experiment", "pairs", *extra, "--routings", "2", "--out", tmp_path / "x"],
                                 capsys)
        assert_one_line_error(code, out, err, "--routings: attention routing runs in one pass")
    assert not (tmp_path / "x").exists()


def test_the_ablation_plot_falls_back_to_the_standard_test_without_pair_tests():
    from capsctl.experiment.plots import ablate_measure

    scored = {"test": {"accuracy": 0.9}, "vertical": {"accuracy": 0.5}, "horizontal": {"accuracy": 0.7}}
    label, measure = ablate_measure({"tests": ["test", "vertical", "horizontal"]})
    assert label == "paired accuracy %" and measure(scored) == pytest.approx(0.6)
    label, measure = ablate_measure({"tests": ["test"]})  # a fixed-size preset: the standard test only
    assert "accuracy" in label and "paired" not in label and measure({"test": {"accuracy": 0.9}}) == 0.9


def test_the_resize_hint_names_a_size_that_gives_the_models_capsules():
    from capsctl.model.fit import resize_hint

    assert resize_hint(filled("sabour2017")) == "try --resize 28x28"
    assert resize_hint(filled("efficient-multimnist")) == "try --resize 36x36"
    assert resize_hint(filled("seed")) == "try --resize 28x28"
    wide = for_images("sabour2017", 28, 56)  # no square image gives its 3,840 input capsules: recorded
    assert wide.capsule.image_size == (28, 56) and resize_hint(wide) == "try --resize 28x56"
    old = wide.with_capsule(image_size=None)  # a file written before the size was recorded
    assert resize_hint(old) == "try --resize to the size it was trained on (3840 input capsules)"
    assert filled("sabour2017").capsule.image_size is None  # square: N gives it (files keep their JSON)
    assert "image_size" not in filled("sabour2017").to_json()


def test_a_square_size_that_n_alone_does_not_give_back_is_recorded():
    """The seed trunk's 2x2 pool maps 36 and 37 (32 and 33) to one N: a non-shared model trained on the
    36x36 composites was exported to ONNX for 37x37 images, and refused the images it was trained on."""
    from capsctl.model.fit import with_training_inputs

    unshared = ModelSpec().with_capsule(shared=False)
    for side in (32, 33, 36, 37, 40):
        spec = with_training_inputs(unshared, side, side, composed=side == 36)
        assert spec.fixed_input_size() == (side, side) and ModelSpec.from_json(spec.to_json()) == spec
    assert with_training_inputs(unshared, 28, 28, composed=False).capsule.image_size is None  # (as before)
    assert for_images("efficient-multimnist").capsule.image_size is None  # 29 to 36 give N: 36 comes back
    # a file written before: N alone, the common size (the MultiMNIST canvas, CIFAR-10) before the largest
    assert unshared.with_capsule(num_inputs=144).fixed_input_size() == (36, 36)
    assert unshared.replace(in_channels=3).with_capsule(num_inputs=100).fixed_input_size() == (32, 32)


def test_a_hand_written_n_gets_its_training_size_recorded_and_must_agree_with_a_given_size():
    """A --spec file giving capsule.num_inputs (as an exported spec does) kept N alone: the training size
    was never recorded, so the transposed grid was taken and ONNX export had no size. And a num_inputs that
    its image_size does not give described a model that takes no image at all."""
    from capsctl.errors import CapsctlError
    from capsctl.model.fit import with_training_inputs

    unshared = ModelSpec().with_capsule(shared=False)
    n = unshared.capsule_count(28, 40)
    assert n == unshared.capsule_count(40, 28)  # (the transposed grid gives the same N)
    trained = with_training_inputs(unshared.with_capsule(num_inputs=n), 28, 40, composed=False)
    assert trained.capsule.image_size == (28, 40) and trained.fixed_input_size() == (28, 40)
    assert trained.takes_size(28, 40) and not trained.takes_size(40, 28)
    other = unshared.with_capsule(num_inputs=n + 1)  # one the images don't give: check_fit refuses it
    assert with_training_inputs(other, 28, 40, composed=False) == other
    with pytest.raises(CapsctlError, match="num_inputs is 1152 but capsule.image_size 40x40 gives 4608"):
        preset("sabour2017").with_capsule(num_inputs=1152, image_size=(40, 40))
    with pytest.raises(CapsctlError, match="image_size 8x8 gives 0"):  # (too small for the trunk)
        preset("sabour2017").with_capsule(num_inputs=1152, image_size=(8, 8))
    assert preset("sabour2017").with_capsule(num_inputs=1152, image_size=(28, 28)).takes_size(28, 28)


@pytest.mark.parametrize("name", ["efficient", "sabour2017"])
def test_per_position_weights_take_their_training_grid_not_its_transpose(name, tmp_path, capsys):
    """Trained on 32x40 images, a model with per-position capsule weights refuses 40x32 ones, which give
    as many input capsules in a transposed grid (they were scored, rc 0, by predict, eval and inspect)."""
    from capsctl.errors import CapsctlError
    from capsctl.model.fit import check_fit
    from capsctl.model.spec import ModelSpec

    spec = for_images(name, 32, 40)
    assert spec.capsule.image_size == (32, 40) and ModelSpec.from_json(spec.to_json()) == spec
    assert spec.capsule_count(40, 32) == spec.capsule_count(32, 40)
    assert spec.takes_size(32, 40) and not spec.takes_size(40, 32)
    check_fit(spec, np.zeros((1, 32, 40, 1), np.float32), None, "m", "images")
    with pytest.raises(CapsctlError, match=r"\(of 32x40 images\) but 40x32 images give their input capsules "
                                           r"in another grid"):
        check_fit(spec, np.zeros((1, 40, 32, 1), np.float32), None, "m", "images")
    if name == "efficient":  # (sabour2017's 8.2M weights: one model file is enough)
        from PIL import Image

        from capsctl.model.weights import init_weights, save_model

        from ._helpers import run_cli

        model = tmp_path / "m.safetensors"
        save_model(model, spec, init_weights(spec, 0))
        Image.fromarray(np.zeros((40, 32), np.uint8)).save(tmp_path / "tall.png")
        code, out, _ = run_cli(["predict", model, tmp_path / "tall.png", "--csv"], capsys)
        assert code == 2 and "in another grid" in out and "--resize 32x40" in out, out


def test_bench_arch_with_heads_given_measures_both_even_at_the_default_list(capsys, monkeypatch):
    from capsctl.bench import report

    seen = []
    monkeypatch.setattr(report, "run", lambda cfg, on_backend: seen.append(cfg.heads) or {})
    assert run_cli(["bench", "--arch", "efficient", "--json"], capsys)[0] == 0
    assert run_cli(["bench", "--arch", "efficient", "--heads", "capsule,pool,capsule+decoder", "--json"],
                   capsys)[0] == 0
    assert seen == [("arch:efficient",), ("capsule", "pool", "capsule+decoder", "arch:efficient")]


def test_bench_measures_a_preset_as_a_variant():
    from capsctl.bench.measure import BenchConfig, variant_size, variant_spec
    from capsctl.cli._bench import _variants
    from capsctl.errors import CapsctlError

    assert variant_spec("arch:sabour2017") == filled("sabour2017")
    assert variant_spec("arch:efficient-multimnist") == filled("efficient-multimnist")  # on 36x36
    assert (variant_size("arch:efficient-multimnist"), variant_size("arch:efficient")) == ((36, 36), (28, 28))
    assert _variants(["capsule", "pool"], False, ["efficient", "seed"]) == ("arch:efficient", "capsule")
    assert _variants(["pool"], True, ["efficient"]) == ("pool", "arch:efficient")
    BenchConfig(heads=("arch:efficient",)).validate()
    with pytest.raises(CapsctlError, match="unknown head"):
        BenchConfig(heads=("arch:resnet",)).validate()


def test_routing_maps_sit_over_the_pixels_the_capsules_see():
    from capsctl.inspect.analysis import grid_geometry

    # sabour2017: Conv 9x9 (centre 4), then 9x9 stride 2 primary capsules: grid g at pixel 8 + 2g
    assert grid_geometry(filled("sabour2017")) == (8.0, 2.0)
    # efficient: 5x5, 3x3, 3x3, 3x3 stride 2, then the 9x9 depthwise window: one place at pixel 13
    assert grid_geometry(filled("efficient")) == (13.0, 2.0)
    assert grid_geometry(filled("seed")) == (6.5, 2.0)  # unchanged
    # efficient-multimnist: 5x5 (centre 2), 3x3 (3), 3x3 stride 2 (4), 3x3 stride 2 (4 + 2 = 6, every 4th
    # pixel), then the 5x5 stride-2 depthwise window: 6 + 2·4 = 14, every 8th pixel
    assert grid_geometry(filled("efficient-multimnist")) == (14.0, 8.0)
