"""Regression tests: `train --resume RUN` needs nothing but the run folder and honours --backend;
`experiment pairs --routing` takes one value; TrainConfig's defaults are the default recipe's."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest

from ._helpers import TINY, assert_one_line_error, metrics_rows, run_cli, stop_after_first_epoch


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.mark.torch
@pytest.mark.parametrize("give_data_dir", [False, True], ids=["run-folder-only", "data-dir-again"])
def test_resume_needs_only_the_run_folder(tmp_path, capsys, monkeypatch, mnist_dir, give_data_dir):
    """A run started with --data-dir and --test-limit, stopped after epoch 1 and resumed with
    `--resume RUN` alone, ends with the uninterrupted run's metrics rows and weights (giving
    --data-dir again changes nothing: the epochs are still scored on the first 40 test images)."""
    from capsctl.model.weights import load_model

    args = ["train", "--spec", _spec(tmp_path), "--data-dir", mnist_dir, "--limit", "96",
            "--batch-size", "32", "--test-limit", "40", "--epochs", "2", "--seed", "3", "-q"]
    code, _, err = run_cli([*args, "--out", tmp_path / "straight"], capsys)
    assert code == 0, err
    with monkeypatch.context() as m:
        stop_after_first_epoch(m)
        code, _, err = run_cli([*args, "--out", tmp_path / "split"], capsys)
    assert code == 130, err
    assert len(metrics_rows(tmp_path / "split")) == 1

    # elsewhere, with no --data-dir (the isolated cache is empty and downloads are blocked)
    monkeypatch.chdir(tmp_path)
    again = ["--data-dir", mnist_dir] if give_data_dir else []
    code, _, err = run_cli(["train", "--resume", "split", "-q", *again], capsys)
    assert code == 0, err
    assert metrics_rows(tmp_path / "split") == metrics_rows(tmp_path / "straight")
    _, straight = load_model(tmp_path / "straight" / "model.safetensors")
    _, resumed = load_model(tmp_path / "split" / "model.safetensors")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


@pytest.mark.torch
def test_resume_honours_an_explicit_backend(tmp_path, capsys, monkeypatch, mnist_dir):
    """--backend on --resume is honoured; without it the run's own backend is used."""
    import capsctl.backend
    from capsctl.training.run_folder import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--spec", _spec(tmp_path), "--data-dir", mnist_dir, "--limit", "64",
                            "--batch-size", "32", "--test-limit", "20", "--epochs", "1", "-q", "--out", run],
                           capsys)
    assert code == 0, err
    # the checkpoint is backend-neutral: make it a Keras run with one more epoch to go
    ck = load_checkpoint(run)
    save_checkpoint(run, replace(ck, config=replace(ck.config, backend="keras", epochs=2)))

    asked: list[str] = []
    real = capsctl.backend.get_backend

    def spy(name: str):
        asked.append(name)
        if name == "keras":  # enough to know which one was chosen; Keras itself is not needed
            from capsctl.errors import CapsctlError

            raise CapsctlError("keras chosen")
        return real(name)

    monkeypatch.setattr(capsctl.backend, "get_backend", spy)
    code, out, err = run_cli(["train", "--resume", run, "--data-dir", mnist_dir, "-q"], capsys)
    assert_one_line_error(code, out, err, "keras chosen")
    assert asked == ["keras"]

    asked.clear()
    code, _, err = run_cli(["train", "--resume", run, "--backend", "torch", "-q"], capsys)
    assert code == 0, err
    assert asked == ["torch"]
    assert load_checkpoint(run).config.backend == "torch"  # what ran is what the run records
    assert len(metrics_rows(run)) == 2


def test_pairs_routing_takes_one_value_and_creates_nothing(tmp_path, capsys, mnist_dir):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["experiment", "pairs", "--routing", "su,sabour", "--data-dir", mnist_dir,
                                 "--seeds", "0", "--epochs", "1", "--limit", "64", "--eval-limit", "20",
                                 "--heads", "capsule", "--out", out, "-q"], capsys)
    assert_one_line_error(code, stdout, err, "--routing", "'su,sabour'")
    assert not out.exists()


def test_train_config_defaults_are_the_default_recipe():
    from capsctl.training.config import TrainConfig
    from capsctl.training.recipes import get_recipe

    cfg = TrainConfig()
    assert cfg.recipe == "default"
    for key, value in get_recipe("default").settings("capsule").items():
        assert getattr(cfg, key) == value, key
    assert get_recipe("default").settings("pool")["epochs"] == cfg.epochs


def test_an_older_checkpoint_config_still_loads():
    """Configs written before data_dir/eval_limit were recorded load with those unset."""
    from capsctl.training.config import TrainConfig

    old = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    for key in ("data_dir", "eval_limit"):
        old.pop(key)
    cfg = TrainConfig.from_json(json.dumps(old))
    assert cfg.data_dir is None and cfg.eval_limit is None
    assert asdict(TrainConfig.from_json(cfg.to_json())) == asdict(cfg)
