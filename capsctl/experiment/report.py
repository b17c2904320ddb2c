"""docs/RESULTS.md, generated from result folders: never typed by hand.

Reads each folder's results.json (written by `capsctl experiment pairs|ablate`), copies its
plots beside the document and writes every table with the command that produced it, the time
it took, and the reference numbers that fit each result beside ours (capsctl.experiment.references).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capsctl._io import atomic_write_bytes
from capsctl.bench.machine import machine_text
from capsctl.errors import CapsctlError
from capsctl.experiment.bench_runs import BENCH_KIND, bench_markdown, load_bench_runs
from capsctl.experiment.references import comparison, reference_dataset
from capsctl.experiment.results import DAMAGE, command_with, load_results
from capsctl.experiment.tables import (
    TEST_TITLES,
    ablate_markdown,
    decoder_effect,
    describe_pairs,
    duration,
    held_out_title,
    missing_note,
    pairs_cost,
    pairs_long,
    pairs_per_seed,
    pct,
    seeds_named,
    table,
)
from capsctl.training.config import TrainConfig
from capsctl.training.recipes import RECIPE_HISTORY, get_recipe
from capsctl.training.run_folder import missing_folders, remove_empty

TARGETS = (
    "Targets for the default capsule recipe on mnist-5k (mean of 3 seeds): standard test ≥ 98.8%; "
    "vertical and horizontal pairs ≥ 96% on both accuracies; 3-digit composites ≥ 85%. "
    "On full Fashion-MNIST: the anchor's capsule figures + 5 points in both layouts."
)


def _plot_links(folder: Path) -> list[str]:
    """Links to `folder`'s PNG plots as `_install_plots` copies them: results/FOLDER-NAME/ beside the doc."""
    return [f"![{png.stem}](results/{folder.name}/{png.name})\n" for png in sorted(folder.glob("*.png"))]


def _install_plots(folders: Sequence[Path], doc: Path, text: str) -> None:
    """Copy each folder's plots beside `doc` and write `doc`: every plot is written to a temporary name
    first and all are renamed just before `doc` is written, so an interrupted or failing report leaves
    the old document with its old plots (and no folder it made)."""
    made = [missing_folders(doc.parent)]  # (each chain innermost first; the last made first undone)
    staged: list[tuple[Path, Path]] = []
    try:
        doc.parent.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            dest = doc.parent / "results" / folder.name
            pngs = sorted(folder.glob("*.png"))
            if pngs:
                made.append(missing_folders(dest))
                dest.mkdir(parents=True, exist_ok=True)
            for png in pngs:
                tmp = dest / f".{png.name}.report-tmp"
                staged.append((tmp, dest / png.name))
                tmp.write_bytes(png.read_bytes())
        for tmp, target in staged:
            os.replace(tmp, target)
        atomic_write_bytes(doc, text.encode())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for chain in reversed(made):
            remove_empty(chain)
        raise


def _wall(r: dict[str, Any]) -> str:
    if r.get("merged_from"):  # (its wall time is no one invocation's)
        return f"; merged from {len(r['merged_from'])} result folders (below)"
    # an invocation that only re-tabulated finished models says nothing about the experiment's time
    models = r.get("models") or []  # (an ablation records no per-model status: its time is its own)
    if not models or any(m.get("status") != "skipped" for m in models):
        return f"; the last invocation took {duration(r['wall_seconds'])} of wall time"
    return "; the tables were last regenerated from the finished runs"


def _timing(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    load = m.get("loadavg", ["?"])[0]
    time_of = (
        f"Time: {duration(r['compute_seconds'])} of training and scoring summed over its models (each "
        "model's own "
        f"measured seconds, so it holds even when an invocation resumed or skipped models){_wall(r)}."
    )
    if r.get("merged_from"):  # (one machine line per part, below)
        return time_of
    return (
        f"{time_of} Machine: {machine_text(m)}, "
        f"{r.get('backend_info', r['backend'])}, shared with other jobs (1-minute load average {load} at the "
        "start)."
    )


def _command_title(r: dict[str, Any]) -> str:
    # a merge's command was never run as one: its numbers come from its parts' commands, listed below it
    merged = "Equivalent command, not run as one; its parts' commands are below"
    return merged if r.get("merged_from") else "Command"


def _merged_from(r: dict[str, Any]) -> list[str]:
    """Where a merged folder's seeds ran: each part's command, machine and date."""
    if not r.get("merged_from"):
        return []
    lines = [f"Merged by `capsctl experiment merge` from {len(r['merged_from'])} result folders:\n"]
    for p in r["merged_from"]:
        m = p.get("machine", {})
        lines.append(
            f"- {seeds_named(p['seeds'])}: {machine_text(m)}, {p['backend_info']}, {p['created']}: "
            f"`{p['command']}`"
        )
    return ["\n".join(lines) + "\n"]


def _pairs_section(folder: Path, r: dict[str, Any], doc_dir: Path) -> str:
    parts = [
        f"### {describe_pairs(r)}\n",
        *([missing_note(r).strip() + "\n"] if r.get("missing") else []),
        f"{_command_title(r)} (result folder `{folder.name}`):\n\n```\n{r['command']}\n```\n",
        _timing(r) + "\n",
        *_merged_from(r),
    ]
    # reference numbers are test-set numbers: beside held-out scores they would mislead
    if not r.get("holdout"):
        parts.append(comparison(r))
    per_test = f", first {r['eval_limit']} per test" if r.get("eval_limit") else ""
    parts.append(
        f"All tests (mean ± std over seeds; composites: pairing seed {r['composite_seed']}{per_test}):\n"
    )
    effect = decoder_effect(r)
    parts += [*([effect] if effect else []), pairs_long(r), pairs_cost(r), "Per seed:\n", pairs_per_seed(r)]
    parts += _plot_links(folder)
    return "\n".join(parts) + "\n"


def _ablate_section(folder: Path, r: dict[str, Any], doc_dir: Path) -> str:
    body = ablate_markdown(r).split("\n", 2)[2]  # drop the file's own title
    parts = [
        f"### Routing ablation ({folder.name})\n",
        f"```\n{r['command']}\n```\n",
        _timing(r) + "\n",
        body,
    ]
    parts += _plot_links(folder)
    return "\n".join(parts) + "\n"


def _overview(items: list[tuple[Path, dict[str, Any]]]) -> str:
    """Every pairs experiment in one table: capsule-head means, for recipe-choice comparisons."""
    tests = ["test", "vertical", "horizontal", "vertical3", "overlap"]
    rows = []
    for folder, r in items:
        if r["kind"] != "pairs":
            continue
        for head, s in r["summary"].items():
            t = s["tests"]
            changed = [f"{k}={v}" for k, v in r["overrides"].items()]
            changed += [f"**holdout={r['holdout']}**"] if r.get("holdout") else []
            # fewer training images, or scores on the first N per test: not comparable with a full row
            changed += [f"**limit={r['limit']}**"] if r.get("limit") else []
            changed += [f"eval-limit={r['eval_limit']}"] if r.get("eval_limit") else []
            changed += [f"**compose={r['compose']}**"] if r.get("compose") else []
            changed = ([f"**arch={r['arch']}**"] if r.get("arch", "seed") != "seed" else []) + changed
            rows.append(
                [
                    f"`{folder.name}`",
                    head,
                    r["recipe"],
                    ", ".join(changed) or "–",
                    str(len(s["seeds"])),
                    *[
                        (
                            f"{pct(t[x]['accuracy'][0])} / {pct(t[x]['confident_accuracy'][0])}"
                            if x in t
                            else ""
                        )
                        for x in tests
                    ],
                ]
            )
    if not rows:
        return ""
    return table(
        ["result folder", "head", "recipe", "changed", "seeds", *[TEST_TITLES[x] for x in tests]], rows
    )


def _is_default_recipe(config: dict[str, Any]) -> bool:
    cfg = TrainConfig(**config)  # fields an older results file lacks take their defaults
    return cfg.recipe == "default" and all(
        getattr(cfg, k) == v for k, v in get_recipe("default").settings("capsule").items()
    )


def _choice(items: list[tuple[Path, dict[str, Any]]], heading: str = "##") -> str:
    """The held-out candidates the default recipe was chosen from, the current default marked."""
    tests = ["test", "vertical", "horizontal", "vertical3", "overlap"]
    rows = []
    for folder, r in items:
        if r["kind"] != "pairs" or not r.get("holdout"):
            continue
        for m in r["models"]:
            if m["head"] != "capsule":
                continue
            c = m["config"]
            mark = (
                " **← default**" if _is_default_recipe(c) and m["spec"]["capsule"]["routing"] == "su" else ""
            )
            t = m["tests"]
            rows.append(
                [
                    f"`{folder.name}`{mark}",
                    str(c["epochs"]),
                    str(c.get("batch_size", 128)),
                    f"{c.get('lr', 3e-3):g}",
                    f"±{c['shift']} px",
                    f"{c.get('scale', 0.0):g}",
                    str(m["seed"]),
                    *[
                        (f"{pct(t[x]['accuracy'])} / {pct(t[x]['confident_accuracy'])}" if x in t else "")
                        for x in tests
                    ],
                ]
            )
    if not rows:
        return ""
    counts = sorted({int(r["holdout"]) for _, r in items if r["kind"] == "pairs" and r.get("holdout")})
    held = (
        f"{counts[0]} training images" if len(counts) == 1  # (the folders can hold out different numbers)
        else "some training images (" + ", ".join(f"{c:,}" for c in counts) + ", by folder)"
    )
    return (
        f"{heading} How the default recipe was chosen\n\n"
        f"Each candidate trained the capsule head without {held} (a fixed random draw) and was "
        "scored on "
        "those images and on composites built from them; the test set played no part. The row marked "
        f"*default* has the `default` recipe's settings ({get_recipe('default').describe()}, `su` "
        "routing).\n\n"
        + table(
            [
                "result folder",
                "epochs",
                "batch",
                "peak LR",
                "shift",
                "zoom",
                "seed",
                *[held_out_title(x) for x in tests],
            ],
            rows,
        )
    )


def _full_grid(r: dict[str, Any]) -> bool:
    # scoring on the first N images (--eval-limit) still counts: the grid is about training, and the
    # table says N
    return len(r["variants"]) == 6 and set(r["iterations"]) >= {1, 2, 3, 5, 8} and not r.get("limit")


def _three_seeds(seeds: list[int]) -> list[int]:
    """An experiment's own seeds (its unfinished ones among them), with the smallest unused ones added up
    to three."""
    more = (n for n in range(len(seeds) + 3) if n not in seeds)
    return sorted([*seeds, *(next(more) for _ in range(3 - len(seeds)))])


def _not_run(items: list[tuple[Path, dict[str, Any]]]) -> str:
    have = {
        (r["kind"], reference_dataset(r), r["backend"], r.get("recipe"))
        for _, r in items
        if r["kind"] == "pairs" or (r["kind"] == "ablate" and _full_grid(r))
    }
    lines = []
    for folder, r in items:
        if r["kind"] == "pairs" and not r.get("merged_from") and (  # (a merge's runs lie in its parts)
            r.get("missing") or (not r["overrides"] and not r.get("holdout") and len(r["seeds"]) < 3)
        ):
            seeds = _three_seeds(r["seeds"])
            cmd = command_with(r["command"], seeds=",".join(map(str, seeds)))
            lines.append(
                f"- `{folder.name}` with seeds {', '.join(map(str, seeds))} (finished models are "
                f"skipped):\n\n  ```\n  {cmd}\n  ```"
            )
    wanted = [
        (
            ("pairs", "mnist", "keras", "default"),
            "mnist-5k on the Keras backend",
            "capsctl experiment pairs --backend keras --seeds 0,1,2 --out out/mnist5k-keras",
        ),
        (
            ("pairs", "mnist", "torch", "seed"),
            "mnist-5k, the seed's recipe",
            "capsctl experiment pairs --backend torch --recipe seed --seeds 0,1,2 --out "
            "out/mnist5k-torch-seed",
        ),
        (
            ("pairs", "fashion-mnist", "torch", "default"),
            "full Fashion-MNIST (60k images; about 15 min per model on an idle 2-core CPU)",
            "capsctl experiment pairs --backend torch --dataset fashion-mnist --epochs 10 --seeds 0 --out "
            "out/fashion-torch",
        ),
        (
            ("ablate", "mnist", "torch", "default"),
            "the full routing ablation (30 models)",
            "capsctl experiment ablate --backend torch --epochs 10 --shift 3 --eval-routings 1,2,3,5,8 "
            "--eval-limit 1000 --out out/ablate-mnist5k",
        ),
    ]
    for key, what, command in wanted:
        if key not in have:
            lines.append(f"- {what}:\n\n  ```\n  {command}\n  ```")
    lines.append(
        "- full 60k MNIST (capsctl downloads it on first use, or `capsctl data fetch mnist --from DIR` takes "
        "a local copy):\n\n  ```\n  capsctl experiment pairs --backend torch --dataset mnist --seeds "
        "0,1,2 --out out/mnist-torch-default\n  ```"
    )
    return "\n".join(lines) + "\n"


def _report_command(folders: Sequence[Path], doc: Path, *extra: str) -> str:
    """The command that regenerates `doc` (or one of its sections) from `folders`."""
    return shlex.join(
        ["capsctl", "experiment", "report", *[str(f) for f in folders], "--out", str(doc), *extra]
    )


def render(folders: Sequence[Path], doc: Path, results: Sequence[dict[str, Any]]) -> str:
    doc_dir = doc.parent
    items = list(zip(folders, results, strict=True))
    cmd = _report_command(folders, doc)
    out = [
        "# Results\n",
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the result "
        f"folders' {_sources(items)}; do not edit by hand, rerun that command (it keeps the sections "
        "generated with --section, each with its own command). Every number below was measured by the "
        "command shown "
        "with it. Composites are test images the models never trained on (pairing seed 0, the contract's "
        "default; "
        "nothing was tuned on them). Confident = the k-th highest score is above 0.5.\n",
        "## Reference numbers\n",
        "From the project brief. *Seed article*: 60k MNIST, capsule head ≈270k parameters: >90% on stacked "
        "pairs, >90% "
        "confident; global average pooling ~40% (~10% confident). *Anchor*: the seed author's own Keras "
        "layer "
        "(= `su-unit` routing) with his script's protocol (Adam, batch 128, pool 20 / capsule 10 epochs), "
        "scored by "
        "the pairing contract; ranges over two seeds. *Probe*: scratch PyTorch, one seed, `su` routing, 20 "
        "epochs "
        "one-cycle 3e-3, ±3 px shifts.\n",
        TARGETS + "\n",
        "## At a glance\n",
        "Mean over the seeds run; cells are accuracy / confident accuracy. A row whose *changed* column is "
        "not "
        "empty differs from its recipe in those settings only (recipe-choice comparisons). Rows marked "
        "**holdout=N** were trained without N training images (a fixed random draw) and scored on those "
        "images "
        "and on composites built from them: the recipe is chosen on these rows, never on the test set. Their "
        "columns hold held-out scores, not test scores. **limit=N**: trained on the first N training images; "
        "eval-limit=N: scored on the first N images or composites of each test.\n",
        _overview(items),
        _choice(items),
    ]
    pairs_items = [(f, r) for f, r in items if r["kind"] == "pairs"]
    if pairs_items:
        out.append("## Paired-digit experiments\n")
        out += [_pairs_section(f, r, doc_dir) for f, r in pairs_items]
    ablations = [(f, r) for f, r in items if r["kind"] == "ablate"]
    if ablations:
        out.append("## Routing ablations\n")
        out.append("Paired accuracy = mean of vertical and horizontal pairs accuracy.\n")
        out += [_ablate_section(f, r, doc_dir) for f, r in ablations]
    speed = _bench_sections(items)
    if speed:
        out.append("## Training speed (`capsctl bench`)\n")
        out += speed
    out += ["## Not run here (commands to run them)\n", _not_run(items)]
    return "\n".join(out)


def render_section(folders: Sequence[Path], doc: Path, results: Sequence[dict[str, Any]], title: str) -> str:
    """One generated section of `doc` (between its markers): the overview, the recipe choice and each
    folder's tables, under heading `title`; the rest of the file is left as it is."""
    items = list(zip(folders, results, strict=True))
    cmd = _report_command(folders, doc, "--section", title)
    out = [
        _section_marks(title)[0],
        f"## {title}\n",
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the result "
        f"folders' {_sources(items)}; do not edit this section by hand, rerun that command (it replaces this "
        "section only). Cells are accuracy / confident accuracy, mean over the seeds run. "
        f"{RECIPE_HISTORY}\n",
        _overview(items),
        _choice(items, heading="###"),  # a subsection of this section
    ]
    out += [_pairs_section(f, r, doc.parent) for f, r in items if r["kind"] == "pairs"]
    out += [_ablate_section(f, r, doc.parent) for f, r in items if r["kind"] == "ablate"]
    out += _bench_sections(items)
    out.append(_section_marks(title)[1])
    return "\n".join(x for x in out if x)


_SECTION_START = "<!-- capsctl report section: "  # (the marks' beginning: a file holding one is a report)


def _section_marks(title: str) -> tuple[str, str]:
    return f"{_SECTION_START}{title} -->\n", f"<!-- end of capsctl report section: {title} -->\n"


def _generated_sections(text: str) -> list[tuple[str, str]]:
    """(title, the whole section with its marks) of every section `--section` wrote into `text`."""
    head = _SECTION_START
    out = []
    at = text.find(head)
    while at >= 0:
        close = text.find(" -->\n", at)
        title = text[at + len(head) : close]
        end = _section_marks(title)[1]
        stop = text.find(end, at) if close >= 0 else -1
        if stop < 0:  # an unfinished section (edited by hand): left out, not guessed at
            at = text.find(head, at + 1)
            continue
        out.append((title, text[at : stop + len(end)]))
        at = text.find(head, stop)
    return out


def _replace_section(text: str, title: str, section: str) -> str:
    """`text` with the section `title` replaced by `section`, or `section` put before its first `## `
    heading or other generated section, whichever comes first (at the end if it has neither), when it
    has no such section yet: never inside another section."""
    start, end = _section_marks(title)
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        return text[:a] + section + text[b:]
    probe = "\n" + text  # (a heading on the first line counts too: probe index i is text index i)
    found = [i for i in (probe.find("\n## "), probe.find("\n" + _SECTION_START)) if i >= 0]
    if not found:
        return text.rstrip("\n") + "\n\n" + section
    at = min(found)
    return text[:at] + section + "\n" + text[at:]


def _damaged(folders: Sequence[Path], results: Sequence[dict[str, Any]]) -> str | None:
    """The results.json whose own report fails (each rendered alone: rendering writes nothing)."""
    for f, r in zip(folders, results, strict=True):
        try:
            render([f], Path("R.md"), [r])
        except DAMAGE:
            return str(f / "results.json")
    return None


def write_report(folders: Sequence[Path], doc: Path, section: str | None = None) -> None:
    """Write `doc` from `folders`; with `section`, only that section of the existing `doc` is rewritten."""
    if not folders:
        raise CapsctlError("report: give at least one result folder")
    if section is not None and (not section.strip() or "\n" in section or "--" in section):
        raise CapsctlError(f"--section {section!r}: give a one-line title without '--'")
    # (`.` or `..` as ../NAME: its plots go to results/NAME, never to results/ itself, and the command
    # that regenerates the report still names it relative to here)
    folders = [_named(f) if f.name in ("", "..") else f for f in folders]
    names: dict[str, Path] = {}
    for f in folders:  # each folder's plots are copied to results/<its name> beside the report
        if f.name in names:
            raise CapsctlError(
                f"report: {names[f.name]} and {f} are both named {f.name!r}: their plots would share "
                f"results/{f.name}; rename one"
            )
        names[f.name] = f
    results = [_load(f) for f in folders]
    old = _read_doc(doc, section is not None)
    _check_kept_plots(old, section, names, doc.parent / "results")
    try:  # (the text only: nothing is written until every section has rendered)
        if section is None:
            new = render(folders, doc, results)
        else:
            new = render_section(folders, doc, results, section)
    except DAMAGE as e:  # (load_results read every file's own tables: this is a field the report adds)
        where = _damaged(folders, results) or "a results file"
        raise CapsctlError(
            f"report: {where} is damaged inside ({type(e).__name__}: {e}); rerun the experiment that wrote it"
        ) from None
    if section is None:  # the sections made with --section stay, in their order, before the rest
        for title, block in reversed(_generated_sections(old or "")):
            new = _replace_section(new, title, block)
    else:
        new = _replace_section(old or "# Results\n", section, new)
    _install_plots(folders, doc, new)


def _load(folder: Path) -> dict[str, Any]:
    """An experiment's results.json or, in a folder without one, the `capsctl bench --json` outputs."""
    if not (folder / "results.json").exists() and folder.is_dir() and any(folder.glob("*.json")):
        return load_bench_runs(folder)
    return load_results(folder)


def _sources(items: list[tuple[Path, dict[str, Any]]]) -> str:
    kinds = {r["kind"] == BENCH_KIND for _, r in items}
    names = {False: "results.json", True: "`capsctl bench --json` outputs"}
    return " and ".join(names[k] for k in sorted(kinds))


def _bench_sections(items: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    return [bench_markdown(f.name, g) for f, r in items if r["kind"] == BENCH_KIND for g in r["groups"]]


def _named(folder: Path) -> Path:
    real = Path(os.path.abspath(folder))
    return Path(os.path.relpath(real.parent)) / real.name if real.name else real


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and a.read_bytes() == b.read_bytes()


def _check_kept_plots(old: str | None, section: str | None, names: dict[str, Path], plots_dir: Path) -> None:
    """Refuse a folder whose name a part of the report that stays (the sections --section wrote, or with
    --section the rest of the report) shows plots under: its plots would replace theirs, and that part
    would show this folder's curves under its own numbers."""
    if not old:
        return
    if section is None:
        kept = "".join(block for _, block in _generated_sections(old))
    else:
        kept = old
        for title, block in _generated_sections(old):
            if title == section:
                kept = kept.replace(block, "")
    shown = set(re.findall(r"\]\(results/([^/)]+)/", kept))
    for name in sorted(shown & set(names)):
        # (the same plots again, from the folder that part shows, change nothing)
        if all(_same_file(plots_dir / name / png.name, png) for png in names[name].glob("*.png")):
            continue
        where = "the rest of the report" if section is not None else "a section written with --section"
        raise CapsctlError(
            f"report: {where} shows other plots under results/{name}/, which {names[name]}'s would replace; "
            f"rename the folder, or regenerate that part with it"
        )


def _read_doc(doc: Path, for_section: bool) -> str | None:
    """The report being rewritten, or None when there is none yet; a file that is not text, or (rewritten
    whole) not a report capsctl wrote, is refused: it would be lost."""
    try:
        text = doc.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise CapsctlError(f"--out {doc}: not a UTF-8 text file (not a report capsctl wrote)") from None
    # rewritten whole, a file capsctl did not write would be lost (a README.md given as --out, say), and so
    # would the user's own text around the sections --section added to one
    rest = text
    for _, block in _generated_sections(text):
        rest = rest.replace(block, "")
    ours = "Generated by `capsctl experiment report" in rest or rest.strip() in ("", "# Results")
    if not for_section and text.strip() and not ours:
        raise CapsctlError(
            f"--out {doc}: not a report capsctl wrote (it would be replaced whole, with the text around its "
            "sections); choose another path, or rewrite one section of it with --section TITLE"
        )
    return text
