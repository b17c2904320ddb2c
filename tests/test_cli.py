"""The command line end to end on real MNIST images (a few hundred, one epoch)."""

from __future__ import annotations

import json

import pytest

from capsctl.model.weights import load_model

from ._helpers import assert_one_line_error, run_cli

COMMANDS = (["train"], ["eval"], ["eval-pairs"], ["data", "list"], ["data", "fetch"], ["export"],
            ["import"], ["inspect"], ["predict"], ["bench"], ["experiment", "pairs"],
            ["experiment", "ablate"], ["experiment", "report"], ["experiment", "merge"])


def test_every_command_is_registered_and_has_help(capsys):
    # every command is part of the CLI: a missing command module is an error here, never a skip elsewhere
    from capsctl.cli import app

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == {cmd[0] for cmd in COMMANDS}
    for cmd in COMMANDS:
        code, out, _ = run_cli([*cmd, "--help"], capsys)
        assert code == 0 and "Usage" in out, cmd


@pytest.mark.torch
@pytest.mark.parametrize("head", ["capsule", "pool"])
def test_train_eval_and_pairs_end_to_end(tmp_path, capsys, mnist_dir, head):
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", "--head", head, "--data-dir", mnist_dir, "--limit", "384", "--epochs", "1",
         "--batch-size", "64", "--out", run, "-q", "--test-limit", "500"], capsys)
    assert code == 0, err
    assert "epoch 1/1" in err and "test" in err
    spec, _ = load_model(run / "model.safetensors")
    assert spec.head == head
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert rows[0]["images_per_s"] > 0
    assert (run / "checkpoint.safetensors").exists()

    code, out, _ = run_cli(["eval", run / "model.safetensors", "--data-dir", mnist_dir, "--limit", "300",
                            "--json"], capsys)
    assert code == 0
    assert json.loads(out)["images"] == 300

    code, out, _ = run_cli(["eval-pairs", run / "model.safetensors", "--data-dir", mnist_dir,
                            "--limit", "200", "--json", "--layout", "horizontal", "--seed", "3"], capsys)
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"pairs", "accuracy", "confident_accuracy", "seed", "layout", "digits", "per_class",
                           "dataset", "backend", "split"}
    assert result["split"] == "test"
    assert list(result["per_class"]) == [str(d) for d in range(10)]  # a model without names: digits
    assert result["pairs"] == 200 and result["layout"] == "horizontal"
    assert result["seed"] == 3 and result["digits"] == 2
    assert 0 <= result["confident_accuracy"] <= result["accuracy"] <= 1

    code, out, _ = run_cli(["eval-pairs", run / "model.safetensors", "--data-dir", mnist_dir,
                            "--limit", "50"], capsys)
    assert code == 0 and "accuracy" in out and "50" in out

    # the same folder again is refused (it would overwrite a run), naming --resume
    code, out, err = run_cli(["train", "--head", head, "--data-dir", mnist_dir, "--limit", "64",
                              "--epochs", "1", "--out", run], capsys)
    assert_one_line_error(code, out, err, "--resume")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--routings", "0"], "capsule.routings"),
        (["train", "--routing", "em"], "--routing"),
        (["train", "--head", "dense"], "--head"),
        (["train", "--backend", "jax"], "unknown backend"),
        (["train", "--recipe", "magic"], "--recipe"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--dataset", "cifar"], "--dataset"),
        (["eval-pairs", "absent.safetensors"], "no such file"),
        (["eval-pairs", "x.safetensors", "--digits", "1"], "--digits"),
        (["train", "--epochs", "many"], "--epochs"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(tmp_path, capsys, mnist_dir, args, message):
    extra = ["--data-dir", mnist_dir]
    if args[0] == "train":
        extra += ["--out", tmp_path / "r"]
    code, out, err = run_cli([*args, *extra], capsys)
    assert_one_line_error(code, out, err, message)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_a_table_written_to_a_pipe_is_not_cut_at_80_columns():
    """Piped or redirected, Rich laid tables out for 80 columns: `capsctl data list | cat` cut its cells
    ("…"), an experiment's Markdown tables were hard-wrapped."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "capsctl", "data", "list"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    assert any("(32x32 RGB, 50,000 + 10,000 images; 162 MiB)" in line for line in done.stdout.splitlines())


def test_a_closed_stdout_is_not_a_traceback():
    """`capsctl ... >&-`: Python sets sys.stdout to None, and the console's isatty() raised an
    AttributeError traceback on import, before any command (even --help) ran."""
    import shlex
    import subprocess
    import sys

    for args in (["--help"], ["eval", "--help"], ["data", "list"]):
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "capsctl", *args]) + " >&-"
        done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
