"""`capsctl experiment merge`: one result folder from folders of the same experiment on other seeds
(no framework: it reads results.json files, here the repo's published ones cut by seed)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from capsctl.experiment.report import write_report
from capsctl.experiment.scoring import summarize

from ._helpers import assert_one_line_error, run_cli

PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "results"


def _cut(source: str, seeds: list[int], folder: Path, **change: object) -> Path:
    """A result folder as `experiment pairs --seeds` would have written it for `seeds` of `source`."""
    r = json.loads((PUBLISHED / source / "results.json").read_text())
    models = [m for m in r["models"] if m["seed"] in seeds]
    words = shlex.split(r["command"])
    words[words.index("--seeds") + 1] = ",".join(map(str, seeds))
    r.update(
        seeds=seeds,
        models=models,
        summary=summarize(models, r["tests"]),
        command=shlex.join(words),
        compute_seconds=sum(m["train_seconds"] + m["score_seconds"] for m in models),
        **change,
    )
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(r))
    return folder


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def test_merged_seeds_give_the_means_of_one_run_of_all_seeds(tmp_path: Path, capsys) -> None:
    whole = json.loads((PUBLISHED / "mnist5k-torch-default" / "results.json").read_text())
    a = _cut("mnist5k-torch-default", [0, 2], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b", machine={"cpu": "Other CPU", "cores": 4})
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["seeds"] == [0, 1, 2]
    assert [m["seed"] for m in merged["models"]] == [0, 1, 2]
    assert _close(merged["summary"], whole["summary"])  # the published 3-seed means, to float rounding
    assert merged["models"][1]["run"] == str(Path("..") / "b" / whole["models"][1]["run"])
    words = shlex.split(merged["command"])
    assert words[words.index("--seeds") + 1] == "0,1,2"
    assert words[words.index("--out") + 1] == str(tmp_path / "m")
    assert merged["machine"]["cpu"] == f"{whole['machine']['cpu']}; Other CPU"
    assert [p["seeds"] for p in merged["merged_from"]] == [[0, 2], [1]]
    assert (tmp_path / "m" / "results.md").exists() and "results:" in out
    # merging that with a third part flattens the parts; the report names each part's machine
    (tmp_path / "c").mkdir()
    doc = tmp_path / "R.md"
    write_report([tmp_path / "m"], doc)
    text = doc.read_text()
    assert "Merged by `capsctl experiment merge` from 2 result folders" in text
    assert "seeds 0, 2: 2 cores" in text and "seed 1: 4 cores (Other CPU)" in text
    assert "last invocation" not in text  # (no one invocation's wall time)


def test_a_merge_of_a_merge_keeps_every_part(tmp_path: Path, capsys) -> None:
    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1, 2)]
    merge = ["experiment", "merge"]
    code, _, err = run_cli([*merge, *map(str, parts[:2]), "--out", str(tmp_path / "m01")], capsys)
    assert code == 0, err
    code, _, err = run_cli([*merge, str(tmp_path / "m01"), str(parts[2]), "--out", str(tmp_path / "all")],
                           capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [p["folder"] for p in merged["merged_from"]] == [str(Path("..") / f"s{s}") for s in (0, 1, 2)]
    assert merged["models"][0]["run"].startswith(str(Path("..") / "s0"))
    # an earlier merge in OUT is rewritten
    code, _, err = run_cli([*merge, *map(str, parts[1:]), "--out", str(tmp_path / "all")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "all" / "results.json").read_text())["seeds"] == [1, 2]


def test_folders_written_before_arch_was_recorded_merge_with_seed_ones(tmp_path: Path, capsys) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a", arch=None)
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b", arch="seed")
    code, _, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"overrides": {"epochs": 130}}, ("not the same experiment", "overrides", "only the seeds")),
        ({"arch": "efficient"}, ("arch", "'efficient' against 'seed'")),
        ({"backend": "keras"}, ("backend",)),
        ({"seeds": [0], "models": None}, ("seed 0", "once")),
    ],
)
def test_other_experiments_are_refused_in_one_line(tmp_path: Path, capsys, change, needles) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    if change.get("models", ...) is None:  # the same seed twice
        b = _cut("mnist5k-torch-default", [0], tmp_path / "b")
    else:
        b = _cut("mnist5k-torch-default", [1], tmp_path / "b", **change)
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, out, err, *needles)
    assert not (tmp_path / "m").exists()


def test_bad_out_and_too_few_folders_are_refused(tmp_path: Path, capsys) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    other = _cut("mnist5k-torch-default", [2], tmp_path / "other")
    before = (other / "results.json").read_bytes()
    for args, needles in (
        ([str(a), "--out", str(tmp_path / "m")], ("at least two",)),
        ([str(a), str(b), "--out", str(a)], ("one of the folders merged",)),
        ([str(a), str(b), "--out", str(other)], ("holds the results of an experiment", "new folder")),
        ([str(a), str(tmp_path / "none"), "--out", str(tmp_path / "m")], ("results.json", "not found")),
    ):
        code, out, err = run_cli(["experiment", "merge", *args], capsys)
        assert_one_line_error(code, out, err, *needles)
    assert (other / "results.json").read_bytes() == before and not (tmp_path / "m").exists()
