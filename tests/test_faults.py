"""Faults and interruptions: atomic writes, SIGKILL at random moments, Ctrl-C, NaN, two runs on one
folder, and no pickle wherever a user file is read.

The kill tests run `capsctl train` in a subprocess through a small runner that patches one hook
(the trainer's step, or os.fsync inside the atomic writer) to deliver a signal to itself at the k-th
call, so "during an epoch" and "during a save" are hit on purpose; one more kill comes from outside at a
random time. k is random; the seed is printed on failure (set CAPSCTL_FAULT_SEED to replay it).
"""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from capsctl._io import atomic_write_bytes
from capsctl.data import idx
from capsctl.errors import CapsctlError

from ._helpers import TINY, assert_one_line_error, dotted_name, gz, idx_bytes, metrics_rows, run_cli

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, LIMIT = 3, 16, 64
STEPS = EPOCHS * (LIMIT // BATCH)  # 12 optimiser steps in all

# Runs capsctl with one fault: argv = mode k barrier capsctl-args...
#   kill-step / int-step / term-step: SIGKILL / SIGINT / SIGTERM to itself right after the k-th step
#   term-load: SIGTERM to itself as the command loads its model
#   pause-step: after the k-th step, wait until the file `barrier` exists
#   kill-in-write: at the k-th file fsync of an atomic write, cut the temp file to half and SIGKILL
#   kill-after-rename: at the k-th folder fsync (the new file renamed in, not yet durable), SIGKILL
FAULT_RUNNER = r"""
import os, signal, stat, sys, time
mode, k, barrier, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
count = 0
def fire():
    global count
    count += 1
    return count == k
if mode == "term-load":  # SIGTERM to itself as the command loads its model (not training)
    import capsctl.model.weights as w
    real_load = w.load_model
    def load_model(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_load(*a, **kw)
    w.load_model = load_model
if mode in ("kill-step", "int-step", "term-step", "pause-step"):
    import capsctl_torch._trainer as t
    real_step = t.TorchTrainer.step
    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        if fire():
            if mode == "kill-step":
                os.kill(os.getpid(), signal.SIGKILL)
            elif mode == "int-step":
                os.kill(os.getpid(), signal.SIGINT)
            elif mode == "term-step":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                open(barrier + ".waiting", "w").close()
                while not os.path.exists(barrier):
                    time.sleep(0.05)
        return out
    t.TorchTrainer.step = step
elif mode in ("kill-in-write", "kill-after-rename"):
    real_fsync = os.fsync
    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_dir == (mode == "kill-after-rename") and fire():
            if not is_dir:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)
    os.fsync = fsync
from capsctl.cli import main
main(args)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory, mnist_dir) -> Path:
    """96 training and 32 test images of real MNIST."""
    folder = tmp_path_factory.mktemp("fault-data")
    for role, n in (("train-images-idx3-ubyte", 96), ("train-labels-idx1-ubyte", 96),
                    ("t10k-images-idx3-ubyte", 32), ("t10k-labels-idx1-ubyte", 32)):
        arr = np.ascontiguousarray(idx.read_idx(mnist_dir / f"{role}.gz")[:n])
        (folder / f"{role}.gz").write_bytes(gz(idx_bytes(arr)))
    (folder / "spec.json").write_text(json.dumps(TINY))
    return folder


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--spec", str(data / "spec.json"), "--data-dir", str(data), "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--limit", str(LIMIT), "--seed", "7", "--out", str(out), "-q"]


def resume_args(data: Path, run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--data-dir", str(data), "-q"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def capsctl(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capsctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def faulty(mode: str, k: int, args: list[str], barrier: Path | None = None, wait: bool = True):
    cmd = [sys.executable, "-c", FAULT_RUNNER, mode, str(k), str(barrier or "-"), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)


metrics = metrics_rows  # (the run's metrics rows without timings)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """The uninterrupted run, in a subprocess like the interrupted ones (for torch-marked tests)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    p = capsctl(train_args(data, run))
    assert p.returncode == 0, p.stderr
    return run


def _seed() -> int:
    return int(os.environ.get("CAPSCTL_FAULT_SEED") or random.SystemRandom().randrange(10**6))


def _position(run: Path) -> tuple[int, int]:
    """(epoch, step) of the run's checkpoint, which must load and validate completely."""
    from capsctl.training.run_folder import load_checkpoint

    ck = load_checkpoint(run)  # CapsctlError here = a damaged checkpoint: the test fails
    return ck.epoch, ck.step


def _assert_same_as_reference(run: Path, reference: Path, note: str) -> None:
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes(), note
    assert metrics(run) == metrics(reference), note
    assert _position(run) == (EPOCHS, 0), note
    leftovers = sorted(p.name for p in run.iterdir() if ".tmp-" in p.name or p.name.endswith(".part"))
    assert not leftovers, (leftovers, note)


# -- atomic writes ------------------------------------------------------------------------------------------

def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fsynced files")
def test_atomic_write_is_temp_fsync_rename_fsync_folder(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append(("replace", f"{a} -> {b}")), real_replace(a, b))[1])
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    tmp = events[1][1].split(" -> ")[0]
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == tmp and Path(tmp).parent == tmp_path
    assert Path(tmp).name.startswith(".model.safetensors.tmp-")
    assert events[1][1] == f"{tmp} -> {target}"
    assert events[2][1] == str(tmp_path)  # the folder, so the rename itself is durable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"the old checkpoint")

    def no_space(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"x" * 1000)
    assert target.read_bytes() == b"the old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


@pytest.mark.torch
def test_atomic_write_writes_through_a_link_and_refuses_what_is_not_a_file(tmp_path, capsys):
    """The rename replaced whatever was at the path: a symbolic link became a plain file (its target left
    as it was), and `export --out /dev/null` as root replaced the device node for the whole machine."""
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    (tmp_path / "link.bin").symlink_to(target)
    atomic_write_bytes(tmp_path / "link.bin", b"new")
    assert (tmp_path / "link.bin").is_symlink() and target.read_bytes() == b"new"
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(CapsctlError, match="pipe.pt: a device, pipe or socket, not a regular file"):
        atomic_write_bytes(tmp_path / "pipe.pt", b"data")
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.pt").st_mode)
    model, spec = tmp_path / "m.safetensors", ModelSpec.from_dict(TINY)
    save_model(model, spec, init_weights(spec, 0))
    code, _, err = run_cli(["export", model, "--out", tmp_path / "pipe.pt"], capsys)
    assert code == 2 and "not a regular file" in err and "Traceback" not in err, err
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.pt").st_mode)


@pytest.mark.torch
def test_training_writes_every_file_atomically(tmp_path, capsys, data, monkeypatch):
    import capsctl.model.weights as weights
    import capsctl.training.run_folder as run_folder

    written: list[str] = []
    for module in (run_folder, weights):
        real = module.atomic_write_bytes
        monkeypatch.setattr(module, "atomic_write_bytes",
                            lambda p, b, real=real: (written.append(Path(p).name), real(p, b))[1])
    run = tmp_path / "run"
    code, _, err = run_cli([*train_args(data, run)[:-3], "--epochs", "1", "--out", run, "-q"], capsys)
    assert code == 0, err
    assert {p.name for p in run.iterdir()} - {".lock"} == set(written) == {
        "model.safetensors", "checkpoint.safetensors", "metrics.jsonl"}


@pytest.mark.torch
def test_disk_full_during_a_save_stops_with_one_line_and_resume_finishes(tmp_path, capsys, data, monkeypatch):
    import errno

    real_replace = os.replace
    calls = {"n": 0}

    def replace(a, b):
        calls["n"] += 1
        if calls["n"] == 6:  # metrics, step-0 checkpoint, epoch 1 (3 files), then epoch 2's model
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(data, run), capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert str(run / "model.safetensors") in lines[0] and "No space left on device" in lines[0], err
    assert _position(run) == (1, 0)
    assert len(metrics(run)) == 1
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(os, "replace", real_replace)  # space freed
    code, _, err = run_cli(resume_args(data, run), capsys)
    assert code == 0, err
    assert _position(run) == (EPOCHS, 0) and len(metrics(run)) == EPOCHS


# -- SIGKILL at random moments, then --resume ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.torch
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, data, reference):
    seed = _seed()
    rng = random.Random(seed)
    run = tmp_path / "run"
    log = [f"CAPSCTL_FAULT_SEED={seed}"]
    spe = LIMIT // BATCH
    last = (0, 0)
    for mode in ("kill-step", "kill-in-write", "kill-after-rename", "kill-step", "external"):
        fresh = not (run / "checkpoint.safetensors").exists()
        if not fresh:
            pos = _position(run)  # intact after every kill
            assert pos >= last, (pos, last, log)  # and never behind an earlier one
            last = pos
            if last == (EPOCHS, 0):  # killed after its very last write: nothing left to interrupt
                break
        args = train_args(data, run) if fresh else resume_args(data, run)
        steps_left = STEPS - (last[0] * spe + last[1])
        # metrics, step-0 checkpoint, 3 per epoch
        writes_left = 1 + (0 if not fresh else 1) + 3 * (EPOCHS - last[0])
        if mode == "external":
            p = subprocess.Popen([sys.executable, "-m", "capsctl", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and p.poll() is None:  # the run holds its lock: it is training
                lock = run / ".lock"
                if lock.exists() and lock.read_text().strip() == str(p.pid):
                    break
                time.sleep(0.02)
            delay = rng.uniform(0, 0.5)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            log.append(f"external kill after {delay:.2f} s: rc {p.returncode}")
            assert p.returncode in (0, -signal.SIGKILL), log
        else:
            k = rng.randint(1, steps_left if mode == "kill-step" else writes_left)
            p = faulty(mode, k, args)
            log.append(f"{mode} k={k} from {last}: rc {p.returncode}")
            assert p.returncode == -signal.SIGKILL, (log, p.stderr[-2000:])
    # a plain --resume finishes it; it must start from an intact checkpoint
    _position(run)
    p = capsctl(resume_args(data, run))
    log.append(f"final resume: rc {p.returncode}")
    assert p.returncode == 0, (log, p.stderr[-2000:])
    _assert_same_as_reference(run, reference, "; ".join(log))


# -- Ctrl-C --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.torch
def test_ctrl_c_saves_mid_epoch_exits_130_and_resume_matches(tmp_path, data, reference):
    run = tmp_path / "run"
    k = 6  # epoch 2, step 2 of 4
    p = faulty("int-step", k, train_args(data, run))
    assert p.returncode == 130, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted") and f"--resume {run}" in last, p.stderr
    assert "Traceback" not in p.stderr
    assert _position(run) == (1, 2)  # mid-epoch: the steps done are kept
    p = capsctl(resume_args(data, run))
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr and "epoch 2, step 2" in p.stderr
    _assert_same_as_reference(run, reference, "ctrl-c at step 6")


@pytest.mark.torch
def test_sigterm_saves_a_run_as_ctrl_c_does_and_ends_other_commands_cleanly(tmp_path, data):
    """SIGTERM (`timeout`, `docker stop`, a batch scheduler) was not handled: a run died at once, losing
    the epoch's steps and leaving its folder unfinished, and other commands left temporary files."""
    run = tmp_path / "run"
    p = faulty("term-step", 6, train_args(data, run))
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: interrupted"), p.stderr
    assert _position(run) == (1, 2)  # mid-epoch: the steps done are kept, as after Ctrl-C
    p = faulty("term-load", 1, ["export", str(run / "model.safetensors"), "--out", str(tmp_path / "m.pt")])
    assert p.returncode == 143 and p.stderr.strip() == "terminated", p.stderr
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.torch
def test_ctrl_c_at_the_end_of_an_epoch_saves_that_epoch(tmp_path, capsys, data, monkeypatch):
    from capsctl_torch import _trainer

    real_step = _trainer.TorchTrainer.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == LIMIT // BATCH:  # the last step of epoch 1
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(_trainer.TorchTrainer, "step", step)
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(data, run), capsys)
    assert code == 130 and "interrupted after epoch 1" in err, err
    assert _position(run) == (1, 0)
    assert len(metrics(run)) == 1


@pytest.mark.torch
def test_a_mid_epoch_resume_keeps_the_epochs_seconds_and_refuses_other_data(tmp_path, capsys, data,
                                                                           monkeypatch):
    """The resumed epoch's row counted only the seconds after the resume (experiment results sum them);
    a resume on other data (another count or labels: --data-dir may change) went on without a word,
    its batches and schedule no longer the run's."""
    from capsctl_torch import _trainer

    real_step = _trainer.TorchTrainer.step
    calls = {"n": 0}
    pause = 0.25  # (a step's seconds, far above the tiny model's own)

    def step(self, *a, **kw):
        time.sleep(pause)
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2 of 4
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(_trainer.TorchTrainer, "step", step)
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(data, run), capsys)
    assert code == 130 and _position(run) == (1, 2), err
    other = tmp_path / "other"  # the same images, the labels of the first 64 in another order
    other.mkdir()
    for f in data.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    labels = idx.read_idx(data / "train-labels-idx1-ubyte.gz")
    (other / "train-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(np.roll(labels, 1))))
    code, out, err = run_cli(resume_args(other, run), capsys)
    assert_one_line_error(code, out, err, f"--resume {run}: the training data changed since the run started "
                          "(64 images then, 64 now, or other labels)")
    code, _, err = run_cli(resume_args(data, run), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = LIMIT // BATCH
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["seconds"] >= steps * pause for r in rows), [r["seconds"] for r in rows]


# -- NaN -----------------------------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("where", ["loss", "weights"])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, data, monkeypatch, where):
    import torch
    from capsctl_torch import _trainer

    real_step = _trainer.TorchTrainer.step
    calls = {"n": 0}
    spe = LIMIT // BATCH

    def step(self, *a, **kw):
        loss, ok = real_step(self, *a, **kw)
        calls["n"] += 1
        if where == "loss" and calls["n"] == spe + 3:  # epoch 2, step 3
            return float("nan"), ok
        if where == "weights" and calls["n"] == 2 * spe:  # the last step of epoch 2
            with torch.no_grad():  # the weights go bad while this step's loss still looked fine
                self.params["head.kernel"].fill_(float("inf"))
        return loss, ok

    monkeypatch.setattr(_trainer.TorchTrainer, "step", step)
    run = tmp_path / "run"
    code, _, err = run_cli(train_args(data, run), capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1, err
    assert len(lines) == 1 and ("NaN" in lines[0] or "nan" in lines[0]), err
    assert "still holds the last good state" in lines[0] and "Traceback" not in err
    # (it said "lower --lr?", which a resume refuses, and a resume replays the same NaN)
    assert lines[0].endswith("a resume would replay the same steps: start again with a lower --lr and "
                             "another --out"), lines[0]
    assert _position(run) == (1, 0)  # the end of epoch 1, loadable and finite
    from capsctl.model.weights import load_model

    load_model(run / "model.safetensors")  # finite too (load_model refuses NaN)
    assert len(metrics(run)) == 1


@pytest.mark.torch
def test_nan_in_the_first_epoch_leaves_no_folder(tmp_path, capsys, data, monkeypatch):
    from capsctl_torch import _trainer

    monkeypatch.setattr(_trainer.TorchTrainer, "step", lambda self, x, y, lr: (float("nan"), 0))
    run = tmp_path / "runs" / "r"
    code, _, err = run_cli(train_args(data, run), capsys)
    assert code == 1 and "loss became nan" in err and "no progress had been saved" in err, err
    assert not (tmp_path / "runs").exists()


# -- two runs, one folder ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.torch
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes_intact(tmp_path, capsys, data,
                                                                                   reference):
    run = tmp_path / "run"
    barrier = tmp_path / "go"
    first = faulty("pause-step", 5, train_args(data, run), barrier=barrier, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not Path(str(barrier) + ".waiting").exists():  # the first run is mid-epoch 2, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for args in (train_args(data, run), resume_args(data, run)):
            code, out, err = run_cli(args, capsys)
            assert_one_line_error(code, out, err, f"in use by another capsctl run (pid {first.pid})")
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the refused runs touched nothing
    finally:
        barrier.touch()
        _, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr
    _assert_same_as_reference(run, reference, "first of two runs")


# -- no pickle where user files are read ---------------------------------------------------------------------

FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
    "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "torch.jit.load",
    "jsonpickle.decode", "pd.read_pickle", "pandas.read_pickle",
}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_pickle_wherever_a_user_file_is_read():
    sources = [p for folder in ("capsctl", "backends") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 20
    problems = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = dotted_name(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if name in FORBIDDEN_CALLS:
                problems.append(f"{where}: unpickles")
            elif name == "torch.load" and _keyword(node, "weights_only") is not True:
                problems.append(f"{where}: needs weights_only=True")
            elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
                problems.append(f"{where}: needs allow_pickle=False")
            elif name.endswith("load_model") and name.startswith(("keras", "tf.", "tensorflow")) \
                    and _keyword(node, "safe_mode") is not True:
                problems.append(f"{where}: needs safe_mode=True")
            elif name.endswith(("yaml.load", "yaml.unsafe_load")) and name != "yaml.safe_load":
                problems.append(f"{where}: use yaml.safe_load")
    assert not problems, problems


class _Boom:
    """Unpickling this creates a file: the proof that a reader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_never_unpickled(tmp_path, capsys, data):
    import pickle

    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(str(sentinel)))
    files = {}
    for name in ("model.safetensors", "model.pt", "spec.json", "digit.npy", "digit.png", "weights.keras"):
        files[name] = tmp_path / name
        files[name].write_bytes(payload)
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    good_model = tmp_path / "good.safetensors"
    spec = ModelSpec.from_dict(TINY)
    save_model(good_model, spec, init_weights(spec, 0))
    runs = [["eval", files["model.safetensors"], "--data-dir", data],
            ["eval-pairs", files["model.pt"], "--data-dir", data],
            ["train", "--spec", files["spec.json"], "--data-dir", data, "--out", tmp_path / "run"],
            ["inspect", files["digit.npy"], "--model", good_model],
            ["inspect", files["digit.png"], "--model", good_model],
            ["import", files["model.pt"], "--out", tmp_path / "imported.safetensors"],
            ["import", files["weights.keras"], "--out", tmp_path / "imported2.safetensors"]]
    for args in runs:
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err)
        assert not sentinel.exists(), args
    with pytest.raises(CapsctlError):
        idx.parse_idx(payload, "labels.idx")
    assert not sentinel.exists()
    # as a user sees it: one line, no warning from the unpickler on stderr
    p = capsctl(["import", str(files["model.pt"]), "--out", str(tmp_path / "imported.safetensors")])
    assert_one_line_error(p.returncode, p.stdout, p.stderr)
    assert "weights_only" not in p.stderr  # torch's own hint (weights_only=False) would run the file's code
    assert not sentinel.exists()


def test_an_interrupt_wrapped_by_a_library_is_still_an_interrupt(tmp_path, monkeypatch):
    """torch's ONNX exporter (and decoders, Keras' loader) wrap every error of their call: a Ctrl-C that
    landed inside was reported as "could not export this model" (exit 2), sending the user off to debug a
    model that was fine."""
    from capsctl.data import images

    class Wrapped(RuntimeError):
        pass

    def decode(*a, **kw):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise AttributeError("partially initialized module") from e
        except AttributeError as e:
            raise Wrapped("Failed to export the model") from e

    monkeypatch.setattr(images, "_load_pil", decode)
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(KeyboardInterrupt):
        images.load_image(tmp_path / "x.png")
    from capsctl.errors import reraise_interrupt

    reraise_interrupt(ValueError("no interrupt in its chain"))  # (returns: nothing to re-raise)


def test_the_sigterm_handler_is_put_back_when_the_command_returns(capsys):
    """capsctl.cli.main() run in-process (a notebook, a tool) left its SIGTERM handler installed: a later
    SIGTERM to that program raised KeyboardInterrupt in its own code, and every later Ctrl-C in it was
    reported as "terminated", exit 143."""
    before = signal.getsignal(signal.SIGTERM)
    code, _, _ = run_cli(["data", "list"], capsys)
    assert code == 0 and signal.getsignal(signal.SIGTERM) == before
