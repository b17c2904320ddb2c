"""`capsctl experiment`: plumbing on a tiny real run, skip / resume, results files, overlap composites."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from capsctl.cli._options import parse_ints
from capsctl.data.composites import OVERLAP_SHIFT, make_composites
from capsctl.errors import CapsctlError
from capsctl.experiment.plan import ALL_TESTS, DECODER_HEAD, DataFacts, Overrides, PairsPlan, make_job
from capsctl.experiment.run import ensure_trained, run_pairs, run_state

from ._helpers import assert_one_line_error, run_cli

LIMITS = dict(limit=120, eval_limit=60)


# -- overlap composites (no framework) -------------------------------------------------

def _digits(n: int = 40, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 28, 28, 1)) * (rng.random((n, 28, 28, 1)) > 0.7)).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int64)


def test_overlap_shapes_labels_and_pixelwise_max() -> None:
    x, y = _digits()
    c = make_composites(x, y, digits=2, layout="overlap", seed=3)
    s = OVERLAP_SHIFT
    assert c.images.shape == (len(c.labels), 28 + 2 * s, 28 + 2 * s, 1) and c.images.dtype == np.float32
    assert np.all(c.labels[:, 0] != c.labels[:, 1])
    # replay the documented protocol independently and rebuild each canvas by hand
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(x))
    offsets = rng.integers(0, 2 * s + 1, size=(len(x), 2, 2))
    keep = np.flatnonzero(y != y[perm])
    assert np.array_equal(c.labels, np.stack([y[keep], y[perm][keep]], 1))
    for m, i in enumerate(keep):
        canvas = np.zeros((28 + 2 * s, 28 + 2 * s, 1), np.float32)
        for j, src in enumerate((i, perm[i])):
            r0, c0 = offsets[i, j]
            window = canvas[r0 : r0 + 28, c0 : c0 + 28]
            canvas[r0 : r0 + 28, c0 : c0 + 28] = np.maximum(window, x[src])
        np.testing.assert_array_equal(c.images[m], canvas)
        # the max never exceeds the brightest digit pixel and keeps every digit's ink
        assert c.images[m].max() <= max(x[i].max(), x[perm[i]].max())
        assert c.images[m].sum() >= max(x[i].sum(), x[perm[i]].sum()) - 1e-4


def test_overlap_is_deterministic_by_seed() -> None:
    x, y = _digits()
    a = make_composites(x, y, layout="overlap", seed=7)
    b = make_composites(x, y, layout="overlap", seed=7)
    other = make_composites(x, y, layout="overlap", seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.shape != other.images.shape or not np.array_equal(a.images, other.images)
    three = make_composites(x, y, digits=3, layout="overlap", seed=7, limit=5)
    assert three.images.shape == (5, 36, 36, 1) and three.labels.shape == (5, 3)


# -- option parsing --------------------------------------------------------------------

def test_an_experiment_on_dark_ink_on_light_makes_its_overlap_pairs_on_white(mnist) -> None:
    # (as `eval-pairs` does for such a model: a maximum of light images would be blank paper)
    from capsctl.data.datasets import Split
    from capsctl.experiment.run import _scorer

    tr, te = mnist.train(), mnist.test()
    dark = _scorer(tr, te, 40)
    light = _scorer(Split(1 - tr.images, tr.labels), Split(1 - te.images, te.labels), 40)
    assert light.light and not dark.light
    np.testing.assert_allclose(light.composites("overlap").images, 1 - dark.composites("overlap").images,
                               atol=1e-6)



@pytest.mark.torch
def test_saved_scores_know_the_composites_they_were_made_on(tmp_path: Path, mnist) -> None:
    """A light scorer's overlap score is saved under its own key (a run scored by an older version on
    blank-paper composites is scored again, not served), and a finished model the data no longer fits
    (a folder now decoded as gray, the model RGB) is one line, not torch's traceback."""
    from capsctl.backend import get_backend
    from capsctl.data.datasets import Split
    from capsctl.experiment.scoring import Scorer
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    from ._helpers import TINY

    te = mnist.test()
    spec = ModelSpec.from_json(json.dumps(TINY))
    (tmp_path / "run").mkdir()
    save_model(tmp_path / "run" / "model.safetensors", spec, init_weights(spec, 0))
    torch_be = get_backend("torch")
    light = Scorer(Split(1 - te.images, te.labels), 20, light=True)
    light.score(torch_be, tmp_path / "run", ["vertical", "overlap"])
    keys = json.loads((tmp_path / "run" / "eval.json").read_text())["scores"]
    assert sorted(keys) == ["overlap|r=|limit=20|seed=0|light", "vertical|r=|limit=20|seed=0"]
    (tmp_path / "run" / "eval.json").write_text("null")  # valid JSON, not a cache: scored again
    light.score(torch_be, tmp_path / "run", ["vertical"])
    rescored = json.loads((tmp_path / "run" / "eval.json").read_text())["scores"]
    assert list(rescored) == ["vertical|r=|limit=20|seed=0"]
    rgb = spec.replace(in_channels=3)
    (tmp_path / "rgb").mkdir()
    save_model(tmp_path / "rgb" / "model.safetensors", rgb, init_weights(rgb, 0))
    with pytest.raises(CapsctlError, match="takes 3-channel images"):
        Scorer(te, 20).score(torch_be, tmp_path / "rgb", ["test"])


def test_parse_ints() -> None:
    assert parse_ints("0, 1,2", "--seeds") == [0, 1, 2]
    assert parse_ints("1-3,8", "--iterations", 1, 8) == [1, 2, 3, 8]
    with pytest.raises(CapsctlError, match="--seeds"):
        parse_ints("a", "--seeds")
    with pytest.raises(CapsctlError, match="outside"):
        parse_ints("0,9", "--iterations", 1, 8)
    # a range's ends are checked before it is expanded (1-1000000000 built a billion-item list first; a
    # seed range of 10^8 hung), and a backward range is named
    with pytest.raises(CapsctlError, match="1000000000 is outside 1..100"):
        parse_ints("1-1000000000", "--routings", 1, 100)
    with pytest.raises(CapsctlError, match="more than 1000 values"):
        parse_ints("0-100000000", "--seeds")
    with pytest.raises(CapsctlError, match="the range 2-1 runs backwards; write 1-2"):
        parse_ints("2-1", "--seeds")
    assert parse_ints("0-999", "--seeds") == list(range(1000))


def test_run_names_say_what_changed(tmp_path: Path) -> None:
    a = make_job(tmp_path, "torch", "mnist", "default", "capsule", 1, None, Overrides())
    b = make_job(tmp_path, "torch", "mnist", "seed", "capsule", 1, None,
                 Overrides(shift=0, routing="su-unit"))
    assert a.run.name == "torch-default-capsule-s1"
    assert b.run.name == "torch-seed-capsule-su-unit-s1"  # (the seed recipe's shift is 0 already)
    assert b.config.shift == 0 and b.spec.capsule.routing == "su-unit" and b.config.epochs == 10
    # a value the recipe or the model has already is not a change: the same model, the same folder
    same = Overrides(routings=3, routing="su", squash="su", lr=3e-3, batch_size=32, shift=5, weight_decay=0.0,
                     schedule="onecycle", scale=0.0)
    assert make_job(tmp_path, "torch", "mnist", "default", "capsule", 1, None, same).run == a.run
    # nor is a routing change to the pooling head, which has none
    pool = make_job(tmp_path, "torch", "mnist", "default", "pool", 1, None, Overrides())
    routed = make_job(tmp_path, "torch", "mnist", "default", "pool", 1, None, Overrides(routings=1))
    assert routed.run == pool.run
    changed = make_job(tmp_path, "torch", "mnist", "default", "capsule", 1, None,
                       Overrides(routings=1, lr=1e-3, batch_size=32))
    assert changed.run.name == "torch-default-capsule-lr0.001-r1-s1"
    # and the report's *changed* column, from results.json, says so too
    assert changed.changes == {"lr": 0.001, "routings": 1}
    assert make_job(tmp_path, "torch", "mnist", "default", "capsule", 1, None, same).changes == {}


# -- a tiny real run (torch) -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pairs")
    plan = PairsPlan(backend="torch", dataset="mnist-5k", data_dir=str(mnist_dir), recipe="default",
                     seeds=(0,), overrides=Overrides(epochs=1), command="capsctl experiment pairs ...",
                     **LIMITS)
    return out, run_pairs(plan, out, show_progress=False)


@pytest.mark.torch
def test_pairs_writes_results(tiny_pairs: tuple[Path, dict]) -> None:
    out, r = tiny_pairs
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(r["summary"]))
    assert r["kind"] == "pairs" and r["train_images"] == 120 and r["seeds"] == [0]
    assert [(m["head"], m["seed"], m["status"]) for m in r["models"]] == [
        ("capsule", 0, "trained"), ("pool", 0, "trained")]
    params = {m["head"]: m["parameters"] for m in r["models"]}
    assert params == {"capsule": 279_488, "pool": 276_810}
    for m in r["models"]:
        assert set(m["tests"]) == set(ALL_TESTS)
        assert m["tests"]["test"]["n"] == 60 and m["tests"]["vertical3"]["n"] == 60
        for t in m["tests"].values():
            assert 0 <= t["confident_accuracy"] <= t["accuracy"] <= 1
        assert len(m["curve"]) == 1 and m["train_seconds"] > 0
        assert (out / m["run"] / "model.safetensors").exists()
    s = r["summary"]["capsule"]["tests"]["vertical"]
    assert s["accuracy"][1] is None and s["accuracy"][0] == r["models"][0]["tests"]["vertical"]["accuracy"]
    md = (out / "results.md").read_text()
    assert "| capsule | vertical pairs |" in md and "279,488" in md and "![curves](curves.png)" in md
    for png in ("curves.png", "accuracy.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


@pytest.mark.torch
def test_pairs_rerun_skips_finished_models(tiny_pairs: tuple[Path, dict], mnist_dir: Path, capsys) -> None:
    out, first = tiny_pairs
    model = out / first["models"][0]["run"] / "model.safetensors"
    before = model.stat().st_mtime_ns
    code, stdout, _ = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--epochs", "1",
                               "--seeds", "0", "--limit", LIMITS["limit"],
                               "--eval-limit", LIMITS["eval_limit"], "--out", out, "-q"], capsys)
    assert code == 0, stdout
    r = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in r["models"]] == ["skipped", "skipped"]
    assert model.stat().st_mtime_ns == before
    assert [m["tests"] for m in r["models"]] == [m["tests"] for m in first["models"]]
    assert "--limit 120" in r["command"] and "capsctl experiment pairs" in r["command"]
    # --no-train tabulates what is finished and names what is not
    code, _, err = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--epochs", "1", "--seeds", "0,1",
                            "--limit", LIMITS["limit"], "--eval-limit", LIMITS["eval_limit"],
                            "--out", out, "-q", "--no-train"], capsys)
    assert code == 0, err
    assert "[3/4] torch-default-capsule-s1: not finished; left out (--no-train)" in err
    r = json.loads((out / "results.json").read_text())
    assert [m["seed"] for m in r["models"]] == [0, 0]
    assert r["missing"] == ["runs/torch-default-capsule-s1", "runs/torch-default-pool-s1"]
    assert not (out / "runs" / "torch-default-capsule-s1" / "model.safetensors").exists()
    assert "Not finished" in (out / "results.md").read_text() and "--no-train" not in r["command"]
    # the same folder with other settings is refused, not silently mixed
    code, stdout, err = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--epochs", "2",
                                 "--seeds", "0", "--limit", LIMITS["limit"], "--out", out, "-q"], capsys)
    assert_one_line_error(code, stdout, err, "another epochs")


@pytest.mark.torch
def test_a_finished_run_without_its_checkpoint_is_checked_by_its_model(tiny_pairs: tuple[Path, dict],
                                                                        mnist_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    import shutil

    out = tmp_path / "pairs"
    shutil.copytree(tiny_pairs[0], out)
    for ck in out.glob("runs/*/checkpoint.safetensors"):  # (deleted to save space)
        ck.unlink()
    args = ["experiment", "pairs", "--data-dir", mnist_dir, "--epochs", "1", "--seeds", "0", "--limit",
            LIMITS["limit"], "--eval-limit", LIMITS["eval_limit"], "--out", out, "-q"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert err.count("no checkpoint.safetensors, so only its model spec was checked") == 2  # (once a run)
    assert [m["status"] for m in json.loads((out / "results.json").read_text())["models"]] == ["skipped"] * 2
    code, _, err = run_cli([*args, "--no-train"], capsys)
    assert code == 0 and err.count("no checkpoint.safetensors") == 2, err
    # a model of another spec in the run folder is refused, as a checkpoint of one is
    from capsctl.model.spec import ModelSpec
    from capsctl.model.weights import init_weights, save_model

    run = out / "runs" / "torch-default-capsule-s0"
    other = ModelSpec(capsule=replace(ModelSpec().capsule, dim=8))
    save_model(run / "model.safetensors", other, init_weights(other, 0))
    code, stdout, err = run_cli(args, capsys)
    assert_one_line_error(code, stdout, err, "another model spec")


@pytest.mark.torch
def test_a_refused_no_train_leaves_no_folder(mnist_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "deep"
    code, _, err = run_cli(["experiment", "pairs", "--data-dir", mnist_dir, "--seeds", "0", "--heads",
                            "capsule", "--limit", "32", "--eval-limit", "20", "--epochs", "1", "--out",
                            out, "-q", "--no-train"], capsys)
    # (one line: the run it left out is not named first, as if something had been reported)
    assert_one_line_error(code, None, err, "no finished model to report (--no-train)")
    assert not out.exists() and not (tmp_path / "new").exists()


@pytest.mark.torch
def test_unfinished_run_is_resumed(tmp_path: Path, mnist) -> None:
    from capsctl.backend import get_backend
    from capsctl.training.run_folder import read_metrics

    job = make_job(tmp_path, "torch", "mnist", "default", "pool", 0, 64, Overrides(epochs=2))
    backend = get_backend("torch")
    from capsctl.data.datasets import Split

    train, test = mnist.train(), Split(mnist.test().images[:50], mnist.test().labels[:50])

    class Stop(Exception):
        pass

    def stop_after_first_epoch(kind: str, info: dict) -> None:
        if kind == "epoch":
            raise Stop

    assert run_state(job) == "new"
    with pytest.raises(Stop):
        ensure_trained(backend, job, train, test, stop_after_first_epoch)
    assert run_state(job) == "partial"
    assert ensure_trained(backend, job, train, test) == "resumed"
    assert [r["epoch"] for r in read_metrics(job.run)] == [1, 2]
    assert run_state(job) == "done"
    assert ensure_trained(backend, job, train, test) == "skipped"


@pytest.mark.torch
def test_ctrl_c_in_an_experiment_says_to_rerun_the_experiment(tmp_path: Path, mnist_dir: Path, capsys,
                                                             monkeypatch) -> None:
    """It said `continue with: capsctl train --resume RUN`, which finishes that one run but not the
    experiment; the experiment's own command resumes it."""
    import signal

    from capsctl.experiment import run as experiment_run

    real = experiment_run.train

    def interrupted(*args, on_step=None, **kwargs):
        def hook(kind: str, info: dict) -> None:
            if on_step is not None:
                on_step(kind, info)
            if kind == "epoch" and info["epoch"] == 1:
                signal.raise_signal(signal.SIGINT)

        return real(*args, on_step=hook, **kwargs)

    monkeypatch.setattr(experiment_run, "train", interrupted)
    out = tmp_path / "out"
    args = ["experiment", "pairs", "--data-dir", mnist_dir, "--heads", "pool", "--seeds", "0", "--epochs",
            "2", "--limit", "64", "--eval-limit", "20", "--tests", "test", "--out", out, "-q"]
    code, _, err = run_cli(args, capsys)
    assert code == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: interrupted after epoch 1 (saved); rerun the experiment to continue"), err
    assert "capsctl experiment pairs" in line and "capsctl train --resume" not in line
    monkeypatch.setattr(experiment_run, "train", real)
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


def test_ctrl_c_anywhere_says_aborted(capsys, monkeypatch) -> None:
    """Typer turns Ctrl-C into a silent exit 130 (during an experiment's scoring, say): one line says it."""
    from capsctl.data import datasets

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "candidates", ctrl_c)
    code, _, err = run_cli(["data", "list"], capsys)
    assert code == 130 and err.strip() == "aborted"


@pytest.mark.torch
def test_ablate_and_report(tmp_path: Path, tiny_pairs: tuple[Path, dict], mnist_dir: Path, capsys) -> None:
    out = tmp_path / "ablate"
    code, _, err = run_cli(["experiment", "ablate", "--data-dir", mnist_dir, "--routing", "su",
                            "--squash", "sabour", "--iterations", "3", "--eval-iterations", "1,3,5",
                            "--epochs", "1", "--shift", "2", "--limit", "64", "--eval-limit", "40",
                            "--out", out, "-q"], capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    (v,) = r["variants"]
    assert (v["routing"], v["squash"]) == ("su", "sabour")
    assert r["shift"] == 2 and "--shift 2" in r["command"]
    assert "±2 px shifts" in (out / "results.md").read_text()
    assert [e["routings"] for e in v["trained"]] == [3]
    assert [e["routings"] for e in v["evaluated"]] == [1, 3, 5]
    # scored at its own count, the model trained at 3 gives the same numbers either way
    vertical = v["evaluated"][1]["tests"]["vertical"]
    assert vertical["accuracy"] == v["trained"][0]["tests"]["vertical"]["accuracy"]
    assert [p.name for p in (out / "runs").iterdir()] == ["torch-default-capsule-su-sabour-r3-s0"]
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"

    doc = tmp_path / "docs" / "RESULTS.md"
    code, _, err = run_cli(["experiment", "report", tiny_pairs[0], out, "--out", doc], capsys)
    assert code == 0, err
    text = doc.read_text()
    assert "capsctl experiment ablate" in text and "do not edit by hand" in text
    assert "seed article capsule" in text and "## Not run here" in text
    # the overview says the pairs rows trained on 120 images and scored 60 a test: not a full-data row
    row = next(line for line in text.splitlines() if line.startswith(f"| `{tiny_pairs[0].name}` | capsule"))
    assert "**limit=120**" in row and "eval-limit=60" in row
    assert (doc.parent / "results" / tiny_pairs[0].name / "curves.png").exists()
    assert f"results/{out.name}/ablation.png" in text
    # the ablation was just trained: its section gives its time (it said the tables were only regenerated)
    ablation = text[text.index("### Routing ablation"):]
    assert "the last invocation took" in ablation and "last regenerated" not in ablation
    assert "../shared" not in text and "--eval-iterations" not in text  # its suggestions run anywhere
    # each kind of experiment keeps its own --out: the pairs results were replaced without a word
    before = (tiny_pairs[0] / "results.json").read_bytes()
    code, out_text, err = run_cli(["experiment", "ablate", "--data-dir", mnist_dir, "--iterations", "3",
                                   "--epochs", "1", "--limit", "64", "--out", tiny_pairs[0], "-q"], capsys)
    assert_one_line_error(code, out_text, err, f"--out {tiny_pairs[0]}: holds the results of an experiment",
                          "pairs; use another --out")
    assert (tiny_pairs[0] / "results.json").read_bytes() == before


@pytest.mark.torch
def test_report_section_replaces_its_own_section_only(tmp_path: Path, tiny_pairs: tuple[Path, dict],
                                                      capsys) -> None:
    doc = tmp_path / "RESULTS.md"
    kept = "# Results\n\nHand-kept intro.\n\n## Older results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    doc.write_text(kept)
    args = ["experiment", "report", tiny_pairs[0], "--out", doc, "--section", "New default"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    text = doc.read_text()
    # the section sits before the first heading, with its own regeneration command; the rest is untouched
    assert text.index("## New default") < text.index("## Older results")
    assert text.startswith("# Results\n\nHand-kept intro.\n")
    assert text.endswith("## Older results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "--section 'New default'" in text and f"`{tiny_pairs[0].name}`" in text
    # rerun: the section is replaced in place, not added twice
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    again = doc.read_text()
    assert again.count("## New default") == 1 and again.count("## Older results") == 1
    code, out, err = run_cli(["experiment", "report", tiny_pairs[0], "--out", doc, "--section", "a -- b"],
                             capsys)
    assert_one_line_error(code, out, err, "--section")
    assert doc.read_text() == again
    # a second new section goes before the first one (the first heading is inside it), not into it
    newer = ["experiment", "report", tiny_pairs[0], "--out", doc, "--section", "Newer"]
    code, _, err = run_cli(newer, capsys)
    assert code == 0, err
    third = doc.read_text()
    newer_end = third.index("<!-- end of capsctl report section: Newer -->")
    assert newer_end < third.index("<!-- capsctl report section: New default -->")
    assert third.count("## New default") == third.count("## Newer") == 1
    assert third.endswith(again[again.index("<!-- capsctl report section: New default -->"):])
    # rewritten whole (no --section), this file would lose its own text around the sections: refused (once
    # --section had added one, the file counted as capsctl's and the hand-kept intro was dropped)
    code, out, err = run_cli(["experiment", "report", tiny_pairs[0], "--out", doc], capsys)
    assert_one_line_error(code, out, err, "not a report capsctl wrote", "with the text around its sections")
    assert doc.read_text() == third
    # a report capsctl wrote whole, with sections added: rewritten whole, the sections stay in their order
    report = tmp_path / "REPORT.md"
    for args in ([], ["--section", "Newer"], ["--section", "New default"], []):
        code, _, err = run_cli(["experiment", "report", tiny_pairs[0], "--out", report, *args], capsys)
        assert code == 0, err
    whole = report.read_text()
    assert "it keeps the sections generated with --section" in whole
    assert whole.index("## New default") < whole.index("## Newer") < whole.index("## Reference numbers")
    assert whole.count("<!-- capsctl report section: Newer -->") == 1
    # a Markdown file whose first line is a `## ` heading: a new section goes before it, not inside it
    notes = tmp_path / "NOTES.md"
    notes.write_text("## Mine\n\ntext\n")
    code, _, err = run_cli(["experiment", "report", tiny_pairs[0], "--out", notes, "--section", "S"], capsys)
    assert code == 0, err
    text = notes.read_text()
    assert text.startswith("<!-- capsctl report section: S -->") and text.endswith("## Mine\n\ntext\n")


def test_bad_options_exit_2(tmp_path: Path, capsys) -> None:
    for args, *needles in (
        (["experiment", "pairs", "--seeds", "x", "--out", tmp_path], "--seeds"),
        (["experiment", "pairs", "--heads", "dense", "--out", tmp_path], "--heads"),
        (["experiment", "pairs", "--recipe", "fast", "--out", tmp_path], "recipe"),
        (["experiment", "ablate", "--routing", "em", "--out", tmp_path], "--routing"),
        (["experiment", "ablate", "--shift", "20", "--out", tmp_path], "--shift"),
        (["experiment", "pairs", "--scale", "0.9", "--out", tmp_path], "--scale"),
        (["experiment", "pairs", "--holdout", "0", "--out", tmp_path], "--holdout"),
        (["experiment", "pairs", "--image-size", "0x5", "--out", tmp_path], "--image-size"),
        (["experiment", "pairs", "--image-size", "big", "--out", tmp_path], "--image-size", "HxW"),
        (["experiment", "pairs", "--image-size", "32x24", "--out", tmp_path], "--image-size", "PATH"),
        (["experiment", "report", tmp_path / "nothing", "--out", tmp_path / "R.md"], "results.json"),
    ):
        code, out, err = run_cli(args, capsys)
        assert_one_line_error(code, out, err, *needles)
    assert not (tmp_path / "R.md").exists() and not any(tmp_path.iterdir())


# -- --decoder: the capsule head with the reconstruction decoder as one more head variant ----------------

MNIST_FACTS = DataFacts(tuple(str(d) for d in range(10)), (28, 28, 1))


def test_decoder_job_is_configured_as_train_decoder(tmp_path: Path) -> None:
    from capsctl.model.spec import DecoderSpec, ModelSpec

    job = make_job(tmp_path, "torch", "mnist-5k", "default", DECODER_HEAD, 2, None, Overrides(),
                   data=MNIST_FACTS)
    assert job.run.name == "torch-default-capsule-decoder-s2" and job.head == "capsule+decoder"
    assert job.spec == ModelSpec(decoder=DecoderSpec((512, 1024), (28, 28, 1)))
    assert job.config.recon_weight == 0.0005 and job.config.seed == 2
    plain = make_job(tmp_path, "torch", "mnist-5k", "default", "capsule", 2, None, Overrides(),
                     data=MNIST_FACTS)
    assert plain.spec == ModelSpec() and plain.config.recon_weight is None
    other = {k: v for k, v in job.config.__dict__.items() if k != "recon_weight"}
    assert other == {k: v for k, v in plain.config.__dict__.items() if k != "recon_weight"}
    held = make_job(tmp_path, "torch", "seed", "seed", DECODER_HEAD, 1, None, Overrides(shift=2),
                    holdout=500, data=MNIST_FACTS)
    assert held.run.name == "torch-seed-capsule-decoder-shift2-holdout500-s1"
    colour = DataFacts(("cat", "dog", "eel"), (32, 24, 3))
    c = make_job(tmp_path, "torch", str(tmp_path), "default", DECODER_HEAD, 0, None, Overrides(),
                 image_size="32x24", data=colour)
    assert (c.spec.in_channels, c.spec.num_classes, c.spec.class_names) == (3, 3, ("cat", "dog", "eel"))
    assert c.spec.decoder is not None and c.spec.decoder.image_shape == (32, 24, 3)
    assert c.config.recon_weight == pytest.approx(0.0005 * 784 / (32 * 24 * 3))
    assert c.config.image_size == "32x24" and c.config.dataset == str(tmp_path.absolute())


def _effect_results(dec: list[float], cap: list[float]) -> dict:
    from capsctl.experiment.scoring import summarize

    def model(head: str, seed: int, acc: float) -> dict:
        return {"head": head, "seed": seed, "parameters": 1, "epochs": 1, "train_seconds": 1.0,
                "images_per_s": 1.0, "tests": {t: {"n": 100, "accuracy": acc, "confident_accuracy": acc}
                                                for t in ("test", "vertical")}}

    models = [model("capsule", i, a) for i, a in enumerate(cap)]
    models += [model("capsule+decoder", i, a) for i, a in enumerate(dec)]
    return {"tests": ["test", "vertical"], "summary": summarize(models, ["test", "vertical"])}


def test_decoder_effect_is_phrased_from_the_numbers() -> None:
    from capsctl.experiment.tables import decoder_effect

    text = decoder_effect(_effect_results([0.95, 0.96, 0.97], [0.90, 0.91, 0.92]))
    assert "the decoder helps standard and composite accuracy" in text
    assert "+5.00 points (96.00 ± 1.00% with the decoder, 91.00 ± 1.00% without): **helps**" in text
    text = decoder_effect(_effect_results([0.90, 0.91, 0.92], [0.95, 0.96, 0.97]))
    assert "the decoder hurts standard and composite accuracy" in text
    # a difference inside the seed spread is no difference
    text = decoder_effect(_effect_results([0.90, 0.95, 0.99], [0.91, 0.96, 0.97]))
    assert "the decoder makes no measurable difference to standard or composite accuracy." in text
    text = decoder_effect(_effect_results([0.95], [0.90]))
    assert "cannot be judged" in text and "one seed" in text
    assert decoder_effect({"tests": ["test"], "summary": {"capsule": {}}}) == ""


@pytest.mark.torch
def test_pairs_decoder_rows_report_and_a_train_run_dropped_in(
    tmp_path: Path, tiny_pairs: tuple[Path, dict], mnist_dir: Path, capsys
) -> None:
    import shutil

    out = tmp_path / "pairs"
    (out / "runs").mkdir(parents=True)
    name = "torch-default-capsule-s0"
    shutil.copytree(tiny_pairs[0] / "runs" / name, out / "runs" / name)
    limits = ["--limit", LIMITS["limit"], "--eval-limit", LIMITS["eval_limit"]]
    # the run `capsctl train --decoder` makes is the experiment's run: dropped in, it counts as finished
    code, _, err = run_cli(["train", "--decoder", "--seed", "0", "--data-dir", mnist_dir, "--epochs", "1",
                            *limits, "-q", "--out", out / "runs" / "torch-default-capsule-decoder-s0"],
                           capsys)
    assert code == 0, err
    args = ["experiment", "pairs", "--data-dir", mnist_dir, "--epochs", "1", "--heads", "capsule",
            "--decoder", *limits, "--out", out, "-q"]
    code, _, err = run_cli([*args, "--seeds", "0,1"], capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert [(m["head"], m["seed"], m["status"]) for m in r["models"]] == [
        ("capsule", 0, "skipped"), ("capsule+decoder", 0, "skipped"),
        ("capsule", 1, "trained"), ("capsule+decoder", 1, "trained")]
    assert r["heads"] == ["capsule", "capsule+decoder"] and r["decoder"] is True
    assert "--decoder" in r["command"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "torch-default-capsule-decoder-s0", "torch-default-capsule-decoder-s1",
        "torch-default-capsule-s0", "torch-default-capsule-s1"]
    for m in r["models"]:
        # the decoder: 160·512+512 + 512·1024+1024 + 1024·784+784 = 1,411,344 parameters
        assert m["parameters"] == (279_488 if m["head"] == "capsule" else 279_488 + 1_411_344)
        recon = [t.get("reconstruction_mse") for t in m["tests"].values()]
        assert all(0 < e < 1 for e in recon) if m["head"] == "capsule+decoder" else recon == [None] * 5
        if m["head"] == "capsule+decoder":
            assert m["config"]["recon_weight"] == 0.0005
            assert 0 < m["tests"]["vertical"]["reconstruction_mse_alone"] < 1
    dec = r["summary"]["capsule+decoder"]["tests"]
    assert dec["vertical"]["reconstruction_mse"][1] is not None
    # the same numbers as `eval-pairs --reconstruction` on the same composites
    m = r["models"][1]
    code, stdout, err = run_cli(["eval-pairs", out / m["run"] / "model.safetensors", "--data-dir", mnist_dir,
                                 "--reconstruction", "--eval-limit", LIMITS["eval_limit"], "--json"], capsys)
    assert code == 0, err
    ep = json.loads(stdout)
    assert ep["reconstruction_mse"] == pytest.approx(m["tests"]["vertical"]["reconstruction_mse"], rel=1e-5)
    alone = m["tests"]["vertical"]["reconstruction_mse_alone"]
    assert ep["reconstruction_mse_alone"] == pytest.approx(alone, rel=1e-5)
    md = (out / "results.md").read_text()
    assert "**Does the decoder help?**" in md and "2 seeds with, 2 without" in md
    assert "| capsule+decoder | vertical pairs |" in md and "reconstruction MSE/pixel" in md
    assert md.count("**helps**") + md.count("**hurts**") + md.count("**no measurable difference**") == 5
    # --no-train re-tabulates the same numbers without training or rescoring
    before = r["models"]
    code, _, err = run_cli([*args, "--seeds", "0,1", "--no-train"], capsys)
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in again["models"]] == ["skipped"] * 4
    assert [m["tests"] for m in again["models"]] == [m["tests"] for m in before]
    assert "**Does the decoder help?**" in (out / "results.md").read_text()
    # and docs/RESULTS.md carries the rows and the sentence
    doc = tmp_path / "docs" / "RESULTS.md"
    code, _, err = run_cli(["experiment", "report", out, "--out", doc], capsys)
    assert code == 0, err
    text = doc.read_text()
    assert "**capsctl capsule+decoder**" in text and "**Does the decoder help?**" in text


def test_compose_job_is_configured_as_train_compose(tmp_path: Path) -> None:
    job = make_job(tmp_path, "torch", "mnist-5k", "default", DECODER_HEAD, 1, None, Overrides(epochs=3),
                   data=MNIST_FACTS, compose="overlap")
    assert job.run.name == "torch-default-capsule-decoder-compose-overlap-s1"
    cfg = job.config
    assert (cfg.compose, cfg.shift, cfg.scale, cfg.epochs) == ("overlap", 0, 0.0, 3)
    assert job.spec.decoder is not None and job.spec.decoder.image_shape == (36, 36, 1)  # the canvas
    assert job.config.recon_weight == pytest.approx(0.0005 * 784 / (36 * 36))
    eff = make_job(tmp_path, "torch", "mnist-5k", "default", "capsule", 0, None, Overrides(),
                   data=MNIST_FACTS, arch="efficient", compose="overlap")
    assert eff.run.name == "torch-default-efficient-capsule-compose-overlap-s0"
    assert eff.spec.capsule.num_inputs == eff.spec.capsule_count(36, 36) != eff.spec.capsule_count(28, 28)


def test_pairs_compose_trains_on_overlap_pairs_with_a_train_run_dropped_in(
    tmp_path: Path, mnist_dir: Path, capsys
) -> None:
    """experiment pairs --compose overlap: each model trains as `capsctl train --compose overlap` (whose run
    counts as finished when dropped in), is scored on the overlap pairs as eval-pairs scores them, and a
    decoder model's redraws are scored on the overlap pairs only (its canvas)."""
    out = tmp_path / "mm"
    limits = ["--limit", LIMITS["limit"], "--eval-limit", LIMITS["eval_limit"]]
    dropped = out / "runs" / "torch-default-capsule-decoder-compose-overlap-s0"
    code, _, err = run_cli(["train", "--compose", "overlap", "--decoder", "--seed", "0", "--data-dir",
                            mnist_dir, "--epochs", "1", *limits, "-q", "--out", dropped], capsys)
    assert code == 0, err
    args = ["experiment", "pairs", "--compose", "overlap", "--data-dir", mnist_dir, "--epochs", "1",
            "--heads", "pool", "--decoder", "--tests", "overlap,test", *limits, "--seeds", "0", "--out", out,
            "-q"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    statuses = [(m["head"], m["status"]) for m in r["models"]]
    assert statuses == [("pool", "trained"), ("capsule+decoder", "skipped")]
    assert r["compose"] == "overlap" and "--compose overlap" in r["command"]
    for m in r["models"]:
        assert m["config"]["compose"] == "overlap" and m["config"]["shift"] == 0
        redraw = ["--reconstruction"] if m["head"] != "pool" else []
        code, stdout, err = run_cli(["eval-pairs", out / m["run"] / "model.safetensors", "--data-dir",
                                     mnist_dir, "--layout", "overlap", "--eval-limit", LIMITS["eval_limit"],
                                     "--json", *redraw], capsys)
        assert code == 0, err
        ep = json.loads(stdout)
        assert ep["accuracy"] == m["tests"]["overlap"]["accuracy"]
        if m["head"] != "pool":
            scored = m["tests"]["overlap"]
            for key in ("reconstruction_mse", "reconstruction_mse_alone"):
                assert ep[key] == pytest.approx(scored[key], rel=1e-5), key
            assert "reconstruction_mse" not in m["tests"]["test"]  # single digits have no place on its canvas
    assert "trained on overlap pairs of them (--compose overlap)" in (out / "results.md").read_text()


def test_pairs_compose_on_a_non_shared_preset_scores_overlap_pairs_only(tmp_path: Path, capsys) -> None:
    from capsctl.cli._experiment import _for_arch

    heads, tests, note = _for_arch("efficient", ["capsule"], ["test", "vertical", "overlap"], "overlap")
    assert (heads, tests) == (["capsule"], ["overlap"])
    assert note is not None and "leaving out test, vertical" in note
    code, out, err = run_cli(["experiment", "pairs", "--arch", "efficient", "--compose", "overlap", "--tests",
                              "test", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, out, err, "--arch efficient", "only overlap")
    assert not (tmp_path / "x").exists()


def _image_folder(root: Path, size: tuple[int, int]) -> Path:
    """root/{train,test}/<class>/*.png: three classes of colour blobs, HxW = `size`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 3)):
        for k, name in enumerate(("cat", "dog", "eel")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
                img[3:10, 2 + 3 * k : 7 + 3 * k, k] = 250
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.mark.torch
def test_pairs_image_size_resizes_a_user_folder(tmp_path: Path, capsys) -> None:
    from capsctl.model.weights import load_model

    root = _image_folder(tmp_path / "ds", (20, 16))
    out = tmp_path / "out"
    code, _, err = run_cli(["experiment", "pairs", "--dataset", root, "--image-size", "32x24", "--seeds", "0",
                            "--epochs", "1", "--heads", "capsule", "--decoder", "--tests", "test,vertical",
                            "--out", out, "-q"], capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["image_size"] == "32x24" and "--image-size 32x24" in r["command"]
    assert "scaled to fit 32x24" in (out / "results.md").read_text()
    for m in r["models"]:
        assert m["config"]["image_size"] == "32x24" and m["tests"]["test"]["n"] == 9
        spec, _ = load_model(out / m["run"] / "model.safetensors")
        assert (spec.in_channels, spec.num_classes, spec.class_names) == (3, 3, ("cat", "dog", "eel"))
    spec, _ = load_model(out / "runs" / "torch-default-capsule-decoder-s0" / "model.safetensors")
    assert spec.decoder is not None and spec.decoder.image_shape == (32, 24, 3)
    # the same folder at another size is refused, not mixed
    code, stdout, err = run_cli(["experiment", "pairs", "--dataset", root, "--image-size", "28x28", "--seeds",
                                 "0", "--epochs", "1", "--heads", "capsule", "--tests", "test", "--out", out,
                                 "-q"], capsys)
    assert_one_line_error(code, stdout, err, "another")


def test_pairs_refuses_a_test_of_more_digits_than_classes_before_training(tmp_path: Path, capsys) -> None:
    """On a 2-class folder vertical3 cannot be made: it failed with "no composites to score" once every
    model had trained (and again on every rerun)."""
    import shutil

    root = _image_folder(tmp_path / "ds", (20, 16))
    for split in ("train", "test"):
        shutil.rmtree(root / split / "eel")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["experiment", "pairs", "--dataset", root, "--seeds", "0", "--epochs", "1",
                                 "--heads", "capsule", "--out", out, "-q"], capsys)
    assert_one_line_error(code, stdout, err, "--tests vertical3: composites of 3 different digits",
                          "hold 2 class(es); pass --tests test,vertical,horizontal,overlap")
    assert not out.exists()


# -- the numbers a result is shown beside (no framework) ---------------------------------------------------

def _summary(heads: tuple[str, ...], tests: tuple[str, ...]) -> dict:
    cell = {"accuracy": [0.9, 0.01], "confident_accuracy": [0.8, 0.01]}
    return {h: {"seeds": [0, 1], "tests": {t: cell for t in tests}} for h in heads}


def test_references_fit_what_the_result_was_trained_on() -> None:
    from capsctl.experiment.references import comparison

    base = {"dataset": "mnist-5k", "train_images": 5000, "recipe": "default"}
    heads, tests = ("capsule", "pool"), ("test", "vertical", "horizontal")
    single = comparison({**base, "summary": _summary(heads, tests)})
    for row in ("anchor capsule", "anchor pool", "probe capsule", "probe pool", "seed article pool"):
        assert row in single
    assert "overlapping" not in single and "MultiMNIST" not in single and "Sabour" not in single

    # trained on pairs: the MultiMNIST numbers in an overlap column, never the single-digit references
    pairs = comparison({**base, "compose": "overlap", "summary": _summary(("capsule",), ("test", "overlap"))})
    header = pairs.splitlines()[0]
    assert "overlapping pairs" in header and "vertical" not in header
    assert "5.2% error" in pairs and "29.3% error" in pairs and "≤ 15% error" in pairs
    assert "43.0% error" not in pairs  # the pool probe only beside a pool head
    assert "anchor" not in pairs and "seed article" not in pairs and "probe capsule" not in pairs

    # another preset on single digits: its paper, in the standard test's column only
    eff = comparison({**base, "arch": "efficient", "summary": _summary(("capsule",), ("test",))})
    assert eff.splitlines()[0] == "| model | standard test |"
    assert "99.74%" in eff and "anchor" not in eff and "Sabour" not in eff

    # a data set nobody measured: ours alone
    other = comparison({"dataset": "/data/mine", "train_images": 300, "recipe": "default",
                        "summary": _summary(("capsule",), ("test",))})
    assert len(other.strip().splitlines()) == 3


@pytest.mark.torch
def test_ablate_trains_attention_routing_once(tmp_path: Path, mnist_dir: Path, capsys) -> None:
    """Attention routes in one pass: a model per --iterations count was the same model trained again."""
    out = tmp_path / "abl"
    code, _, err = run_cli(["experiment", "ablate", "--arch", "efficient", "--routing", "attention",
                            "--squash", "efficient", "--iterations", "1,3", "--eval-iterations", "1,3",
                            "--epochs", "1", "--limit", "32", "--eval-limit", "20", "--data-dir", mnist_dir,
                            "--out", out, "-q"], capsys)
    assert code == 0, err
    runs = [p.name for p in (out / "runs").iterdir()]
    assert runs == ["torch-default-efficient-capsule-attention-efficient-r3-s0"]
    (v,) = json.loads((out / "results.json").read_text())["variants"]
    assert [e["routings"] for e in v["trained"]] == [3] and v["evaluated"] == []
