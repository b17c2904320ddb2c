"""Markdown tables of experiment results (results.md and docs/RESULTS.md share them)."""

from __future__ import annotations

import math
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
    size = f" scaled to fit {r['image_size']}" if r.get("image_size") else ""
    if r.get("arch", "seed") != "seed":  # a preset's models (capsctl.model.presets)
        size += f", `--arch {r['arch']}`"
    if r.get("compose"):  # trained on composites: say so before anything else
        size += f", trained on {r['compose']} pairs of them (--compose {r['compose']})"
    return (
        f"{r['dataset']} ({r['train_images']} training images{size}{limit}), {r['backend']}, recipe "
        f"`{r['recipe']}`{' with ' + extra if extra else ''}, seeds {', '.join(map(str, r['seeds']))}{held}"
    )


def missing_note(r: dict[str, Any]) -> str:
    missing = r.get("missing") or []
    return f" Not finished, so left out: {', '.join(missing)}." if missing else ""


def seeds_named(seeds: list[int]) -> str:
    """'seed 2' or 'seeds 0, 1': a merged part's seeds as the report names them."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def merged_note(r: dict[str, Any]) -> str:
    parts = r.get("merged_from") or []
    if not parts:
        return ""
    each = "; ".join(f"{seeds_named(p['seeds'])} by `{p['command']}`" for p in parts)
    return (
        f" Merged by `capsctl experiment merge` from {len(parts)} result folders ({each}); the command below "
        "is their equivalent, not run as one."
    )


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


def _mse(ms: Any) -> str:
    m, s = ms
    return f"{m:.4f}" if s is None else f"{m:.4f} ± {s:.4f}"


def pairs_long(r: dict[str, Any]) -> str:
    """head x test -> accuracy, confident accuracy (mean ± std over seeds), images scored; for decoder
    models also the reconstruction error of each digit against the digit alone."""
    recon = any("reconstruction_mse" in e for s in r["summary"].values() for e in s["tests"].values())
    rows = []
    for head, s in r["summary"].items():
        for t in r["tests"]:
            e = s["tests"][t]
            cells = [head, test_title(r, t), pct(e["accuracy"]), pct(e["confident_accuracy"]), f"{e['n']:,}"]
            if recon:
                mse = e.get("reconstruction_mse")
                alone = e.get("reconstruction_mse_alone")
                if mse is None or alone is None:
                    cells.append("")
                elif t == "test":
                    cells.append(_mse(mse))
                else:
                    cells.append(f"{_mse(mse)} (alone {alone[0]:.4f})")
            rows.append(cells)
    header = ["head", "test", "accuracy", "confident accuracy", "images"]
    if recon:
        header.append("reconstruction MSE/pixel vs the digit alone")
    return table(header, rows) + (RECON_NOTE if recon else "")


RECON_NOTE = (
    "\nReconstruction (decoder rows; lower is better): each digit of a composite redrawn by the decoder from "
    "its own class's capsule alone, against that test digit by itself (mean squared error per pixel, "
    "0..1 pixels, as `capsctl eval-pairs --reconstruction`); *alone*: the same digits redrawn from their "
    "single-digit images (the decoder's floor).\n"
)


def decoder_effect(r: dict[str, Any]) -> str:
    """Whether the decoder helps or hurts: capsule+decoder against capsule, per test, from the numbers.

    A difference of the mean accuracies counts as measurable when it exceeds twice its standard error
    over seeds, sqrt(s1²/n1 + s2²/n2); within that it is no measurable difference. '' without both rows."""
    summary = r["summary"]
    if "capsule+decoder" not in summary or "capsule" not in summary:
        return ""
    dec, cap = summary["capsule+decoder"], summary["capsule"]
    n_dec, n_cap = len(dec["seeds"]), len(cap["seeds"])
    lines, verdicts = [], {}
    for t in r["tests"]:
        if t not in dec["tests"] or t not in cap["tests"]:
            continue
        (md, sd), (mc, sc) = dec["tests"][t]["accuracy"], cap["tests"][t]["accuracy"]
        d = md - mc
        if sd is None or sc is None:
            verdict = "unknown (one seed: no spread to judge by)"
        else:
            se = math.sqrt(sd**2 / n_dec + sc**2 / n_cap)
            if abs(d) > 2 * se:
                verdict = "helps" if d > 0 else "hurts"
            else:
                verdict = "no measurable difference"
        verdicts[t] = verdict
        lines.append(
            f"- {test_title(r, t)}: {100 * d:+.2f} points ({pct(dec['tests'][t]['accuracy'])} with the "
            f"decoder, {pct(cap['tests'][t]['accuracy'])} without): **{verdict}**"
        )
    if not lines:
        return ""
    phrase = {
        "helps": "helps {} accuracy",
        "hurts": "hurts {} accuracy",
        "no measurable difference": "makes no measurable difference to {} accuracy",
        "unknown": "cannot be judged on {} accuracy from one seed",
    }
    said = []
    groups = [{verdicts[t].split(" (")[0] for t in verdicts if (t == "test") == std} for std in (True, False)]
    if len(groups[0]) == 1 and groups[0] == groups[1]:  # one verdict for both: said once
        (kind,) = groups[0]
        both = (
            "standard or composite"
            if kind in ("no measurable difference", "unknown")
            else "standard and composite"
        )
        said.append(phrase[kind].format(both))
    for group, names in (
        []
        if said
        else (
            ("standard", [t for t in verdicts if t == "test"]),
            ("composite", [t for t in verdicts if t != "test"]),
        )
    ):
        kinds = list(dict.fromkeys(verdicts[t].split(" (")[0] for t in names))
        if len(kinds) == 1:
            said.append(phrase[kinds[0]].format(group))
        elif kinds:
            said.append(
                f"is mixed on {group} accuracy ("
                + ", ".join(f"{verdicts[t].split(' (')[0]} on {test_title(r, t)}" for t in names)
                + ")"
            )
    seeds = f"{n_dec} seed{'s' if n_dec != 1 else ''} with, {n_cap} without"
    return (
        f"**Does the decoder help?** The capsule head with the reconstruction decoder against the same "
        f"head without it ({seeds}; accuracy, mean ± std over seeds; a difference counts when it exceeds "
        f"twice its standard error over seeds): the decoder {' and '.join(said)}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


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
        f"# Paired-digit experiment\n\n{describe_pairs(r)}.{missing_note(r)}{merged_note(r)}\n\n"
        f"`{r['command']}`\n\n"
        f"{pairs_headline(r)}\n{note}\n\n{_then(decoder_effect(r))}{pairs_long(r)}\n{pairs_cost(r)}\n"
        f"Per seed:\n\n{pairs_per_seed(r)}"
    )


def _then(text: str) -> str:
    return text + "\n" if text else ""


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
