"""`capsctl experiment report` on folders of `capsctl bench --json` outputs: the medians over the runs, the
command that measures the same again, and bad folders refused in one line. Also what a bench report
records of its machine and time. No measurement runs here: the committed runs are the data."""

from __future__ import annotations

import calendar
import json
import re
import shlex
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from capsctl.bench.machine import cpu_detail, cpu_text
from capsctl.bench.measure import BenchConfig
from capsctl.experiment.bench_runs import bench_command

from ._helpers import assert_one_line_error, run_cli

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
INTEL = RESULTS / "bench-arch-intel"  # two commands' runs: 3 of --arch seed,efficient,…, 3 of sabour2017


def _rows(text: str) -> dict[str, list[str]]:
    """The speed tables' rows of `text` by their first cell, several tables' rows in order."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], []).extend(cells[1:])
    return rows


def _numbers(cell: str) -> tuple[float, list[float]]:
    """'**68.5** (60.5, 68.5, 72.9)' -> (68.5, [60.5, 68.5, 72.9])."""
    median = float(re.match(r"\*\*([\d.]+)\*\*", cell).group(1))  # type: ignore[union-attr]
    runs = [float(x) for x in re.search(r"\((.*)\)", cell).group(1).split(", ")]  # type: ignore[union-attr]
    return median, runs


def test_a_folder_of_bench_runs_reports_each_commands_medians(tmp_path, capsys):
    text = _speed_section(INTEL, tmp_path, capsys)
    # one table per command, each under the command that measures it again
    assert "```\ncapsctl bench --arch seed,efficient,efficient-multimnist --json\n```" in text
    assert "```\ncapsctl bench --arch sabour2017 --json\n```" in text
    assert "bench-arch-1.json, bench-arch-2.json, bench-arch-3.json" in text
    assert "from the result folders' `capsctl bench --json` outputs" in text
    runs = {p.name: json.loads(p.read_text()) for p in sorted(INTEL.glob("*.json"))}
    rows = _rows(text)
    for label, variant, files in (
        ("`seed`", "capsule", ["bench-arch-1.json", "bench-arch-2.json", "bench-arch-3.json"]),
        ("`efficient-multimnist`", "arch:efficient-multimnist", ["bench-arch-1.json", "bench-arch-2.json",
                                                                 "bench-arch-3.json"]),
        ("`sabour2017`", "arch:sabour2017", [f"bench-sabour2017-{i}.json" for i in (1, 2, 3)]),
    ):
        cells = rows[label]
        heads = [runs[f]["backends"]["torch"]["heads"][variant] for f in files]
        assert cells[0] == f"{heads[0]['parameters']:,}"
        for column, backend in ((2, "torch"), (3, "keras")):
            speeds = [runs[f]["backends"][backend]["heads"][variant]["train_images_per_s"] for f in files]
            median, each = _numbers(cells[column])
            assert median == pytest.approx(statistics.median(speeds), abs=0.5)
            assert each == pytest.approx(speeds, abs=0.5)  # each run's figure, in the files' order
        median, _ = _numbers(cells[4])  # torch's FLOP rate per CPU-second against its sgemm
        fractions = [runs[f]["backends"]["torch"]["heads"][variant]["sgemm_fraction_cpu"] for f in files]
        want = statistics.median(fractions)
        assert median == pytest.approx(want, abs=0.005)


def test_a_whole_report_of_bench_runs_alone(tmp_path, capsys):
    """Rewritten whole (no --section), a report of bench folders only has its speed section and the
    'not run here' list, which read experiments' fields a bench folder lacks."""
    doc = tmp_path / "R.md"
    code, _, err = run_cli(["experiment", "report", RESULTS / "bench-arch", "--out", doc], capsys)
    assert code == 0, err
    text = doc.read_text()
    assert "## Training speed (`capsctl bench`)" in text and "| `sabour2017` | 8,215,568 | 1.22 |" in text
    assert "## Not run here" in text


@pytest.mark.parametrize(
    "config",
    [
        BenchConfig(heads=("capsule", "arch:sabour2017", "arch:efficient")),
        BenchConfig(
            backends=("torch",), heads=("pool", "arch:efficient"), batch=64, windows=3, routing=False
        ),
        BenchConfig(backends=("keras",), heads=("capsule", "pool"), infer_batch=256, sgemm=512),
        BenchConfig(heads=("capsule", "pool", "arch:efficient")),  # (`--heads capsule,pool --arch efficient`)
        BenchConfig(heads=("arch:efficient", "capsule")),
        BenchConfig(),
        BenchConfig(backends=("torch",), heads=("pool", "arch:efficient-multimnist"), image_size=(40, 36)),
    ],
    ids=[
        "archs", "a-head-beside-an-arch", "heads", "heads-then-archs", "seed-after-an-arch", "defaults",
        "image-size",
    ],
)
def test_the_command_shown_measures_what_the_runs_did(config, capsys, monkeypatch):
    """The table's command, given to `capsctl bench`, asks for the runs' own configuration."""
    from capsctl.bench import report

    asked = []

    def run(cfg, on_backend=None):
        asked.append(cfg)
        return {"backends": {}}

    monkeypatch.setattr(report, "run", run)
    recorded = json.loads(json.dumps(asdict(config)))  # (as the JSON holds it: lists)
    words = shlex.split(bench_command(recorded))
    assert words[:2] == ["capsctl", "bench"] and words[-1] == "--json"
    # (today's option names: --batch and --infer-batch still work, hidden, for old scripts)
    assert not {"--batch", "--infer-batch", "--backend", "--head"} & set(words)
    code, _, err = run_cli(words[1:], capsys)
    assert code == 0, err
    assert json.loads(json.dumps(asdict(asked[0]))) == recorded


def test_runs_at_an_image_size_say_so(tmp_path, capsys):
    """Runs of `--image-size HxW` are tabled under that command, and the text names their size (the
    committed runs: 3 at 36x36 and 3 at the default size, taken in turn)."""
    text = _speed_section(RESULTS / "bench-canvas", tmp_path, capsys)
    canvas, digits = text.split("### Training speed")[1:]
    if "--image-size" not in canvas:
        canvas, digits = digits, canvas
    assert "```\ncapsctl bench --heads capsule,pool --batch-size 32 --image-size 36x36 --json\n```" in canvas
    assert "at batch 32, every model on 36×36 images, synthetic images" in canvas
    assert "canvas-1.json, canvas-2.json, canvas-3.json" in canvas and "design size" not in canvas
    assert "```\ncapsctl bench --heads capsule,pool --batch-size 32 --json\n```" in digits
    assert "each model on its own design size" in digits and "digits-1.json" in digits


def _speed_section(folder: Path, tmp_path: Path, capsys) -> str:
    """`experiment report FOLDER --section Speed` into a new document: its text."""
    doc = tmp_path / "R.md"
    code, _, err = run_cli(["experiment", "report", folder, "--out", doc, "--section", "Speed"], capsys)
    assert code == 0, err
    return doc.read_text()


def _copy_runs(tmp_path: Path) -> Path:
    folder = tmp_path / "speed"
    shutil.copytree(RESULTS / "bench-arch", folder)
    return folder


def test_runs_on_other_machines_or_with_a_backend_missing_are_told_apart(tmp_path, capsys):
    """One median per command and machine (CPUs a generation apart differ by 2×); a run without a
    backend's figures says why; each run's date, '?' for one that predates `created`."""
    folder = _copy_runs(tmp_path)
    third = json.loads((folder / "bench-arch-3.json").read_text())
    third["machine"] |= {"cpu": "Other CPU", "cpu_detail": "family 25 model 17, AVX-512", "cores": 8}
    (folder / "bench-arch-3.json").write_text(json.dumps(third))
    second = json.loads((folder / "bench-arch-2.json").read_text())
    second["backends"]["keras"] = {"backend": "keras", "available": False, "reason": "no module named keras"}
    second["created"] = "2026-11-29T11:40:00Z"
    (folder / "bench-arch-2.json").write_text(json.dumps(second))
    doc = tmp_path / "R.md"
    code, _, err = run_cli(["experiment", "report", folder, "--out", doc, "--section", "S"], capsys)
    assert code == 0, err
    text = doc.read_text()
    assert "`--arch seed,sabour2017,efficient`, 2 runs on 2 cores (AMD EPYC)" in text
    other = "8 cores (Other CPU, family 25 model 17, AVX-512)"
    assert f"`--arch seed,sabour2017,efficient`, 1 run on {other}" in text
    assert "Taken: ?, 2026-11-29T11:40:00Z." in text
    assert "Not measured: bench-arch-2.json: keras not measured (no module named keras)." in text
    first = json.loads((RESULTS / "bench-arch" / "bench-arch-1.json").read_text())
    keras = first["backends"]["keras"]["heads"]["capsule"]["train_images_per_s"]
    # keras' median of the two AMD runs is run 1's figure alone: run 2 has none
    assert f"| **{keras:.0f}** ({keras:.0f}, —) |" in text


@pytest.mark.parametrize("case", ["no-bench-json", "not-json", "damaged-figure", "damaged-config"])
def test_a_folder_that_holds_no_readable_bench_runs_is_one_line(case, tmp_path, capsys):
    folder = _copy_runs(tmp_path)
    first = folder / "bench-arch-1.json"
    if case == "no-bench-json":
        for p in folder.glob("*.json"):
            p.unlink()
        (folder / "notes.json").write_text('{"what": "not a bench report"}')
        want = ["speed", "neither a results.json nor a `capsctl bench --json` output"]
    elif case == "not-json":
        first.write_text('{"machine": ')
        want = ["bench-arch-1.json", "unreadable"]
    else:  # (the second of the group's three runs: the file named is the damaged one)
        second = folder / "bench-arch-2.json"
        data = json.loads(second.read_text())
        if case == "damaged-figure":
            data["backends"]["torch"]["heads"]["capsule"]["train_images_per_s"] = "fast"
        else:
            data["config"]["heads"] = 7
        second.write_text(json.dumps(data))
        want = ["bench-arch-2.json", "damaged bench report"]
    doc = tmp_path / "R.md"
    code, out, err = run_cli(["experiment", "report", folder, "--out", doc], capsys)
    assert_one_line_error(code, out, err, *want)
    assert not doc.exists()


ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n\nprocessor\t: 1\ncpu family\t: 99\n"
)
ZEN3 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu sse2 avx avx2\n"


def test_the_cpu_is_named_by_family_model_and_widest_vector_unit():
    """'AMD EPYC' alone names CPUs a generation apart (AVX-512 or not): a speed figure says which."""
    assert cpu_detail(ZEN4) == "family 25 model 17, AVX-512"  # (the first processor's)
    assert cpu_detail(ZEN3) == "family 25 model 1, AVX2"
    intel = "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 207\nflags\t\t: fpu\n"
    assert cpu_detail(intel) == "family 6 model 207"
    assert cpu_detail("Processor\t: ARMv8\n") is None
    assert cpu_text({"cpu": "AMD EPYC", "cpu_detail": "family 25 model 17, AVX-512"}) == (
        "AMD EPYC, family 25 model 17, AVX-512"
    )
    assert cpu_text({"cpu": "AMD EPYC"}) == "AMD EPYC"  # (a record made before cpu_detail)


def test_a_bench_report_records_when_it_ran_and_the_cpu_in_detail(capsys, monkeypatch):
    from capsctl.bench import report

    monkeypatch.setattr(report, "run_child",
                        lambda name, cfg: {"backend": name, "available": True, "error": "MemoryError"})
    before = time.time()
    code, out, _ = run_cli(["bench", "--backends", "torch", "--json"], capsys)
    assert code == 1  # (the measurement "failed": the report is still written, with its machine)
    got = json.loads(out)
    created = calendar.timegm(time.strptime(got["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 1 <= created <= time.time() + 1
    assert got["machine"].get("cpu_detail") == cpu_detail()
    if "cpu family" in Path("/proc/cpuinfo").read_text():  # (x86 Linux, as CI: the detail is recorded)
        assert re.fullmatch(r"family \d+ model \d+(, AVX2|, AVX-512)?", got["machine"]["cpu_detail"])
