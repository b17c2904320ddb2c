"""Data-parallel training (issue 15): `capsctl train --nproc N` starts N ranks on 127.0.0.1 through the
framework's own engine (torch: the elastic launcher torchrun runs; keras: tf.distribute workers with
local TF_CONFIGs); the job makes the updates one process makes. The job tests run on every backend.

The jobs run as subprocesses, on a few hundred mnist-5k images and a tiny model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from capsctl.training.distributed import (
    LOST_EXIT,
    TIMEOUT_EXIT,
    UNRESPONSIVE_EXIT,
    job_outcome,
    rank_slice,
    worker_argv,
)

from ._helpers import BACKENDS, TINY, assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


# -- the rules, without a framework ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_rank_slices_cover_every_global_batch_in_order(size):
    for n in range(0, 23):
        parts = [rank_slice(n, r, size) for r in range(size)]
        assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
        lengths = [p.stop - p.start for p in parts]
        assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_worker_argv_drops_the_launcher_options():
    argv = ["train", "--nproc", "2", "--port=29511", "--out", "r", "--nproc=3", "--port", "1", "-q"]
    assert worker_argv(argv) == ["train", "--out", "r", "-q"]


def test_the_launcher_names_the_cause_of_a_failed_job():
    again = "capsctl train --resume r --nproc 2"
    assert job_outcome({}, again) == (0, None)
    code, line = job_outcome({0: LOST_EXIT, 1: -9}, again)  # rank 0 only lost rank 1, which was killed
    assert line is not None and line.startswith("rank 1 was killed by SIGKILL")
    code, line = job_outcome({0: -15, 1: -9}, again)  # the launcher stopped rank 0: rank 1 is the cause
    assert code == 1 and line is not None and again in line
    assert line.startswith("rank 1 was killed by SIGKILL")
    assert job_outcome({0: 2, 1: LOST_EXIT}, again) == (2, None)  # rank 0 said why itself
    # bad input: rank 1 said why (exit 2) and the launcher stopped rank 0 with SIGTERM: exit 2, no extra line
    assert job_outcome({0: -15, 1: 2}, again) == (2, None)
    code, line = job_outcome({0: -15, 1: -9}, None)  # killed before the first checkpoint: no --resume offered
    assert line is not None and "--resume" not in line and "run the same command again" in line
    code, line = job_outcome({0: LOST_EXIT, 1: LOST_EXIT}, again)
    assert code == 1 and line is not None and "lost contact" in line
    code, line = job_outcome({0: LOST_EXIT, 1: UNRESPONSIVE_EXIT}, again)  # keras: rank 1 ignored SIGTERM
    assert code == 1 and line is not None and line.startswith("rank 1 stopped answering") and again in line
    code, line = job_outcome({0: TIMEOUT_EXIT, 1: -9}, again)  # rank 1 hung: the launcher killed it
    assert code == 1 and line is not None and "did not answer within CAPSCTL_DIST_TIMEOUT" in line
    # every rank ended by SIGTERM (torchrun reports the ones it stopped alike): no rank is named the cause
    code, line = job_outcome({0: -15, 1: -15}, again)
    assert code == 1 and line == "the ranks were stopped by SIGTERM; the last checkpoint is kept; " + (
        f"continue with: {again}"
    )
    code, line = job_outcome({1: -15}, again)
    assert line is not None and line.startswith("rank 1 was killed by SIGTERM")


def test_a_failing_rank_waits_for_rank_0_to_say_the_same(tmp_path, monkeypatch):
    """The launcher stops the other ranks once one exits: a rank > 0 with an error waits (a bounded time)
    for rank 0's line, so a rank 0 that was slower to meet the same bad input still says it (the job's
    one line, unprefixed), and rank 1's line is not printed (CI once saw only `[rank 1] error: …`)."""
    import threading

    from capsctl import errors
    from capsctl.training.distributed import told_errors

    monkeypatch.setenv(errors.RANK_ERRORS_ENV, str(tmp_path))
    monkeypatch.setattr(errors, "_rank", 1)

    def rank_0_says_it_late() -> None:
        time.sleep(0.5)
        (tmp_path / "rank-0.txt").write_text("error: bad input")

    late = threading.Thread(target=rank_0_says_it_late)
    start = time.monotonic()
    late.start()
    assert errors.leave_to_launcher("error: bad input") is True  # the launcher will say it
    waited = time.monotonic() - start
    late.join()
    assert 0.5 <= waited < errors.RANK_0_GRACE_S, waited
    assert told_errors(str(tmp_path), 2) == []
    (tmp_path / "rank-0.txt").unlink()
    monkeypatch.setattr(errors, "RANK_0_GRACE_S", 0.2)  # rank 0 never fails: rank 1's line, after the grace
    assert errors.leave_to_launcher("error: other") is True
    assert told_errors(str(tmp_path), 2) == ["[rank 1] error: other"]


def test_other_ranks_lines_on_stderr_carry_their_rank():
    import io

    from capsctl.training.distributed import _RankPrefixed

    sink = io.StringIO()
    stream = _RankPrefixed(sink, 3)
    stream.write("UserWarning: slow\n  warnings.warn(")
    stream.write("...)\n\nerror: gone\n")
    stream.write(b"bytes too\n")  # type: ignore[arg-type]  # (click's echo may write bytes)
    assert sink.getvalue().splitlines() == [
        "[rank 3] UserWarning: slow", "[rank 3]   warnings.warn(...)", "", "[rank 3] error: gone",
        "[rank 3] bytes too"]


@pytest.mark.parametrize("nproc", ["0", "-1", "65"])
def test_a_wrong_nproc_is_one_line(nproc, tmp_path, capsys):
    code, out, err = run_cli(["train", "--nproc", nproc, "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "--nproc must be in 1..64")
    assert not (tmp_path / "r").exists()


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(["train", "--nproc", "2", "--port", port, "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, f"--port {port}", "give another --port")
    code, out, err = run_cli(["train", "--port", "29500", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "--port needs --nproc")
    # Keras takes a port a rank: the last port is out of range (it said "got 65536" of a --port 65535)
    code, out, err = run_cli(["train", "--backend", "keras", "--nproc", "2", "--port", "65535", "--out",
                              tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, "--port 65535", "65535..65536 with --nproc 2", "at most 65534")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{not json", "does not parse as JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'needs a "cluster" object'),
        ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
         "chief and worker tasks only, not ps"),
        ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}',
         '"host:port" strings'),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "must be 0..1"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', 'needs a "task"'),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": ["worker"], "index": 0}}', 'needs a "task"'),
    ],
)
@pytest.mark.keras
def test_a_tf_config_that_does_not_parse_is_one_line(raw, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", raw)
    code, out, err = run_cli(["train", "--backend", "keras", "--out", tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, expected)
    assert not (tmp_path / "r").exists()


@pytest.mark.keras
def test_tf_config_ranks_follow_tf_order():
    from capsctl.training.distributed import parse_tf_config, tf_configs

    cluster = {"chief": ["c:1"], "worker": ["a:1", "b:2"]}
    assert parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})) == (0, 3)
    assert parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})) == (2, 3)
    configs = [json.loads(c) for c in tf_configs([5001, 5002])]
    assert [parse_tf_config(json.dumps(c)) for c in configs] == [(0, 2), (1, 2)]
    assert configs[1]["cluster"]["worker"] == ["127.0.0.1:5001", "127.0.0.1:5002"]


# -- jobs of 2 ranks ------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CAPSCTL_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TF_CONFIG"):
        env.pop(name, None)
    return env


def _train(args: list, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "capsctl", "train", *(str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "model.safetensors"))


def _relative_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)


def _free_ports(n: int) -> list[int]:
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def _rank_env(backend: str, rank: int, ports: list[int]) -> dict[str, str]:
    """The environment a launcher gives rank `rank` of 2 (torchrun's variables, or TF_CONFIG)."""
    from capsctl.training.distributed import tf_configs

    if backend == "torch":
        return dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(ports[0]))
    return dict(_env(), TF_CONFIG=tf_configs(ports)[rank])


@pytest.fixture()
def tiny(tmp_path: Path) -> list:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    # 249 images at batch 31: every global batch splits 16 + 15, the last (1 image) 1 + 0; shifts on
    return ["--spec", path, "--limit", "249", "--batch-size", "31", "--lr", "0.01", "--shift", "2",
            "--eval-limit", "100", "--curve-images", "50", "-q"]


@pytest.fixture(params=BACKENDS)
def tiny_on(request: pytest.FixtureRequest, tiny: list) -> list:
    """The tiny job's options on each backend in turn."""
    return [*tiny, "--backend", request.param]


def _with_batch_norms(tiny: list, tmp_path: Path) -> list:
    """The tiny job with a batch norm after each conv, on 250 images: with 3 ranks the last global batch
    (2 images) splits 1 + 1 + 0, so rank 2 trains on its dummy copy of image 0, which must not count in
    the batch statistics (counting it moved the weights by 0.23)."""
    spec = json.loads(json.dumps(TINY))
    for layer in spec["trunk"]:
        if layer["type"] == "conv":
            layer["batchnorm"] = True
    path = tmp_path / "tiny-bn.json"
    path.write_text(json.dumps(spec))
    swap = {str(tiny[tiny.index("--spec") + 1]): path, "249": "250"}
    return [swap.get(str(a), a) for a in tiny]


@pytest.mark.slow
@pytest.mark.parametrize("batch_norms", [False, True], ids=["", "batch-norms"])
def test_ranks_make_the_updates_of_one_process(tiny_on, batch_norms, tmp_path):
    # with batch norms, the ranks normalise with the global batch's statistics (3 ranks there). The
    # bound is looser because summation order alone moves such a model more: a conv bias just before a
    # batch norm gets a tiny gradient, which Adam scales up to a full step, so one process on 1 thread
    # and on 2 differs by 5e-4 after an epoch (torch). Measured on an AMD EPYC (AVX2): 7e-4 torch, 1.6e-3
    # Keras (TensorFlow's float32 reductions); on an Intel Xeon with AVX-512, where TensorFlow turns its
    # oneDNN operations on, Keras is 1.4e-2 in the second conv's bias alone (5.4e-3 at most elsewhere;
    # 1.6e-3 with TF_ENABLE_ONEDNN_OPTS=0), so those biases get their own bound. Each rank's own
    # statistics gave 1.3, counting rank 2's dummy image 0.23.
    tiny, nproc, bound = (
        (_with_batch_norms(tiny_on, tmp_path), 3, 1e-2) if batch_norms else (tiny_on, 2, 1e-5)
    )
    noisy = {"trunk.1.bias": 5e-2} if batch_norms else {}  # the bias before the second batch norm
    one = _train([*tiny, "--epochs", "2", "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    two = _train([*tiny, "--epochs", "2", "--out", tmp_path / "two", "--nproc", nproc, "--json"])
    assert two.returncode == 0, two.stderr
    # rank 0 reports the job: one JSON line on stdout, its epoch lines on stderr, nothing from the others
    result = json.loads(two.stdout)
    assert result["epoch"] == 2
    assert two.stderr.count("epoch 2/2") == 1 and "[rank " not in two.stderr, two.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name, loose in noisy.items():
        gap = _relative_gap({name: a.pop(name)}, {name: b.pop(name)})
        assert gap < loose, (name, gap)
    gap = _relative_gap(a, b)
    assert gap < bound, gap
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("one", "two")]
    for a, b in zip(*rows, strict=True):
        assert a["train_accuracy"] == b["train_accuracy"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=bound)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of rank `rank` among the processes below `parent` (the launcher): torchrun's RANK, or the
    task index in a worker's TF_CONFIG."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        torch_rank = f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ)
        tf_config = [v for v in environ if v.startswith(b"TF_CONFIG=")]
        tf_rank = bool(tf_config) and json.loads(tf_config[0][len(b"TF_CONFIG="):])["task"]["index"] == rank
        if torch_rank or tf_rank:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent or _is_below(ppid, parent):
                return int(entry.name)
    return None


def _is_below(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def _signal_in_epoch_2(
    args: list, run: Path, sig: signal.Signals, rank: int | None = 1
) -> tuple[subprocess.Popen[str], str, float]:
    """Start a job of 2 ranks; once epoch 1 is written (the checkpoint follows it), send `rank` (None: the
    launcher) `sig`. Returns the finished job, its stderr and when the signal was sent."""
    cmd = [sys.executable, "-m", "capsctl", "train", *(str(a) for a in args), "--out", str(run),
           "--nproc", "2"]
    # (Ctrl-C as from a terminal: a test run started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt in the job)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                           preexec_fn=_sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 180
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.01)
        victim = job.pid if rank is None else _rank_pid(job.pid, rank)
        assert victim is not None
        os.kill(victim, sig)
        sent_at = time.monotonic()
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    return job, err, sent_at


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_sigterm_ends_a_rank_at_once_and_the_job_with_it(tiny_on, tmp_path):
    """The launcher stops ranks with SIGTERM (Ctrl-C, a failed rank): it must end a rank on both backends.
    TensorFlow's coordination service caught it, so a Keras rank trained on to the last epoch (exit 0)
    and a Ctrl-C waited for the launcher's SIGKILL."""
    args = [*tiny_on, "--limit", "400", "--batch-size", "16", "--epochs", "6"]
    run = tmp_path / "run"
    job, err, _ = _signal_in_epoch_2(args, run, signal.SIGTERM)
    assert job.returncode == 1, err
    errors = [line for line in err.splitlines() if not line.startswith("epoch ")]
    # keras: capsctl's launcher knows the ranks it stopped itself; torchrun's agent reports the ranks it
    # stopped with SIGTERM alike, so which rank was sent it first is not told there
    named = "error: rank 1 was killed by SIGTERM"
    alike = "error: the ranks were stopped by SIGTERM"
    said = (named,) if "keras" in tiny_on else (named, alike)
    assert len(errors) == 1 and errors[0].startswith(said), err
    assert (run / "metrics.jsonl").read_text().count("\n") < 6


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _processes_naming(path: Path) -> list[int]:
    """Pids of the processes whose command line names `path` (a job's ranks name their --out)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_rank_and_says_how_to_continue(tiny_on, sig, tmp_path):
    """Keras' launcher handled Ctrl-C only: killed (or its terminal closed), it left its workers training
    in their own sessions, holding the run's lock."""
    args = [*tiny_on, "--limit", "400", "--batch-size", "16", "--epochs", "6"]
    run = tmp_path / "run"
    job, err, _ = _signal_in_epoch_2(args, run, sig, rank=None)
    assert job.returncode == 130, err
    errors = [line for line in err.splitlines() if not line.startswith("epoch ")]
    said = (f"error: stopped by {sig.name}; every rank was stopped; the last checkpoint is kept; "
            "continue with: ")
    assert errors == [f"{said}capsctl train --resume {run} --nproc 2"], err
    assert _processes_naming(run) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process in /proc")
def test_a_killed_rank_stops_the_job_and_resume_continues_exactly(tiny_on, tmp_path):
    tiny = tiny_on
    args = [*tiny, "--limit", "400", "--batch-size", "16", "--epochs", "4"]
    whole = _train([*args, "--out", tmp_path / "whole", "--nproc", "2"])
    assert whole.returncode == 0, whole.stderr

    run = tmp_path / "killed"
    job, err, killed_at = _signal_in_epoch_2(args, run, signal.SIGKILL)
    assert time.monotonic() - killed_at < 30  # the others stopped, no hang
    assert job.returncode == 1, err
    # one line: rank 0's own "lost contact" is left to the launcher, which names the cause (epoch lines
    # before it are rank 0's progress)
    errors = [line for line in err.splitlines() if not line.startswith("epoch ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 was killed by SIGKILL"), err
    assert "Traceback" not in err, err
    assert f"capsctl train --resume {run} --nproc 2" in err
    from capsctl.training.run_folder import load_checkpoint

    # no partial checkpoint: the one there is whole (writes are atomic; a temporary left by the kill is
    # removed by the resume) and is epoch 1's, or the step-0 one if the kill came before it was replaced
    ck = load_checkpoint(run)
    assert ck.epoch in (0, 1) and ck.step == 0

    # a copy resumed on one process: the same updates up to float summation order
    import shutil

    shutil.copytree(run, tmp_path / "one")
    resumed = _train(["--resume", run, "--nproc", "2", "-q"])
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "whole"), _weights(run)
    assert all(np.array_equal(a[k], b[k]) for k in a), _relative_gap(a, b)  # bit-identical with the same N
    assert (run / "metrics.jsonl").read_text().count("\n") == 4
    alone = _train(["--resume", tmp_path / "one", "-q"])
    assert alone.returncode == 0, alone.stderr
    gap = _relative_gap(a, _weights(tmp_path / "one"))
    assert gap < 1e-5, gap


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_started_by_hand_refuse_other_data_with_a_prefixed_line(backend, tiny, tmp_path):
    """Two ranks started by hand with the launcher's environment (what each machine of a multi-node job
    sees: torchrun's variables, or TF_CONFIG): rank 1 holds out 100 images, so its training images
    differ; it says so, prefixed, and rank 0 stops with one line."""
    ports = _free_ports(2)
    base = [sys.executable, "-m", "capsctl", "train", *(str(a) for a in tiny), "--epochs", "1",
            "--out", str(tmp_path / "r"), "--backend", backend]
    jobs = [subprocess.Popen([*base, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_rank_env(backend, rank, ports))
            for rank, extra in ((0, []), (1, ["--holdout", "100"]))]
    (_, err0), (_, err1) = (job.communicate(timeout=120) for job in jobs)
    assert jobs[1].returncode == 2, err1
    assert err1.count("\n") == 1, err1
    assert err1.startswith("[rank 1] error: rank 1 loaded other training data"), err1
    assert jobs[0].returncode == 1 and "lost contact with another" in err0, err0
    assert err0.count("\n") == 1 and "Traceback" not in err0, err0
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_job_resumed_across_machines_reads_the_run_folder_on_rank_0_alone(backend, tiny, tmp_path):
    """Each machine of a job runs `train --resume runs/x` in its own folder; only rank 0's machine holds
    the run. Every rank read the checkpoint before joining, so rank 1 failed: "no checkpoint there"."""
    args = [*tiny, "--epochs", "2", "--backend", backend]
    whole = _train([*args, "--out", tmp_path / "whole"])
    assert whole.returncode == 0, whole.stderr
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # rank 1's machine: no run folder
    cmd = [sys.executable, "-m", "capsctl", "train", *(str(a) for a in args), "--out", "r"]
    first = subprocess.Popen(cmd, cwd=tmp_path / "a", env=_env(), stderr=subprocess.DEVNULL)
    try:  # stopped once its step-0 checkpoint is there (or finished: the resume then has nothing to do)
        deadline = time.monotonic() + 120
        while not (tmp_path / "a" / "r" / "checkpoint.safetensors").exists() and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        first.kill()
        first.wait()
    ports = _free_ports(2)
    resume = [sys.executable, "-m", "capsctl", "train", "--resume", "r", "-q"]
    jobs = [subprocess.Popen(resume, cwd=tmp_path / folder, env=_rank_env(backend, rank, ports),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, folder in ((0, "a"), (1, "b"))]
    (_, err0), (_, err1) = (job.communicate(timeout=180) for job in jobs)
    assert jobs[1].returncode == 0, err1
    assert jobs[0].returncode == 0, err0
    assert not (tmp_path / "b" / "r").exists()
    gap = _relative_gap(_weights(tmp_path / "whole"), _weights(tmp_path / "a" / "r"))
    assert gap < 1e-5, gap  # (2 ranks: the updates of one process, up to summation order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rank_failing_alike_is_one_line(backend, tmp_path):
    """Bad input every rank meets after starting (a folder without test/ and no --holdout): the job says
    it once, as one process would, not once per rank."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "set" / "train" / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "set" / "train" / name / f"{i}.png")
    job = _train(["--dataset", tmp_path / "set", "--out", tmp_path / "r", "--nproc", "2", "-q",
                  "--backend", backend], timeout=180)
    assert job.returncode == 2, job.stderr
    assert job.stderr.count("\n") == 1 and job.stderr.startswith("error: "), job.stderr
    assert "no test/ folder" in job.stderr and "[rank" not in job.stderr, job.stderr


def _out_of_memory(backend: str) -> BaseException:
    """The backend's own out-of-memory error (torch's CPU allocator's; TensorFlow's ResourceExhausted)."""
    if backend == "torch":
        import torch

        try:
            torch.empty(2**50, dtype=torch.uint8)  # (1 PiB: refused at once)
        except RuntimeError as e:
            return e
        raise AssertionError("a 1 PiB tensor was allocated")
    from capsctl_keras._env import tf

    return tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1024,1024]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_out_of_memory_is_said_so_not_lost_contact_nor_a_traceback(backend, tmp_path, capsys,
                                                                           monkeypatch):
    """A rank's own out-of-memory error inside a step was reported as "lost contact with another rank"
    (the collectives took every RuntimeError / OpError for one); in one process it was a traceback."""
    import importlib

    error = _out_of_memory(backend)
    dist = importlib.import_module(f"capsctl_{backend}._distributed")

    def fail() -> None:
        raise error

    with pytest.raises(type(error)):
        dist._collective(fail)

    import capsctl.training.loop

    def train(*a, **k):
        raise error

    monkeypatch.setattr(capsctl.training.loop, "train", train)
    code, out, err = run_cli(["train", "--backend", backend, "--limit", "64", "--epochs", "1", "--out",
                              tmp_path / "r"], capsys)
    assert code == 1 and out == "" and err == "error: out of memory (try a smaller --batch-size or --limit)\n"


@pytest.mark.keras
def test_keras_workers_each_take_one_gpu_as_torch_ranks_do(tmp_path):
    """Every Keras worker saw every GPU, so MultiWorkerMirroredStrategy made a replica of each and the job
    was refused with advice (CUDA_VISIBLE_DEVICES per worker) that --nproc gave no way to follow."""
    from capsctl_keras._distributed import worker_envs

    configs = ["c0", "c1", "c2"]
    envs = worker_envs(3, {"CUDA_VISIBLE_DEVICES": "4,7,5"}, configs)
    got = [(e["TF_CONFIG"], e["CUDA_VISIBLE_DEVICES"]) for e in envs]
    assert got == [("c0", "4"), ("c1", "7"), ("c2", "5")]
    assert all("TF_FORCE_GPU_ALLOW_GROWTH" not in e for e in envs)
    shared = worker_envs(3, {"CUDA_VISIBLE_DEVICES": "1,2"}, configs)  # more workers than GPUs: in turn
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared] == ["1", "2", "1"]
    assert all(e["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" for e in shared)
    # no CUDA_VISIBLE_DEVICES: the GPUs nvidia-smi lists (here a stand-in on PATH); none: nothing set
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: a)'\necho 'GPU 1: NVIDIA H200 (UUID: b)'\n")
    fake.chmod(0o755)
    listed = worker_envs(2, {"PATH": str(fake.parent)}, configs[:2])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in listed] == ["0", "1"]
    no_gpu = ({"PATH": str(tmp_path / "none")}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"})
    for env in no_gpu:
        for e in worker_envs(2, env, configs[:2]):  # (no GPU: the environment as it was)
            assert e.get("CUDA_VISIBLE_DEVICES") == env.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.keras
def test_out_of_memory_is_told_by_its_text_not_the_error_class_alone():
    """TensorFlow's ResourceExhausted also says a gRPC message was over its size limit: not memory."""
    from capsctl_keras._env import tf

    from capsctl.errors import is_out_of_memory

    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,1152]")
    grpc = tf.errors.ResourceExhaustedError(None, None, "Received message larger than max (8 vs. 4)")
    assert is_out_of_memory(oom) and not is_out_of_memory(grpc)
    assert not is_out_of_memory(RuntimeError("Connection closed by peer"))


@pytest.mark.keras
def test_a_keras_run_resumed_as_a_torchrun_rank_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Rank 0 took the run's backend (keras) and trained alone; the job's other ranks, started by
    torchrun, joined torch's rendezvous and waited for it until their timeout."""
    run = tmp_path / "r"
    code, _, err = run_cli(["train", *tiny, "--backend", "keras", "--epochs", "1", "--out", run], capsys)
    assert code == 0, err
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    code, out, err = run_cli(["train", "--resume", run], capsys)
    assert_one_line_error(code, out, err, "a keras run, but this process is a rank of a torch job (torchrun)",
                          "give --backend torch")


def test_nan_advice_after_a_resume_names_a_new_out(tmp_path):
    """A resumed run's folder stays whatever it saved: "(try a lower --lr)" alone sent the user to the
    same --out, which a new run refuses."""
    from capsctl.training.loop import _nan_advice

    assert _nan_advice(tmp_path, resume=False) == " (try a lower --lr)"
    assert "start again with a lower --lr and another --out" in _nan_advice(tmp_path, resume=True)
