"""What an experiment trains: the tests it scores, one `Job` per model, and the two plans (pairs, ablate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capsctl.choices import ALL_TESTS
from capsctl.choices import COMPOSITE_TESTS as COMPOSITE_TESTS  # (test name -> layout, digits)
from capsctl.model.spec import HEADS, ROUTINGS, SQUASHES, ModelSpec
from capsctl.training.config import TrainConfig
from capsctl.training.recipes import get_recipe

# Per-epoch curves use the first N test images: the full test set is scored once at the end,
# and scoring 10k images every epoch would cost a third of the training time on a small CPU.
CURVE_TEST_IMAGES = 2000


COMPOSITE_SEED = 0  # the pairing contract's default seed; never tuned on




@dataclass(frozen=True)
class Overrides:
    """Changes to the recipe or the capsule spec, for recipe-choice comparisons; None = recipe's."""

    epochs: int | None = None
    lr: float | None = None
    schedule: str | None = None
    shift: int | None = None
    scale: float | None = None
    weight_decay: float | None = None
    routing: str | None = None
    squash: str | None = None
    routings: int | None = None

    def tag(self) -> str:
        """A short, stable folder-name suffix naming the changes ('' for none)."""
        parts = []
        for key, value in asdict(self).items():
            if value is None or key == "epochs":
                continue
            short = {
                "weight_decay": "wd",
                "schedule": "",
                "routing": "",
                "squash": "sq",
                "routings": "r",
            }.get(key, key)
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
        return "-".join(parts)

    def active(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Job:
    head: str
    seed: int
    spec: ModelSpec
    config: TrainConfig
    run: Path


def make_job(
    out: Path,
    backend: str,
    dataset: str,
    recipe: str,
    head: str,
    seed: int,
    limit: int | None,
    ov: Overrides,
    name: str | None = None,
    holdout: int | None = None,
) -> Job:

    rec = get_recipe(recipe)
    spec = ModelSpec(head=head)
    if head == "capsule":
        caps = {
            k: v
            for k, v in (("routing", ov.routing), ("squash", ov.squash), ("routings", ov.routings))
            if v is not None
        }
        if caps:
            spec = spec.with_capsule(**caps)
    settings = rec.settings(
        head,
        epochs=ov.epochs,
        lr=ov.lr,
        schedule=ov.schedule,
        shift=ov.shift,
        scale=ov.scale,
        weight_decay=ov.weight_decay,
    )
    # the experiment passes its own curve split (CURVE_TEST_IMAGES) and scores every epoch on all of it
    cfg = TrainConfig(backend=backend, dataset=dataset, seed=seed, limit=limit, recipe=recipe,
                      curve_images=None,
                      **settings)
    if name is None:
        tag = ov.tag()
        parts = [backend, recipe, head, tag, f"holdout{holdout}" if holdout else "", f"s{seed}"]
        name = "-".join(p for p in parts if p)
    return Job(head, seed, spec, cfg, out / "runs" / name)


@dataclass(frozen=True)
class PairsPlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seeds: tuple[int, ...]
    heads: tuple[str, ...] = HEADS
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ALL_TESTS
    overrides: Overrides = Overrides()
    holdout: int | None = None  # score on N held-out training images (recipe choice), not the test set
    command: str = ""
    train: bool = True  # False: score and tabulate finished models only


@dataclass(frozen=True)
class AblatePlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seed: int
    routings: tuple[str, ...] = ROUTINGS
    squashes: tuple[str, ...] = SQUASHES
    iterations: tuple[int, ...] = (1, 2, 3, 5, 8)
    eval_iterations: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    base_iterations: int = 3  # the model evaluated at every eval_iterations count
    epochs: int | None = None
    shift: int | None = None  # None = the recipe's
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ("test", "vertical", "horizontal")
    command: str = ""
