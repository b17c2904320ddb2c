"""What an experiment trains: the tests it scores, one `Job` per model, and the two plans (pairs, ablate)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from capsctl.choices import ABLATE_ROUTINGS, ABLATE_SQUASHES, ALL_TESTS, DATASETS
from capsctl.choices import COMPOSITE_TESTS as COMPOSITE_TESTS  # (test name -> layout, digits)
from capsctl.model.spec import HEADS, DecoderSpec, ModelSpec, default_recon_weight, numbered
from capsctl.training.config import TrainConfig
from capsctl.training.recipes import get_recipe

# Per-epoch curves use the first N test images: the full test set is scored once at the end,
# and scoring 10k images every epoch would cost a third of the training time on a small CPU.
CURVE_TEST_IMAGES = 2000


COMPOSITE_SEED = 0  # the pairing contract's default seed; never tuned on

# `experiment pairs --decoder`: the capsule head with the reconstruction decoder, as one more head variant
# (results rows "capsule+decoder", run folders BACKEND-RECIPE-capsule-decoder-sSEED)
DECODER_HEAD = "capsule+decoder"


@dataclass(frozen=True)
class DataFacts:
    """What the model takes from the data, as `capsctl train` does: classes and the image shape."""

    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (H, W, C) of the training images
    background: str | None = None  # 'light': gray images of dark ink on light (the spec's background)

    def follow(self, spec: ModelSpec) -> ModelSpec:
        """`spec` with the channels, class count and names, and the decoder's image shape of the data
        (as `capsctl train` sets them, so a run it made is the same run)."""
        names = None if self.classes == numbered(len(self.classes)) else self.classes
        changes: dict[str, Any] = {
            "in_channels": self.shape[2],
            "num_classes": len(self.classes),
            "class_names": names,
            "background": self.background,
        }
        if spec.decoder is not None and spec.decoder.image_shape is None:
            changes["decoder"] = DecoderSpec(spec.decoder.hidden, self.shape)
        return spec.replace(**changes)


@dataclass(frozen=True)
class Overrides:
    """Changes to the recipe or the capsule spec, for recipe-choice comparisons; None = recipe's."""

    epochs: int | None = None
    batch_size: int | None = None
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
                "batch_size": "b",
                "schedule": "",
                "routing": "",
                "squash": "sq",
                "routings": "r",
            }.get(key, key)
            parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
        return "-".join(parts)

    def active(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _effective(ov: Overrides, own: dict[str, Any], spec: ModelSpec) -> Overrides:
    """`ov` less what changes nothing: a recipe setting equal to the recipe's own (`own`), a capsule
    setting equal to the spec's, and capsule settings on a pooling head (which has no routing)."""
    same: dict[str, None] = {}
    for key, value in asdict(ov).items():
        if value is None or key == "epochs":
            continue
        if key in own:
            unchanged = value == own[key]
        else:
            unchanged = spec.head != "capsule" or getattr(spec.capsule, key) == value
        if unchanged:
            same[key] = None
    return replace(ov, **same)


@dataclass(frozen=True)
class Job:
    head: str
    seed: int
    spec: ModelSpec
    config: TrainConfig
    run: Path
    # the overrides that change this model ({name: value}; a recipe's or the model's own value left out)
    changes: dict[str, Any] = field(default_factory=dict)


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
    image_size: str | None = None,
    data: DataFacts | None = None,
    split: tuple[int | None, float | None] = (None, None),
    arch: str = "seed",
    compose: str | None = None,
    composable: bool = True,
) -> Job:
    """One model of an experiment, configured as `capsctl train` with the same options configures it
    (head DECODER_HEAD: `capsctl train --decoder`), so either can finish the other's run. `holdout` is
    the count of held-out images (the folder name); `split` the user's (--holdout, --val-fraction), recorded
    so that `capsctl train --resume` holds out the same images. `compose`: trained on composites, as
    `capsctl train --compose` (the model takes the composites' canvas); `composable`: the experiment
    offers --compose (ablate does not), for the hint of a too-small error."""

    rec = get_recipe(recipe)
    decoder = head == DECODER_HEAD
    if arch == "seed" or head == "pool":
        spec = ModelSpec(head="capsule" if decoder else head, decoder=DecoderSpec() if decoder else None)
    else:  # as `capsctl train --arch ARCH [--decoder]`
        from capsctl.model.presets import preset

        spec = preset(arch)
        if decoder and spec.decoder is None:
            spec = spec.replace(decoder=DecoderSpec())
    if data is not None:
        if compose is not None:  # the model sees (and its decoder draws) the composites' canvas
            from capsctl.training.compose import canvas

            data = DataFacts(data.classes, (*canvas(*data.shape[:2]), data.shape[2]), data.background)
        spec = data.follow(spec)
        from capsctl.model.fit import with_training_inputs

        spec = with_training_inputs(spec, *data.shape[:2], compose is not None, composable)
    as_built = spec  # (before the overrides: what `_effective` compares them with)
    if spec.head == "capsule":
        caps = {
            k: v
            for k, v in (("routing", ov.routing), ("squash", ov.squash), ("routings", ov.routings))
            if v is not None
        }
        if caps:
            spec = spec.with_capsule(**caps)
    settings = rec.settings(
        spec.head,
        epochs=ov.epochs,
        batch_size=ov.batch_size,
        lr=ov.lr,
        schedule=ov.schedule,
        # composites shift their digits themselves (as `capsctl train --compose`)
        shift=0 if compose is not None and ov.shift is None else ov.shift,
        scale=0.0 if compose is not None and ov.scale is None else ov.scale,
        weight_decay=ov.weight_decay,
    )
    # the experiment passes its own curve split (CURVE_TEST_IMAGES) and scores every epoch on all of it
    cfg = TrainConfig(
        backend=backend,
        # a path to the user's data is recorded absolute, as `capsctl train` records it
        dataset=dataset if dataset in DATASETS else str(Path(dataset).absolute()),
        image_size=image_size,
        seed=seed,
        limit=limit,
        recipe=recipe,
        curve_images=None,
        holdout=split[0],
        val_fraction=split[1],
        recon_weight=default_recon_weight(spec) if spec.decoder is not None else None,
        compose=compose,
        **settings,
    )
    # a value the recipe or the preset already has changes nothing: the same run folder, not a retrain
    own = rec.settings(spec.head, shift=0 if compose is not None else None,
                       scale=0.0 if compose is not None else None)
    effective = _effective(ov, own, as_built)
    if name is None:
        tag = effective.tag()
        label = head.replace("+", "-")
        kind = "" if arch == "seed" or head == "pool" else arch
        composed = f"compose-{compose}" if compose is not None else ""
        held = f"holdout{holdout}" if holdout else ""
        parts = [backend, recipe, kind, label, tag, composed, held, f"s{seed}"]
        name = "-".join(p for p in parts if p)
    return Job(head, seed, spec, cfg, out / "runs" / name, effective.active())


@dataclass(frozen=True)
class PairsPlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seeds: tuple[int, ...]
    heads: tuple[str, ...] = HEADS
    arch: str = "seed"  # the capsule models' architecture (capsctl.model.presets)
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ALL_TESTS
    overrides: Overrides = Overrides()
    holdout: int | None = None  # score on N held-out training images (recipe choice), not the test set
    val_fraction: float | None = None  # as holdout, with this fraction of the training images
    command: str = ""
    train: bool = True  # False: score and tabulate finished models only
    decoder: bool = False  # also the capsule head with the reconstruction decoder (DECODER_HEAD)
    image_size: str | None = None  # 'HxW': --dataset PATH images scaled to fit (as `capsctl train`)
    compose: str | None = None  # train on composites ('overlap': `capsctl train --compose overlap`)

    @property
    def variants(self) -> tuple[str, ...]:
        """The heads trained for each seed: --heads, then DECODER_HEAD with --decoder."""
        return (*self.heads, DECODER_HEAD) if self.decoder else self.heads


@dataclass(frozen=True)
class AblatePlan:
    backend: str
    dataset: str
    data_dir: str | None
    recipe: str
    seed: int
    arch: str = "seed"  # the capsule models' architecture (capsctl.model.presets)
    routings: tuple[str, ...] = ABLATE_ROUTINGS
    squashes: tuple[str, ...] = ABLATE_SQUASHES
    iterations: tuple[int, ...] = (1, 2, 3, 5, 8)
    eval_iterations: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    base_iterations: int = 3  # the model evaluated at every eval_iterations count
    epochs: int | None = None
    shift: int | None = None  # None = the recipe's
    limit: int | None = None
    eval_limit: int | None = None
    tests: tuple[str, ...] = ("test", "vertical", "horizontal")
    command: str = ""
