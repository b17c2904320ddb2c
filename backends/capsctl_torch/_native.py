"""PyTorch-native files: a plain `state_dict` (export/import) and an ONNX graph (export only).

The state_dict file is what `torch.save(model.state_dict())` writes for this backend's CapsNet:
`load_state_dict(strict=True)` accepts it and `torch.load(..., weights_only=True)` reads it
without unpickling code. The model spec travels inside the state_dict's own `_metadata[""]`
(the per-module metadata torch already saves and restores under weights_only; load_state_dict
reads only its "version" key), so `capsctl import` can rebuild the model from the file alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from capsctl.errors import CapsctlError, first_line, reraise_interrupt
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import MODEL_FORMAT, check_weights, other_format

from ._layers import CapsNet, mask, safe_norm
from ._runner import build
from ._weights import table, to_canonical

FORMAT_KEY = "capsctl_format"
SPEC_KEY = "capsctl_spec"


# -- state_dict ------------------------------------------------------------------------------

def state_dict_bytes(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> bytes:
    """The model as a `torch.save`d state_dict whose metadata carries the spec."""
    state = build(spec, weights).cpu().state_dict()
    for key, value in state.items():  # plain contiguous tensors, not channels_last views
        state[key] = value.contiguous()
    state._metadata[""].update({FORMAT_KEY: MODEL_FORMAT, SPEC_KEY: spec.to_json()})  # type: ignore[attr-defined]
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def import_native(path: str) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about unusual pickle protocols on stderr: noise on top of our one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CapsctlError(f"{path}: no such file") from None
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: not advice to pass on
        raise CapsctlError(
            f"{path}: not a readable torch state_dict file (damaged, or it holds Python objects, "
            "which are never unpickled)"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CapsctlError(f"{path}: not a readable torch state_dict file ({first})") from None
    if not isinstance(state, Mapping):
        raise CapsctlError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    meta = (getattr(state, "_metadata", None) or {}).get("", {})
    fmt = meta.get(FORMAT_KEY) if isinstance(meta, Mapping) else None
    if isinstance(fmt, str) and fmt.startswith("capsctl/") and fmt != MODEL_FORMAT:
        raise CapsctlError(f"{path}: {other_format(fmt)}")
    if (
        not isinstance(meta, Mapping)
        or meta.get(FORMAT_KEY) != MODEL_FORMAT
        or not isinstance(meta.get(SPEC_KEY), str)
    ):
        raise CapsctlError(
            f"{path}: not a capsctl torch export (its state_dict carries no capsctl model spec); "
            "only files written by `capsctl export --format torch` can be imported"
        )
    try:
        spec = ModelSpec.from_json(meta[SPEC_KEY])
    except CapsctlError as e:
        raise CapsctlError(f"{path}: {e}") from None
    names = table(spec)
    wanted = {native for native, _ in names.values()}
    for key in state:
        if key not in wanted:
            raise CapsctlError(f"{path}: tensor {key!r} is not part of the model its spec describes")
    native: dict[str, np.ndarray] = {}
    for key in sorted(wanted):
        value = state.get(key)
        if value is None:
            raise CapsctlError(f"{path}: tensor {key!r} is missing (the spec needs it)")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise CapsctlError(f"{path}: {key!r} is not a float32 tensor")
        native[key] = value.detach().cpu().numpy()
    canonical = _canonical_checked(spec, native, path)
    return spec, canonical


def _canonical_checked(spec: ModelSpec, native: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    # shapes first in native terms: a transposition of a wrong-rank tensor would fail unhelpfully
    from capsctl.model.weights import expected_shapes

    shapes = expected_shapes(spec)
    for name, (key, perm) in table(spec).items():
        want = shapes[name] if not perm else tuple(shapes[name][i] for i in np.argsort(perm))
        if tuple(native[key].shape) != want:
            raise CapsctlError(
                f"{path}: tensor {key!r} has shape {list(native[key].shape)}, the spec needs {list(want)}"
            )
    canonical = to_canonical(spec, native)
    check_weights(spec, canonical, path)
    return canonical


# -- ONNX ------------------------------------------------------------------------------------

class _ChannelsLast(torch.nn.Module):
    """The graph takes images (B, H, W, C) like every capsctl interface, and returns scores (B, J);
    with a decoder also the reconstruction (B, H, W, C) from the top-scoring class's capsule."""

    def __init__(self, net: CapsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)
        if self.net.decoder is None:
            return self.net(x)
        v = self.net.capsules(x)
        scores = safe_norm(v)
        onehot = torch.nn.functional.one_hot(scores.argmax(1), scores.shape[1]).to(v.dtype)
        return scores, self.net.decoder(mask(v, onehot)).permute(0, 2, 3, 1)


def _fixed_size(spec: ModelSpec) -> tuple[int, int]:
    """Non-shared capsule weights fix N (H'·W', or H'·W'·types): the image size they were made for."""
    found = spec.fixed_input_size()
    if found is not None:
        return found
    raise CapsctlError(
        f"no square image size gives this model's {spec.capsule.num_inputs} capsule inputs and the file does "
        "not record its training size (written before capsctl recorded it); train it again to export ONNX"
    )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs optional-op registrations (torchvision) and deprecation notices on every
    # run; none concerns the user's model.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


ONNX_TORCH = (2, 5)  # the first torch whose torch.onnx.export takes dynamo=True with dynamic_shapes


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string ('2.13.0+cpu' -> (2, 13))."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return ONNX_TORCH  # (a build whose version does not parse: let the exporter say)


def onnx_bytes(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> bytes:
    """The model as ONNX: input `images` (B, H, W, C) float32, output `scores` (B, J); a model with
    a decoder has a second output `reconstruction` (B, H, W, C) drawn from the argmax class's capsule.

    Routing is unrolled (R iterations of plain tensor ops). The batch is always dynamic; height
    and width are dynamic too unless the capsule weights are per-position (then fixed)."""
    import onnx

    net = _ChannelsLast(build(spec, weights).cpu().eval())
    dyn: dict[int, object] = {0: torch.export.Dim("batch", min=1)}
    if spec.head == "pool" or spec.capsule.shared:
        side = max(spec.min_image_size(), 28)
        size = (side, side)
        lo = spec.min_image_size()
        dyn[1] = torch.export.Dim("height", min=lo, max=1 << 14)
        dyn[2] = torch.export.Dim("width", min=lo, max=1 << 14)
    else:
        size = _fixed_size(spec)
    example = torch.zeros(2, *size, spec.in_channels)
    if spec.decoder is not None and spec.decoder.image_shape is not None:  # traced at the training size
        example = torch.zeros(2, *spec.decoder.image_shape)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                net, (example,), input_names=["images"], dynamo=True,
                output_names=["scores"] if spec.decoder is None else ["scores", "reconstruction"],
                dynamic_shapes={"images": dyn}, verbose=False,
            )
    except Exception as e:  # (the exporter's own errors: torch.export, onnxscript; --debug shows them whole)
        reraise_interrupt(e)
        raise CapsctlError(
            f"torch {torch.__version__} could not export this model to ONNX ({first_line(e)}); "
            "export --format torch and .keras still work"
        ) from e
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {FORMAT_KEY: MODEL_FORMAT, SPEC_KEY: spec.to_json()})
    proto.doc_string = "capsctl model: images (B, H, W, C) float32 in [0, 1] -> class scores (B, J)"
    return proto.SerializeToString()


def export_bytes(spec: ModelSpec, weights: Mapping[str, np.ndarray], format: str) -> bytes:
    """`capsctl export`: the state_dict (format 'torch') or the ONNX graph ('onnx')."""
    if format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise CapsctlError(
                f"--format onnx needs {', '.join(missing)}; install it with: pip install 'capsctl[onnx]'"
            )
        if _release(torch.__version__) < ONNX_TORCH:  # (dynamo=True with dynamic_shapes)
            raise CapsctlError(
                f"--format onnx needs torch {'.'.join(map(str, ONNX_TORCH))} or newer (this is "
                f"{torch.__version__}): pip install 'torch>={'.'.join(map(str, ONNX_TORCH))}'"
            )
        return onnx_bytes(spec, weights)
    return state_dict_bytes(spec, weights)
