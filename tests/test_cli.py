"""The command line end to end on real MNIST images (a few hundred, one epoch)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from capsctl.model.weights import load_model

from .conftest import run_cli


def test_help_imports_no_framework():
    code = (
        "import sys; from capsctl.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = sorted(m for m in ('torch', 'tensorflow', 'keras', 'numpy') if m in sys.modules)\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "IMPORTED []" in out
    assert "train" in out and "eval-pairs" in out


def test_every_command_has_help(capsys):
    for cmd in (["train"], ["eval"], ["eval-pairs"], ["data", "list"], ["data", "fetch"]):
        code, out, _ = run_cli([*cmd, "--help"], capsys)
        assert code == 0 and "Usage" in out


@pytest.mark.torch
@pytest.mark.parametrize("head", ["capsule", "pool"])
def test_train_eval_and_pairs_end_to_end(tmp_path, capsys, mnist_dir, head):
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", "--head", head, "--data-dir", mnist_dir, "--limit", "384", "--epochs", "1", "--batch-size", "64",
         "--out", run, "-q", "--test-limit", "500"], capsys)
    assert code == 0, err
    assert "epoch 1/1" in err and "test" in err
    spec, _ = load_model(run / "model.safetensors")
    assert spec.head == head
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert rows[0]["images_per_s"] > 0
    assert (run / "checkpoint.safetensors").exists()

    code, out, _ = run_cli(["eval", run / "model.safetensors", "--data-dir", mnist_dir, "--limit", "300", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["images"] == 300

    code, out, _ = run_cli(["eval-pairs", run / "model.safetensors", "--data-dir", mnist_dir, "--limit", "200", "--json",
                            "--layout", "horizontal", "--seed", "3"], capsys)
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"pairs", "accuracy", "confident_accuracy", "seed", "layout", "digits"}
    assert result["pairs"] == 200 and result["layout"] == "horizontal" and result["seed"] == 3 and result["digits"] == 2
    assert 0 <= result["confident_accuracy"] <= result["accuracy"] <= 1

    code, out, _ = run_cli(["eval-pairs", run / "model.safetensors", "--data-dir", mnist_dir, "--limit", "50"], capsys)
    assert code == 0 and "accuracy" in out and "50" in out

    # the same folder again is refused (it would overwrite a run), naming --resume
    code, _, err = run_cli(["train", "--head", head, "--data-dir", mnist_dir, "--limit", "64", "--epochs", "1", "--out", run], capsys)
    assert code == 2 and "--resume" in err


@pytest.mark.torch
def test_resume_continues_exactly(tmp_path, capsys, mnist_dir):
    """Two epochs straight == one epoch, stop, --resume: bit-identical weights.

    The 'stopped' run is made by training one epoch and raising the stored epoch count to two,
    which is what a run killed after its first epoch's checkpoint looks like. The constant
    schedule makes the one-epoch run's steps identical to the first epoch of the two-epoch run.
    """
    from dataclasses import replace

    from capsctl.training.run_folder import load_checkpoint, save_checkpoint

    args = ["train", "--data-dir", mnist_dir, "--limit", "256", "--batch-size", "64", "-q", "--schedule", "constant", "--test-limit", "100"]
    code, _, err = run_cli([*args, "--epochs", "2", "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*args, "--epochs", "1", "--out", tmp_path / "split"], capsys)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "split")
    assert (ck.epoch, ck.step) == (1, 0) and ck.optimizer["step"][0] == 4
    save_checkpoint(tmp_path / "split", replace(ck, config=replace(ck.config, epochs=2)))
    code, _, err = run_cli(["train", "--resume", tmp_path / "split", "-q", "--data-dir", mnist_dir, "--test-limit", "100"], capsys)
    assert code == 0, err
    assert "resuming" in err
    _, w_straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, w_resumed = load_model(tmp_path / "split" / "model.safetensors")
    for k in w_straight:
        assert np.array_equal(w_straight[k], w_resumed[k]), k
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--routings", "0"], "capsule.routings"),
        (["train", "--routing", "em"], "capsule.routing"),
        (["train", "--head", "dense"], "--head"),
        (["train", "--backend", "jax"], "unknown backend"),
        (["train", "--recipe", "magic"], "unknown recipe"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--dataset", "cifar"], "unknown dataset"),
        (["eval-pairs", "absent.safetensors"], "no such file"),
        (["eval-pairs", "x.safetensors", "--digits", "1"], "--digits"),
        (["train", "--epochs", "many"], "--epochs"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(tmp_path, capsys, mnist_dir, args, message):
    code, _, err = run_cli([*args, "--data-dir", mnist_dir, "--out", tmp_path / "r"] if args[0] == "train" else [*args, "--data-dir", mnist_dir], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
