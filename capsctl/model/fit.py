"""Does a model fit the images it is given? Checked before any framework work, so that a mismatch
is one line naming the model and the data instead of a framework's traceback."""

from __future__ import annotations

import numpy as np

from capsctl.errors import CapsctlError
from capsctl.model.spec import ModelSpec


def check_fit(
    spec: ModelSpec,
    images: np.ndarray,
    labels: np.ndarray | None,
    source: str,
    data: str,
    single_digits: bool = False,
    data_args: str = "",
) -> None:
    """Raise CapsctlError("<source>: ...") when `spec` cannot run on `images` (N, H, W, C) or
    cannot score `labels`; `data` names the images in the message (e.g. "mnist test images").
    `single_digits`: `images` are a test set and `source` a model file, so a model that takes the overlap
    composites of them is pointed at `eval-pairs --layout overlap` (with `data_args`, the data options
    that name those images)."""
    if images.ndim != 4:
        raise CapsctlError(f"{source}: {data} have shape {list(images.shape)}, expected (N, H, W, C)")
    h, w, c = (int(d) for d in images.shape[1:])
    if c != spec.in_channels:
        raise CapsctlError(f"{source}: the model takes {spec.in_channels}-channel images, {data} have {c}")
    try:
        spec.trunk_grid(h, w)
        if spec.head == "capsule":
            spec.capsule_grid(h, w)  # (primary capsules need their kernel's window too)
    except CapsctlError:
        hint = overlap_hint(spec, h, w, source, data_args) if single_digits else ""
        raise CapsctlError(f"{source}: {_too_small(spec, h, w, data)}{hint}") from None
    caps = spec.capsule
    if not spec.takes_size(h, w):
        hint = overlap_hint(spec, h, w, source, data_args) if single_digits else ""
        made_for = spec.fixed_input_size()
        of = f" (of {made_for[0]}x{made_for[1]} images)" if made_for is not None else ""
        given = _capsules_given(spec, h, w).replace("its ", "their ")
        if source == "model spec":  # (training: a hand-written count, or a resumed run on other data)
            raise CapsctlError(
                f"model spec: capsule.num_inputs is {caps.num_inputs}{of} but {h}x{w} {data} give {given}; "
                "per-position capsule weights take the images they were made for (in a hand-written spec, "
                "leave capsule.num_inputs and capsule.image_size out: training sets them)"
            )
        raise CapsctlError(
            f"{source}: the capsule weights are fixed to {caps.num_inputs} input capsules{of} "
            f"but {h}x{w} {data} give {given}; use a model with shared capsule weights{hint}"
        )
    if labels is not None and labels.size and int(labels.max()) >= spec.num_classes:
        raise CapsctlError(
            f"{source}: {data} hold label {int(labels.max())}, the model has only {spec.num_classes} classes"
        )


def check_takes(spec: ModelSpec, height: int, width: int, image: str, model: str) -> None:
    """Refuse one `image` of height x width (one the trunk takes) that the model's per-position capsule
    weights do not fit: another input capsule count, or the count in another grid (a transposed size);
    the line names the --resize that fits."""
    if spec.takes_size(height, width):
        return
    raise CapsctlError(
        f"{image}: gives {_capsules_given(spec, height, width)}, but {model} has per-position capsule "
        f"weights for {spec.capsule.num_inputs} inputs ({resize_hint(spec)})"
    )


def _capsules_given(spec: ModelSpec, height: int, width: int) -> str:
    """What height x width gives per-position capsule weights that do not take it: "N input capsules", or,
    the count right, "its input capsules in another grid" (a transposed size)."""
    n = spec.capsule_count(height, width)
    return f"{n} input capsules" if n != spec.capsule.num_inputs else "its input capsules in another grid"


def resize_hint(spec: ModelSpec) -> str:
    """The `--resize` to suggest for an image the model cannot take: the square size that gives its input
    capsule count (non-shared weights: 28 when it does, else the size the model was made for; a model
    trained on non-square images has none, and is told so), else MNIST's 28 or the model's smallest size."""
    caps = spec.capsule
    if spec.head == "capsule" and not caps.shared and caps.num_inputs is not None:
        made_for = spec.fixed_input_size()
        if made_for is None:  # (a file written before the training size was recorded)
            return f"try --resize to the size it was trained on ({caps.num_inputs} input capsules)"
        return f"try --resize {made_for[0]}x{made_for[1]}"
    side = max(spec.min_image_size(), 28)
    return f"try --resize {side}x{side}"


def overlap_hint(spec: ModelSpec, h: int, w: int, model: str = "MODEL", data_args: str = "") -> str:
    """"; it takes overlap composites of them (...)" when `spec` runs on the overlap composites' canvas of
    h x w digits (a model trained with --compose overlap, e.g. efficient-multimnist), else ""."""
    from capsctl.training.compose import canvas

    ch, cw = canvas(h, w)
    try:
        spec.trunk_grid(ch, cw)
        if spec.head == "capsule":
            spec.capsule_grid(ch, cw)  # (primary capsules need their kernel's window too)
        fits = spec.takes_size(ch, cw)
    except CapsctlError:
        return ""
    if not fits:
        return ""
    return (
        f"; it takes overlap composites of them ({ch}x{cw}): capsctl eval-pairs {model} --layout overlap"
        f"{data_args}"
    )


def _too_small(spec: ModelSpec, h: int, w: int, data: str) -> str:
    side = spec.min_image_size()
    return f"{data} are {h}x{w}, too small for the model (it needs at least {side}x{side})"


def with_training_inputs(
    spec: ModelSpec, height: int, width: int, composed: bool, composable: bool = True
) -> ModelSpec:
    """`spec` with N, the input capsule count, set from its training images (height x width, the
    composites' canvas included) when its capsule weights are non-shared and N is not given yet.
    `composable`: the command can train on composites (`--compose`), so a too-small error may say so.
    A hand-written N that the images give gets their size recorded too (without it a transposed image was
    taken, and ONNX export had no size); one they don't give is left for check_fit to refuse."""
    if spec.head != "capsule" or spec.capsule.shared:
        return spec
    given = spec.capsule.image_size
    if given is not None and tuple(given) != (height, width):  # (it was dropped without a word)
        raise CapsctlError(
            f"model spec: capsule.image_size is {given[0]}x{given[1]} but the training images are "
            f"{height}x{width}; leave it out: training sets it from the images"
        )
    n = training_capsule_count(spec, height, width, composed, composable)
    if spec.capsule.num_inputs not in (None, n):
        return spec
    # (recorded where N alone does not give it back: not square, or another side gives N too)
    size = given or spec.recorded_size(height, width)
    return spec.with_capsule(num_inputs=n, image_size=size)


def training_capsule_count(
    spec: ModelSpec, height: int, width: int, composed: bool, composable: bool = True
) -> int:
    """N, the input capsules a model with non-shared capsule weights is built for from its training
    images (height x width, composites' canvas included), or a one-line error when they are too small;
    it suggests --compose overlap when the composites' canvas would fit (a preset made for MultiMNIST)."""
    try:
        return spec.capsule_count(height, width)
    except CapsctlError:
        from capsctl.data.composites import OVERLAP_SHIFT

        side = spec.min_image_size()
        big = height + 2 * OVERLAP_SHIFT >= side and width + 2 * OVERLAP_SHIFT >= side
        hint = ""
        if big and not composed:  # (ablate has no --compose: its models train on single images)
            hint = (
                "; --compose overlap trains it on composites of them"
                if composable
                else "; `capsctl experiment pairs --compose overlap` trains it on composites of them"
            )
        raise CapsctlError(_too_small(spec, height, width, "the training images") + hint) from None
