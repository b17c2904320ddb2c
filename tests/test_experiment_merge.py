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
    )
    r.update(change)
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
    other = {"cpu": "Other CPU", "cpu_detail": "family 25 model 17, AVX-512", "cores": 4}
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b", machine=other)
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
    assert merged["machine"]["cpu_detail"] == "?; family 25 model 17, AVX-512"  # (one part predates it)
    assert [p["seeds"] for p in merged["merged_from"]] == [[0, 2], [1]]
    assert (tmp_path / "m" / "results.md").exists() and "results:" in out
    # the report names each part's machine
    doc = tmp_path / "R.md"
    write_report([tmp_path / "m"], doc)
    text = doc.read_text()
    assert "Merged by `capsctl experiment merge` from 2 result folders" in text
    assert "seeds 0, 2: 2 cores (AMD EPYC)" in text
    assert "seed 1: 4 cores (Other CPU, family 25 model 17, AVX-512)" in text
    assert "last invocation" not in text  # (no one invocation's wall time)
    assert "Equivalent command, not run as one; its parts' commands are below (result folder `m`)" in text
    assert "(finished models are skipped)" not in text  # (a merge's runs lie in its parts: none to rerun)
    md = (tmp_path / "m" / "results.md").read_text()
    assert "Merged by `capsctl experiment merge`" in md and "; seed 1 by `" in md


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
    (tmp_path / "afile").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "runs").mkdir()
    for args, needles in (
        ([str(a), "--out", str(tmp_path / "m")], ("at least two",)),
        ([str(a), str(b), "--out", str(tmp_path / "afile")], ("is a file",)),
        ([str(a), str(b), "--out", str(tmp_path / "busy")], ("not empty",)),
        ([str(a), str(b), "--out", str(a)], ("one of the folders merged",)),
        ([str(a), str(b), "--out", str(other)], ("holds the results of an experiment", "new folder")),
        ([str(a), str(tmp_path / "none"), "--out", str(tmp_path / "m")], ("results.json", "not found")),
    ):
        code, out, err = run_cli(["experiment", "merge", *args], capsys)
        assert_one_line_error(code, out, err, *needles)
    assert (other / "results.json").read_bytes() == before and not (tmp_path / "m").exists()


def test_a_seed_one_folder_left_unfinished_is_taken_from_the_folder_that_finished_it(tmp_path: Path,
                                                                                     capsys) -> None:
    whole = json.loads((PUBLISHED / "mnist5k-torch-default" / "results.json").read_text())
    a = _cut("mnist5k-torch-default", [0, 1], tmp_path / "a", missing=[whole["models"][2]["run"]])
    b = _cut("mnist5k-torch-default", [2], tmp_path / "b")
    code, _, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["missing"] == []


def test_models_trained_with_other_settings_under_one_recipe_name_are_refused(tmp_path: Path, capsys) -> None:
    # (`default` meant batch 128 and 30 epochs before 2026-11-29: results.json says `default` both times)
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    r = json.loads((b / "results.json").read_text())
    r["models"][0]["config"]["batch_size"] = 128
    (b / "results.json").write_text(json.dumps(r))
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, out, err, "capsule model of seed 1", "config.batch_size", "only the seeds")


@pytest.mark.parametrize("damage", ["heads", "machine", "created", "model-run", "model-curve", "merged_from"])
def test_damaged_results_are_one_line_and_leave_no_output(tmp_path: Path, capsys, damage) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    r = json.loads((b / "results.json").read_text())
    if damage.startswith("model-"):
        del r["models"][0][damage.removeprefix("model-")]
    elif damage == "merged_from":
        r["merged_from"] = [{"seeds": [1]}]
    else:
        del r[damage]
    (b / "results.json").write_text(json.dumps(r))
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    if damage in ("machine", "created"):  # (optional: the part is recorded without them)
        assert code == 0, err
        return
    assert_one_line_error(code, out, err, "damaged results file")
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_failure_while_writing_leaves_out_as_it_was(tmp_path: Path, capsys, monkeypatch) -> None:
    from capsctl.experiment import plots

    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1, 2)]
    out = ["--out", str(tmp_path / "m")]
    assert run_cli(["experiment", "merge", *map(str, parts[:2]), *out], capsys)[0] == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()}
    merge = ["experiment", "merge", *map(str, parts), *out]  # (a merge of three seeds in place of two)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "pairs_plots", broken)
    code, _, err = run_cli(merge, capsys)
    assert code == 1 and err.strip() == "error: No space left on device"  # (the machine's fault: not 2)
    assert {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "s0", "s1", "s2"]  # (no staging folder left)


def test_run_paths_follow_a_linked_folder_to_where_it_lies(tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep"
    parts = [_cut("mnist5k-torch-default", [s], deep / f"s{s}") for s in (0, 1)]
    assert run_cli(["experiment", "merge", *map(str, parts), "--out", str(deep / "m01")], capsys)[0] == 0
    (tmp_path / "link").symlink_to(deep / "m01")
    s2 = _cut("mnist5k-torch-default", [2], tmp_path / "s2")
    code, _, err = run_cli(["experiment", "merge", str(tmp_path / "link"), str(s2), "--out",
                            str(tmp_path / "all")], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["models"][0]["run"].startswith(str(Path("..") / "deep" / "s0"))
    assert [p["folder"] for p in merged["merged_from"]] == [
        str(Path("..") / "deep" / "s0"), str(Path("..") / "deep" / "s1"), str(Path("..") / "s2")]


def test_a_head_no_model_of_which_finished_in_the_first_folder_is_still_compared(tmp_path: Path,
                                                                                capsys) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a", models=[])  # (seed 0 unfinished there)
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    c = _cut("mnist5k-torch-default", [2], tmp_path / "c")
    r = json.loads((c / "results.json").read_text())
    r["models"][0]["config"]["batch_size"] = 128
    (c / "results.json").write_text(json.dumps(r))
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), str(c), "--out", str(tmp_path / "m")],
                             capsys)
    assert_one_line_error(code, out, err, "seed 2", "seed 1's", "config.batch_size")


@pytest.mark.parametrize("damage", ["curve-row", "run-null"])
def test_parts_the_plots_or_paths_cannot_read_are_one_line(tmp_path: Path, capsys, damage) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    r = json.loads((b / "results.json").read_text())
    if damage == "curve-row":
        r["models"][0]["curve"] = [{"epoch": 1}]
    else:
        r["models"][0]["run"] = None
    (b / "results.json").write_text(json.dumps(r))
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, out, err, "damaged results file", "model record")
    assert not (tmp_path / "m").exists()


def test_other_experiment_settings_are_named_by_the_option_given(tmp_path: Path, capsys) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b", eval_limit=500, curve_test_images=500)
    code, out, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert_one_line_error(code, out, err, "(eval_limit: 500 against None)")


def test_pairs_into_a_merged_folder_is_refused(tmp_path: Path, capsys) -> None:
    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1)]
    assert run_cli(["experiment", "merge", *map(str, parts), "--out", str(tmp_path / "m")], capsys)[0] == 0
    before = (tmp_path / "m" / "results.json").read_bytes()
    # (tiny settings: were the refusal gone, this would train, briefly)
    code, out, err = run_cli(["experiment", "pairs", "--seeds", "0", "--heads", "capsule", "--epochs", "1",
                              "--limit", "32", "--eval-limit", "20", "-q", "--out", str(tmp_path / "m")],
                             capsys)
    assert_one_line_error(code, out, err, "merged by `capsctl experiment merge`", "another --out")
    assert (tmp_path / "m" / "results.json").read_bytes() == before and not (tmp_path / "m" / "runs").exists()


def test_report_suggests_an_experiments_own_seeds_to_finish_it(tmp_path: Path) -> None:
    whole = json.loads((PUBLISHED / "mnist5k-torch-default" / "results.json").read_text())
    run4 = whole["models"][0]["run"].replace("-s0", "-s4")
    a = _cut("mnist5k-torch-default", [0], tmp_path / "s34", missing=[run4])
    r = json.loads((a / "results.json").read_text())  # (seed 3 finished, seed 4 not)
    r["seeds"], r["models"][0]["seed"] = [3, 4], 3
    r["summary"] = summarize(r["models"], r["tests"])
    (a / "results.json").write_text(json.dumps(r))
    write_report([a], tmp_path / "R.md")
    text = (tmp_path / "R.md").read_text()
    assert "`s34` with seeds 0, 3, 4 (finished models are skipped)" in text
    assert "--seeds 0,3,4" in text and "both heads" not in text


def test_report_refuses_a_folder_whose_plots_would_replace_a_kept_sections(tmp_path: Path, capsys) -> None:
    one = _cut("mnist5k-torch-default", [0], tmp_path / "one" / "pairs")
    other = _cut("mnist5k-torch-default", [1], tmp_path / "other" / "pairs")
    for folder in (one, other):  # (plots as `experiment pairs` writes them beside results.json)
        code, _, err = run_cli(["experiment", "merge", str(folder), str(_cut("mnist5k-torch-default", [2],
                                folder.parent / "s2")), "--out", str(folder.parent / "m")], capsys)
        assert code == 0, err
    doc = tmp_path / "R.md"
    assert run_cli(["experiment", "report", str(one.parent / "m"), "--section", "First", "--out", str(doc)],
                   capsys)[0] == 0
    # the same folder again, in the rest of the report: its plots are the kept section's own
    code, _, err = run_cli(["experiment", "report", str(one.parent / "m"), "--out", str(doc)], capsys)
    assert code == 0, err
    (other.parent / "m").rename(other.parent / "mm")
    (one.parent / "m").rename(one.parent / "kept")
    other_m = other.parent / "m"
    (other.parent / "mm").rename(other_m)
    plots = {p.name: p.read_bytes() for p in (tmp_path / "results" / "m").iterdir()}
    before = doc.read_bytes()
    code, out, err = run_cli(["experiment", "report", str(other_m), "--out", str(doc)], capsys)
    assert_one_line_error(code, out, err, "other plots under results/m/", "section written with --section")
    assert doc.read_bytes() == before
    assert {p.name: p.read_bytes() for p in (tmp_path / "results" / "m").iterdir()} == plots


def test_report_of_the_current_folder_names_its_plots_by_the_folder(tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1)]
    assert run_cli(["experiment", "merge", *map(str, parts), "--out", str(tmp_path / "m")], capsys)[0] == 0
    monkeypatch.chdir(tmp_path / "m")
    code, _, err = run_cli(["experiment", "report", ".", "--out", str(tmp_path / "doc" / "R.md")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "doc" / "results").iterdir()) == ["m"]
    text = (tmp_path / "doc" / "R.md").read_text()
    assert "](results/m/" in text and f"capsctl experiment report ../m --out {tmp_path}" in text


def test_settings_recorded_before_a_field_existed_mean_its_default(tmp_path: Path, capsys) -> None:
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b")
    r = json.loads((b / "results.json").read_text())
    del r["models"][0]["config"]["compose"]  # (written before --compose existed)
    (b / "results.json").write_text(json.dumps(r))
    code, _, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err


@pytest.mark.parametrize("key", ["backend_info", "created", "machine", "command"])
def test_a_damaged_part_of_an_earlier_merge_is_one_line(tmp_path: Path, capsys, key) -> None:
    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1, 2)]
    code, _, err = run_cli(["experiment", "merge", *map(str, parts[:2]), "--out", str(tmp_path / "m")],
                           capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "m" / "results.json").read_text())
    del r["merged_from"][0][key]
    (tmp_path / "m" / "results.json").write_text(json.dumps(r))
    code, out, err = run_cli(["experiment", "merge", str(tmp_path / "m"), str(parts[2]), "--out",
                              str(tmp_path / "all")], capsys)
    assert_one_line_error(code, out, err, "damaged results file")


def test_seeds_asked_for_and_unfinished_stay_in_the_merge(tmp_path: Path, capsys) -> None:
    whole = json.loads((PUBLISHED / "mnist5k-torch-default" / "results.json").read_text())
    a = _cut("mnist5k-torch-default", [0], tmp_path / "a")
    b = _cut("mnist5k-torch-default", [1], tmp_path / "b", missing=[whole["models"][2]["run"]])
    r = json.loads((b / "results.json").read_text())
    r["seeds"] = [1, 2]  # (seed 2 asked for, not finished)
    (b / "results.json").write_text(json.dumps(r))
    code, _, err = run_cli(["experiment", "merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["seeds"] == [0, 1, 2] and [m["seed"] for m in merged["models"]] == [0, 1]
    assert merged["missing"] == [str(Path("..") / "b" / whole["models"][2]["run"])]


def test_a_failed_merge_into_new_folders_leaves_none_of_them(tmp_path: Path, capsys, monkeypatch) -> None:
    from capsctl.experiment import plots

    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1)]

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "pairs_plots", broken)
    out = tmp_path / "new" / "deep" / "m"
    code, _, err = run_cli(["experiment", "merge", *map(str, parts), "--out", str(out)], capsys)
    assert code == 1 and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]


def test_a_report_that_fails_while_copying_plots_leaves_the_old_document_and_plots(tmp_path: Path,
                                                                                    capsys) -> None:
    parts = [_cut("mnist5k-torch-default", [s], tmp_path / f"s{s}") for s in (0, 1)]
    m = tmp_path / "m"
    assert run_cli(["experiment", "merge", *map(str, parts), "--out", str(m)], capsys)[0] == 0
    doc = tmp_path / "doc" / "R.md"
    assert run_cli(["experiment", "report", str(m), "--out", str(doc)], capsys)[0] == 0
    before = {p.relative_to(doc.parent): p.read_bytes() for p in doc.parent.rglob("*") if p.is_file()}
    (m / "accuracy.png").write_bytes(b"new plot")
    (m / "zz.png").mkdir()  # (a plot that cannot be read, after the first ones were staged)
    code, _, err = run_cli(["experiment", "report", str(m), "--out", str(doc)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    after = {p.relative_to(doc.parent): p.read_bytes() for p in doc.parent.rglob("*") if p.is_file()}
    assert after == before  # (no plot replaced, no temporary left, the document as it was)
    # a folder reported for the first time: its new plot folder goes again too
    other = tmp_path / "other"
    other.mkdir()
    for f in m.iterdir():
        (other / f.name).mkdir() if f.is_dir() else (other / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli(["experiment", "report", str(other), str(m), "--out", str(doc)], capsys)
    assert code != 0 and not (doc.parent / "results" / "other").exists()
