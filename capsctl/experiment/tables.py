"""Markdown tables of experiment results (results.md and docs/RESULTS.md share them)."""

from __future__ import annotations

from typing import Any

TEST_TITLES = {
    "test": "standard test",
    "vertical": "vertical pairs",
    "horizontal": "horizontal pairs",
    "vertical3": "3-digit vertical",
    "overlap": "overlapping pairs",
}


def held_out_title(t: str) -> str:
    """A test's title when scored on held-out training digits (--holdout) instead of the test set."""
    return "held-out digits" if t == "test" else f"{TEST_TITLES[t]} (held-out)"


def test_title(r: dict[str, Any], t: str) -> str:
    """A test's column title in the results `r`."""
    return held_out_title(t) if r.get("holdout") else TEST_TITLES[t]


def pct(ms: Any) -> str:
    """(mean, std) or a float -> '98.76 ± 0.05%'."""
    if isinstance(ms, (list, tuple)):
        m, s = ms
        return f"{100 * m:.2f}%" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}%"
    return f"{100 * ms:.2f}%"


def duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def describe_pairs(r: dict[str, Any]) -> str:
    ov = r.get("overrides") or {}
    extra = ", ".join(f"{k}={v}" for k, v in ov.items())
    limit = " (--limit)" if r.get("limit") else ""
    held = (
        (
            f"; scored on {r['holdout']} training images held out from training (and composites built from "
            "them), not on the test set"
        )
        if r.get("holdout")
        else ""
    )
    return (
        f"{r['dataset']} ({r['train_images']} training images{limit}), {r['backend']}, recipe `{r['recipe']}`"
        f"{' with ' + extra if extra else ''}, seeds {', '.join(map(str, r['seeds']))}{held}"
    )


def missing_note(r: dict[str, Any]) -> str:
    missing = r.get("missing") or []
    return f" Not finished, so left out: {', '.join(missing)}." if missing else ""


def pairs_headline(r: dict[str, Any]) -> str:
    """One row per head, one column per test: 'accuracy / confident' as mean ± std."""
    tests = r["tests"]
    header = ["head", "params", "epochs", *[test_title(r, t) + " (acc / conf)" for t in tests]]
    rows = []
    for head, s in r["summary"].items():
        cells = [head, f"{s['parameters']:,}", str(s["epochs"])]
        for t in tests:
            e = s["tests"][t]
            cells.append(f"{pct(e['accuracy'])} / {pct(e['confident_accuracy'])}")
        rows.append(cells)
    return table(header, rows)


def pairs_long(r: dict[str, Any]) -> str:
    """head x test -> accuracy, confident accuracy (mean ± std over seeds), images scored."""
    rows = []
    for head, s in r["summary"].items():
        for t in r["tests"]:
            e = s["tests"][t]
            rows.append(
                [head, test_title(r, t), pct(e["accuracy"]), pct(e["confident_accuracy"]), f"{e['n']:,}"]
            )
    return table(["head", "test", "accuracy", "confident accuracy", "images"], rows)


def pairs_cost(r: dict[str, Any]) -> str:
    rows = []
    for head, s in r["summary"].items():
        m, sd = s["train_seconds"]
        ips, _ = s["images_per_s"]
        spread = "" if sd is None else f" ± {duration(sd)}"
        rows.append([head, f"{s['parameters']:,}", str(s["epochs"]), duration(m) + spread, f"{ips:.0f}"])
    return table(
        ["head", "parameters", "epochs", "train time per model (optimiser steps)", "training images/s"], rows
    )


def pairs_per_seed(r: dict[str, Any]) -> str:
    tests = r["tests"]
    rows = []
    for m in r["models"]:
        rows.append(
            [
                m["head"],
                str(m["seed"]),
                m["status"],
                *[
                    f"{pct(m['tests'][t]['accuracy'])} / {pct(m['tests'][t]['confident_accuracy'])}"
                    for t in tests
                ],
            ]
        )
    return table(["head", "seed", "run", *[test_title(r, t) for t in tests]], rows)


def pairs_markdown(r: dict[str, Any]) -> str:
    note = (
        f"Composites: pairing seed {r['composite_seed']}"
        f"{', first ' + str(r['eval_limit']) + ' per test' if r.get('eval_limit') else ''}; "
        "confident = the k-th highest score is above 0.5."
    )
    return (
        f"# Paired-digit experiment\n\n{describe_pairs(r)}.{missing_note(r)}\n\n`{r['command']}`\n\n"
        f"{pairs_headline(r)}\n{note}\n\n{pairs_long(r)}\n{pairs_cost(r)}\nPer seed:\n\n{pairs_per_seed(r)}"
    )


def paired(tests: dict[str, Any]) -> float:
    """Mean accuracy over the pair layouts present (vertical, horizontal)."""
    vals = [tests[t]["accuracy"] for t in ("vertical", "horizontal") if t in tests]
    return sum(vals) / len(vals) if vals else float("nan")


def ablate_markdown(r: dict[str, Any]) -> str:
    tests = r["tests"]
    header = [
        "routing",
        "squash",
        "iterations",
        *[f"trained at R: {TEST_TITLES[t]}" for t in tests],
        *[f"trained at {r['base_iterations']}, scored at R: {TEST_TITLES[t]}" for t in tests],
    ]
    rows = []
    for v in r["variants"]:
        trained = {e["routings"]: e["tests"] for e in v["trained"]}
        scored = {e["routings"]: e["tests"] for e in v["evaluated"]}
        for it in sorted(set(trained) | set(scored)):
            cells = [v["routing"], v["squash"], str(it)]
            for src in (trained, scored):
                for t in tests:
                    e = src.get(it, {}).get(t)
                    cells.append(f"{pct(e['accuracy'])} / {pct(e['confident_accuracy'])}" if e else "")
            rows.append(cells)
    limits = (f", first {r['limit']} training images" if r.get("limit") else "") + (
        f", first {r['eval_limit']} images/composites per test" if r.get("eval_limit") else ""
    )
    shift = f", ±{r['shift']} px shifts" if "shift" in r else ""
    return (
        f"# Routing ablation\n\n{r['dataset']}, {r['backend']}, recipe `{r['recipe']}`, {r['epochs']} "
        f"epochs{shift}, "
        f"seed {r['seed']}{limits}. Cells: accuracy / confident accuracy.\n\n`{r['command']}`\n\n"
        + table(header, rows)
    )
