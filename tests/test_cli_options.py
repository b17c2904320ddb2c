"""The command line speaks one language: Enum choices from the library's own tuples, one name per
concept (old names still accepted, hidden), --json on train and data list, global --debug/--version,
and `capsctl --help` importing no numpy or framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ._helpers import TINY, assert_one_line_error, run_cli

COMMANDS = {"train", "eval", "eval-pairs", "export", "import", "inspect", "predict", "bench", "experiment",
            "data"}


# -- choices come from one place ------------------------------------------------------------------------

def test_every_choice_enum_is_the_librarys_tuple():
    from capsctl import backend, choices
    from capsctl.cli import _options as o
    from capsctl.data import composites, datasets, images
    from capsctl.experiment import plan
    from capsctl.inspect import analysis
    from capsctl.model import spec
    from capsctl.training import recipes

    def values(enum) -> tuple[str, ...]:
        return tuple(m.value for m in enum)

    assert values(o.Head) == spec.HEADS
    assert values(o.Routing) == spec.ROUTINGS
    assert values(o.Squash) == spec.SQUASHES
    assert values(o.Recipe) == tuple(recipes.RECIPES)
    assert values(o.Schedule) == recipes.SCHEDULES
    assert values(o.Layout) == composites.LAYOUTS
    assert values(o.Order) == analysis.DIRECTIONS
    assert values(o.Invert) == images.INVERT_CHOICES
    assert values(o.Test) == plan.ALL_TESTS
    assert values(o.Format) == choices.EXPORT_FORMATS
    # the two names lists kept beside modules that import numpy
    assert values(o.Dataset) == tuple(datasets.DATASETS)
    assert set(choices.BUILTIN_BACKENDS) == set(backend.BUILTIN)
    assert str(o.Head("pool")) == "pool" and f"{o.Layout('overlap')}" == "overlap"


def test_every_command_module_is_registered():
    from capsctl.cli import app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == COMMANDS


@pytest.mark.parametrize(("command", "shown"), [
    (["train"], ["<capsule|pool>", "<su|sabour|su-unit|attention>", "<seed|default|default-2026-11>",
                 "<constant|onecycle>",
                 "<mnist-5k|mnist|fashion-mnist|cifar10|PATH>", "<torch|keras>", "Model", "Data", "Recipe",
                 "Run", "--eval-limit", "--json"]),
    (["eval-pairs"], ["<vertical|horizontal|overlap>", "--eval-limit", "--batch-size"]),
    (["inspect"], ["<auto|yes|no>", "<auto|top-to-bottom|left-to-right>", "MODEL", "IMAGE"]),
    (["export"], ["<torch|keras|onnx>"]),
    (["bench"], ["--backends", "--heads", "<capsule|pool|capsule+decoder>,...", "--batch-size",
                 "--infer-batch-size"]),
    (["experiment", "ablate"], ["--routings", "--eval-routings", "<su|sabour|su-unit|attention>,..."]),
    (["experiment", "pairs"], ["--heads", "--seeds", "--tests", "<su|sabour|su-unit|attention>"]),
    (["data", "list"], ["--json"]),
])
def test_help_lists_the_choices_and_hides_old_names(capsys, monkeypatch, command, shown):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    for text in shown:
        assert text in out, text
    for old in ("--test-limit", "--iterations", "--eval-iterations", "--batch ", "--infer-batch ", "--model",
                "--limit"):
        if old == "--limit" and command[0] in ("train", "experiment"):
            continue  # --limit is the training-image limit there
        assert old not in out, old


# -- a bad choice is Typer's usage error, before anything is created ------------------------------------

@pytest.mark.parametrize(("args", "fragments"), [
    (["train", "--head", "dense"], ["--head", "'dense'", "'capsule', 'pool'"]),
    (["train", "--schedule", "cosine"], ["--schedule", "'cosine'"]),
    (["eval-pairs", "m.safetensors", "--layout", "diagonal"], ["--layout", "'diagonal'"]),
    (["inspect", "m.safetensors", "x.png", "--order", "sideways"], ["--order", "'sideways'"]),
    (["export", "m.safetensors", "--out", "m.x", "--format", "caffe"], ["--format", "'caffe'"]),
    (["bench", "--heads", "capsule,dense"], ["--heads", "'dense'"]),
    (["bench", "--backends", "torch,jax"], ["--backends", "unknown backend 'jax'"]),
    (["experiment", "pairs", "--heads", "pool,dense"], ["--heads", "'dense'"]),
    (["experiment", "pairs", "--tests", "test,diagonal"], ["--tests", "'diagonal'"]),
    (["experiment", "pairs", "--seeds", "0,x"], ["--seeds", "integers"]),
    (["experiment", "ablate", "--routing", "su,em"], ["--routing", "'em'"]),
    (["experiment", "ablate", "--routings", "0,3"], ["--routings", "outside 1..100"]),
    (["data", "fetch", "cifar"], ["dataset", "'cifar'"]),
])
def test_bad_choices_are_usage_errors(tmp_path, capsys, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*args, "--out", tmp_path / "out"] if args[0] == "experiment" else args, capsys)
    assert_one_line_error(code, out, err, *fragments, "(see `capsctl")
    assert "Value error" not in err
    assert list(tmp_path.iterdir()) == []


def test_comma_lists_and_repeated_options_mean_the_same():
    from capsctl.cli._options import Head, Routing, ints_callback, names_callback

    split = names_callback(Routing)
    assert split(["su,sabour"]) == split(["su", "sabour"]) == split([" su , sabour,su"]) == ["su", "sabour"]
    assert names_callback(Head)(None) is None
    ints = ints_callback("--routings", 1, 100)
    assert ints(["1-3,8"]) == ints(["1-3", "8"]) == [1, 2, 3, 8]


# -- old names still work --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    spec = ModelSpec.from_dict(TINY)
    save_model(path, spec, init_weights(spec, 0))
    return path


@pytest.mark.torch
def test_eval_limit_and_its_old_name(capsys, mnist_dir, tiny_model):
    results = []
    for flag in ("--eval-limit", "--limit"):
        code, out, err = run_cli(["eval", tiny_model, "--data-dir", mnist_dir, flag, "30", "--json"], capsys)
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1] and results[0]["images"] == 30
    code, out, err = run_cli(["eval-pairs", tiny_model, "--data-dir", mnist_dir, "--limit", "12", "--json"],
                             capsys)
    assert code == 0 and json.loads(out)["pairs"] == 12, err
    code, out, err = run_cli(["eval", tiny_model, "--data-dir", mnist_dir, "--eval-limit", "30",
                              "--limit", "40"], capsys)
    assert_one_line_error(code, out, err, "--limit is the old name of --eval-limit")


@pytest.mark.torch
def test_inspect_takes_model_then_image_and_the_old_form(tmp_path, capsys, tiny_model):
    image = tmp_path / "digit.npy"
    np.save(image, np.random.default_rng(0).random((28, 28), dtype=np.float32))
    code, new, err = run_cli(["inspect", tiny_model, image, "--json", "--top", "2"], capsys)
    assert code == 0, err
    code, old, err = run_cli(["inspect", image, "-m", tiny_model, "--json", "--top", "2"], capsys)
    assert code == 0, err
    assert json.loads(new) == json.loads(old) and json.loads(new)["model"] == str(tiny_model)
    code, out, err = run_cli(["inspect", tiny_model], capsys)
    assert_one_line_error(code, out, err, "IMAGE", "capsctl inspect MODEL IMAGE")
    code, out, err = run_cli(["inspect", image, "--json"], capsys)  # an image alone: the shipped model
    assert code == 0 and "shipped model" in err
    assert json.loads(out)["model"].endswith("capsule-mnist5k.safetensors")
    code, out, err = run_cli(["inspect", tiny_model, image, "-m", tiny_model], capsys)
    assert_one_line_error(code, out, err, "not both")


# -- --json on train and data list -----------------------------------------------------------------------

@pytest.mark.torch
def test_the_previous_default_recipe_runs_by_name(tmp_path, capsys, mnist_dir):
    from capsctl.training.run_folder import load_checkpoint

    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--recipe", "default-2026-11", "--data-dir", mnist_dir, "--limit", "64",
                            "--eval-limit", "20", "--epochs", "1", "-q", "--out", run], capsys)
    assert code == 0, err
    cfg = load_checkpoint(run).config
    # the settings the default had until 2026-11-29 (batch 128, ±4 px, peak 3e-3), recorded under that name
    assert (cfg.recipe, cfg.batch_size, cfg.shift, cfg.lr, cfg.schedule) == (
        "default-2026-11", 128, 4, 3e-3, "onecycle")


@pytest.mark.torch
def test_train_json_and_resume_refuses_settings_it_would_ignore(tmp_path, capsys, mnist_dir):
    from capsctl.training.recipes import get_recipe
    from capsctl.training.run_folder import load_checkpoint

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--spec", spec, "--data-dir", mnist_dir, "--limit", "64",
                              "--batch-size", "32", "--eval-limit", "20", "--epochs", "1", "-q", "--out", run,
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(run / "model.safetensors") and result["epoch"] == 1 == result["epochs"]
    assert 0 <= result["test_accuracy"] <= 1 and result["backend"] == "torch" and result["head"] == "capsule"
    cfg = load_checkpoint(run).config
    assert cfg.data_dir == str(mnist_dir.absolute()) and cfg.eval_limit == 20
    default = get_recipe("default")
    assert (cfg.epochs, cfg.shift, cfg.batch_size, cfg.recipe) == (1, default.shift, 32, "default")

    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_cli(["train", "--resume", run, "--epochs", "3", "--lr", "0.1"], capsys)
    assert_one_line_error(code, out, err, "leave out --epochs, --lr")
    code, out, err = run_cli(["train", "--resume", run, "--no-decoder", "--no-shared"], capsys)
    assert_one_line_error(code, out, err, "leave out --no-shared, --no-decoder")  # (as given, not --decoder)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # --head with a --spec file that names no head: the model gets that head (it was ignored); with a file
    # that names another, refused
    (tmp_path / "headless.json").write_text(json.dumps({"trunk": TINY["trunk"]}))
    code, out, err = run_cli(["train", "--spec", tmp_path / "headless.json", "--head", "pool", "--data-dir",
                              mnist_dir, "--limit", "32", "--eval-limit", "20", "--epochs", "1", "-q",
                              "--out", tmp_path / "pool", "--json"], capsys)
    assert code == 0 and json.loads(out)["head"] == "pool", err
    code, out, err = run_cli(["train", "--spec", spec, "--head", "pool", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--head pool, but the --spec file says head 'capsule': give one")
    code, out, err = run_cli(["train", "--spec", tmp_path / "headless.json", "--head", "pool", "--decoder",
                              "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--decoder needs the capsule head (the model's head is pool)")
    assert not (tmp_path / "x").exists()
    code, out, err = run_cli(["train", "--resume", run, "--json"], capsys)  # nothing left to do
    assert code == 0, err
    assert json.loads(out)["epoch"] == 1


def test_data_list_json(capsys, mnist_dir):
    code, out, _ = run_cli(["data", "list", "--data-dir", mnist_dir, "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["datasets"]}
    assert rows["mnist"]["found"] is True and rows["mnist"]["folder"] == str(mnist_dir)
    assert rows["mnist"]["found_in"] == "--data-dir"
    code, out, _ = run_cli(["data", "list", "--json"], capsys)  # (the test cache is empty)
    assert code == 0
    for row in json.loads(out)["datasets"]:
        if row["name"] == "mnist-5k":  # shipped inside the package: always found, never downloaded
            assert row["found_in"] == "embedded" and row["mirrors"] == 0
        elif row["found"]:  # only from a system package (Debian's dataset-fashion-mnist, where installed)
            assert row["found_in"] == "system package" and row["folder"].startswith("/usr/share/datasets/")
        else:
            assert row["found"] is False and row["folder"] is None and row["mirrors"] >= 1


# -- global options; --help stays light -----------------------------------------------------------------

def _capsctl(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    prog = ("import sys\nfrom capsctl.cli import main\n"
            f"try:\n    main({list(args)!r})\nfinally:\n{code or '    pass'}\n")
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)


def test_help_and_version_import_no_framework():
    heavy = "    print(sorted(m for m in ('numpy', 'torch', 'tensorflow', 'keras') if m in sys.modules))"
    p = _capsctl("--help", code=heavy)
    assert p.returncode == 0 and "--debug" in p.stdout and "--version" in p.stdout
    assert p.stdout.strip().endswith("[]"), p.stdout[-200:]
    p = _capsctl("--version", code=heavy.replace("'numpy', ", ""))
    assert p.returncode == 0 and p.stdout.strip().endswith("[]"), p.stdout
    from capsctl import __version__

    lines = p.stdout.splitlines()
    assert lines[0] == f"capsctl {__version__}"
    assert any(line.startswith("torch backend: ") for line in lines)
    assert any(line.startswith("keras backend: ") for line in lines)


def test_debug_may_go_anywhere(tmp_path):
    from capsctl.cli import _split_debug

    assert _split_debug(["eval", "m", "--debug"]) == (True, ["--debug", "eval", "m"])
    assert _split_debug(["eval", "--", "--debug"]) == (False, ["eval", "--", "--debug"])
    p = _capsctl("eval", str(tmp_path / "absent.safetensors"), "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_train_suggests_next_a_command_the_model_can_run():
    """The last line of `capsctl train`: eval-pairs where the model takes a larger image, eval where its
    capsule weights are fixed to the training size (eval-pairs refuses those) or it has one class."""
    from capsctl.cli._train import _next_command
    from capsctl.model.presets import preset
    from capsctl.model.spec import ModelSpec

    assert _next_command(ModelSpec(), None) == "eval-pairs"
    assert _next_command(ModelSpec(head="pool"), None) == "eval-pairs"
    assert _next_command(preset("sabour2017"), None) == "eval"
    assert _next_command(preset("efficient"), None) == "eval"
    assert _next_command(preset("efficient-multimnist"), "overlap") == "eval-pairs --layout overlap"
    assert _next_command(ModelSpec(num_classes=1), None) == "eval"


# -- --help states each setting's range, and the range it states is the one enforced ----------------------

RANGED = [  # (command, option, what its help says, a value just outside it)
    (["train"], "--epochs", "at least 1", "0"),
    (["train"], "--batch-size", "1–65536", "65537"),
    (["train"], "--lr", "0 < LR ≤ 10", "10.5"),
    (["train"], "--shift", "0–14 px", "15"),
    (["train"], "--scale", "0–0.5", "0.51"),
    (["train"], "--weight-decay", "0 ≤ WD < 1", "1"),
    (["train"], "--recon-weight", "0–1000", "1001"),
    (["train"], "--routings", "1–100", "101"),
    (["experiment", "pairs"], "--epochs", "1–10000", "10001"),
    (["experiment", "pairs"], "--batch-size", "1–65536", "65537"),
    (["experiment", "pairs"], "--lr", "0 < LR ≤ 10", "0"),
    (["experiment", "pairs"], "--lr", "0 < LR ≤ 10", "10.5"),
    (["experiment", "pairs"], "--scale", "0–0.5", "0.51"),
    (["experiment", "pairs"], "--weight-decay", "0 ≤ WD < 1", "1"),
    (["experiment", "pairs"], "--shift", "0–14 px", "-1"),
    (["experiment", "pairs"], "--routings", "1–100", "0"),
    (["experiment", "ablate"], "--epochs", "1–10000", "0"),
    (["experiment", "ablate"], "--shift", "0–14 px", "15"),
    (["inspect"], "--routings", "1–100", "101"),
]


@pytest.mark.parametrize(("command", "option", "said", "outside"), RANGED)
def test_help_states_the_range_that_is_enforced(tmp_path, capsys, command, option, said, outside):
    import typer.main

    from capsctl.cli import app

    group = typer.main.get_command(app)
    cmd = group
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    param = next(p for p in cmd.params if option in p.opts)
    assert f"({said})" in param.help or f"; {said})" in param.help, param.help
    if command == ["inspect"]:
        from PIL import Image

        from capsctl.model.shipped import shipped_model

        Image.new("L", (28, 28)).save(tmp_path / "d.png")
        args = [shipped_model(), tmp_path / "d.png", "--out", tmp_path / "o"]
    else:
        args = ["--out", tmp_path / "o"]
    code, out, err = run_cli([*command, option, outside, *args], capsys)
    assert_one_line_error(code, out, err, option)
    assert not (tmp_path / "o").exists()


# (each edge of each stated range: the value on it is a valid setting, the nearest one past it is not)
EDGES = {
    "epochs": [(1, 0)],
    "batch_size": [(1, 0), (65536, 65537)],
    "lr": [(1e-12, 0.0), (10.0, 10.000001)],
    "shift": [(0, -1), (14, 15)],
    "scale": [(0.0, -1e-9), (0.5, 0.5000001)],
    "weight_decay": [(0.0, -1e-9), (0.999999, 1.0)],
    "recon_weight": [(0.0, -1e-9), (1000.0, 1000.000001)],
}


@pytest.mark.parametrize("key", sorted(EDGES))
def test_every_stated_range_is_the_checked_one_at_both_edges(key):
    from capsctl.errors import CapsctlError
    from capsctl.training.config import RANGE_TEXT, TrainConfig

    assert set(EDGES) == set(RANGE_TEXT)
    for inside, outside in EDGES[key]:
        TrainConfig(**{key: inside})  # (accepted)
        with pytest.raises(CapsctlError, match="--" + key.replace("_", "-")):
            TrainConfig(**{key: outside})
