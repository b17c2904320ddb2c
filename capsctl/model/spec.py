"""The backend-neutral model description (`ModelSpec`) and its JSON contract.

The JSON field names are a contract shared with weight files and other tools: change
none of them without bumping the weight-file format.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Literal

from capsctl.choices import HEADS, PRIMARY_KINDS, ROUTINGS, SQUASHES
from capsctl.errors import CapsctlError

EPS = 1e-7  # inside every square root of squash, capsule norms and scores
# batch normalisation (trunk layers with batchnorm): y = γ·(x − μ)/sqrt(σ² + BN_EPS) + β, with the
# batch's μ, σ² (biased) in training and the running ones at inference, updated after each training
# batch as running = BN_MOMENTUM·running + (1 − BN_MOMENTUM)·batch (Keras' convention and defaults)
BN_EPS = 1e-3
BN_MOMENTUM = 0.99


PADDINGS = ("valid", "same")


@dataclass(frozen=True)
class ConvLayer:
    filters: int  # output channels; bias, ReLU
    kernel: int = 3  # square kernel size
    type: Literal["conv"] = "conv"
    stride: int = 1  # the same in both directions
    # 'valid': no padding; 'same': (kernel-1)/2 zeros each side (odd kernels, stride 1: size kept)
    padding: str = "valid"
    # batch normalisation after the ReLU (Efficient-CapsNet's order); weights trunk.{k}.bn.{gamma, beta,
    # mean, var}, the last two running statistics (not trained, saved with the model)
    batchnorm: bool = False

    def out_size(self, side: int) -> int:
        """The output's side for an input side (either direction)."""
        if self.padding == "same":
            return side
        return (side - self.kernel) // self.stride + 1 if side >= self.kernel else 0


@dataclass(frozen=True)
class PrimarySpec:
    """Primary capsules: a convolution over the trunk's output whose TYPES·DIM channels at each position
    are read as TYPES capsules of DIM dimensions (channel t·DIM + d is dimension d of type t), each
    squashed with the head's squash. The input capsules of the routing are then row-major over (row,
    column, type): N = H'·W'·TYPES, each DIM wide. No ReLU before the squash.
    - 'conv' (Sabour et al. 2017): a full convolution with bias, [k, k, C, TYPES·DIM];
    - 'depthwise' (Mazzia et al. 2021, Efficient-CapsNet): one k×k filter per input channel with bias,
      [k, k, C, 1], so TYPES·DIM must equal the trunk's channels C."""

    kind: str = "conv"  # 'conv' or 'depthwise'
    types: int = 32  # capsule types (channels / DIM)
    dim: int = 8  # dimensions of each primary capsule
    kernel: int = 9  # square kernel size, 'valid' padding
    stride: int = 2

    def out_size(self, side: int) -> int:
        return (side - self.kernel) // self.stride + 1 if side >= self.kernel else 0


@dataclass(frozen=True)
class AvgPoolLayer:
    size: int = 2  # square window and stride
    type: Literal["avgpool"] = "avgpool"


TrunkLayer = ConvLayer | AvgPoolLayer


@dataclass(frozen=True)
class CapsuleSpec:
    dim: int = 16  # D: dimensions of each output capsule
    routings: int = 3  # R: routing iterations
    # 'su' (replace logits), 'sabour' (accumulate), 'su-unit' (unit s_j, squash last), 'attention'
    # (Efficient-CapsNet, one pass: c_ij = softmax_j(Σ_k û_j|i·û_j|k / sqrt(D)), s_j = Σ_i (c_ij + b_ij) û_j|i
    # with a trained log prior b [N, J] = head.capsule.bias; routings is not used; needs shared false)
    routing: str = "su"
    # 'su': s*|s|/(0.5+|s|^2); 'sabour': s*|s|/(1+|s|^2); 'efficient': (1 - exp(-|s|))*s/|s|
    squash: str = "su"
    shared: bool = True  # one W [C, J*D] for every position (any image size)
    # N, the input capsules, when shared is False (W is [N, C, J*D]); set by `capsctl train` from the data
    num_inputs: int | None = None
    # (H, W) of those training images when they are not square (N alone leaves the grid's rows and columns
    # open: a W x H image would pass with its capsules transposed); None: square, the side N gives
    image_size: tuple[int, int] | None = None
    # primary capsules between the trunk and the routing; None: each trunk position is an input
    # capsule of C (the trunk's channels) dimensions, unsquashed (the seed's design)
    primary: PrimarySpec | None = None


@dataclass(frozen=True)
class PoolSpec:
    hidden: int = 128  # width of the ReLU dense layer after global average pooling


@dataclass(frozen=True)
class DecoderSpec:
    hidden: tuple[int, ...] = (512, 1024)  # widths of the ReLU dense layers; then Dense(H*W*C) sigmoid
    # (H, W, C) of the training images the decoder redraws; filled in by `capsctl train` from the data
    image_shape: tuple[int, int, int] | None = None


def _default_trunk() -> tuple[TrunkLayer, ...]:
    return (ConvLayer(64), ConvLayer(64), AvgPoolLayer(2), ConvLayer(128), ConvLayer(128))


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int = 1  # image channels (MNIST: 1)
    num_classes: int = 10  # J: output capsules / classes
    trunk: tuple[TrunkLayer, ...] = field(default_factory=_default_trunk)  # conv/pool stack
    head: str = "capsule"  # 'capsule' or 'pool'
    capsule: CapsuleSpec = field(default_factory=CapsuleSpec)  # used when head == 'capsule'
    pool: PoolSpec = field(default_factory=PoolSpec)  # used when head == 'pool'
    # reconstruction decoder on the masked output capsules (capsule head only); None: no decoder
    decoder: DecoderSpec | None = None
    # the classes' names, one per class (e.g. an image folder's sub-folders); None: "0".."J-1"
    class_names: tuple[str, ...] | None = None
    # 'light': trained on gray images of dark ink on a light background; None: light ink on dark, as MNIST.
    # Set by `capsctl train` from the data; `predict`/`inspect --invert auto` bring an image to it
    background: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trunk"] = [_layer_dict(layer) for layer in self.trunk]
        if self.capsule.primary is None:
            del d["capsule"]["primary"]  # specs without primary capsules keep their JSON byte for byte
        if self.capsule.image_size is None:
            del d["capsule"]["image_size"]  # (as primary)
        else:
            d["capsule"]["image_size"] = list(self.capsule.image_size)
        if self.decoder is None:
            del d["decoder"]  # specs without a decoder keep their JSON (and files) byte for byte
        else:
            d["decoder"] = _decoder_dict(self.decoder)
        if self.class_names is None:
            del d["class_names"]  # files written before class names keep their JSON byte for byte
        else:
            d["class_names"] = list(self.class_names)
        if self.background is None:
            del d["background"]  # (as class_names: older files keep their JSON)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, separators=(", ", ": "))

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        if not isinstance(d, dict):
            raise CapsctlError("model spec must be a JSON object")
        known = {
            "in_channels", "num_classes", "trunk", "head", "capsule", "pool", "decoder", "class_names",
            "background",
        }
        unknown = set(d) - known
        if unknown:
            raise CapsctlError(f"model spec: unknown field {sorted(unknown)[0]!r}")
        try:
            trunk_dicts = d.get("trunk", [_layer_dict(x) for x in _default_trunk()])
            if not isinstance(trunk_dicts, list):
                raise CapsctlError(f"model spec: trunk must be a list of layers, got {trunk_dicts!r:.40}")
            trunk = tuple(_layer_from_dict(x, i) for i, x in enumerate(trunk_dicts))
            caps = d.get("capsule", {})
            pool = d.get("pool", {})
            if not isinstance(caps, dict) or not isinstance(pool, dict):
                raise CapsctlError("model spec: 'capsule' and 'pool' must be objects")
            return cls(
                in_channels=d.get("in_channels", 1),
                num_classes=d.get("num_classes", 10),
                trunk=trunk,
                head=d.get("head", "capsule"),
                capsule=_capsule_from_dict(caps),
                pool=_make(PoolSpec, pool, "pool"),
                decoder=_decoder_from_dict(d.get("decoder")),
                class_names=_names_from_json(d.get("class_names")),
                background=d.get("background"),
            )
        except TypeError as e:  # unknown keyword in a nested object
            raise CapsctlError(f"model spec: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            d = json.loads(text, object_pairs_hook=unique_keys)
        except (ValueError, RecursionError) as e:  # (ValueError: bad JSON, a key twice, a 5000-digit number)
            raise CapsctlError(f"model spec is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def with_capsule(self, **changes: Any) -> ModelSpec:
        return replace(self, capsule=replace(self.capsule, **changes))

    # -- shapes ---------------------------------------------------------------------------
    @property
    def conv_layers(self) -> tuple[ConvLayer, ...]:
        return tuple(x for x in self.trunk if isinstance(x, ConvLayer))

    @property
    def trunk_channels(self) -> int:
        convs = self.conv_layers
        return convs[-1].filters if convs else self.in_channels

    @property
    def capsule_input_dim(self) -> int:
        """C: the width of each input capsule of the routing (the primary capsules' DIM, else the
        trunk's channels)."""
        primary = self.capsule.primary if self.head == "capsule" else None
        return primary.dim if primary is not None else self.trunk_channels

    def trunk_grid(self, height: int, width: int) -> tuple[int, int]:
        """The trunk output's (height, width) for an input image of this size."""
        h, w = height, width
        for layer in self.trunk:
            if isinstance(layer, ConvLayer):
                h, w = layer.out_size(h), layer.out_size(w)
            else:
                h, w = h // layer.size, w // layer.size
            if h < 1 or w < 1:
                raise CapsctlError(f"image {height}x{width} is too small for this model's trunk")
        return h, w

    def capsule_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(rows, columns, capsules per position) of the routing's input capsules for an image of
        this size: the trunk's grid and 1, or the primary capsules' grid and types."""
        h, w = self.trunk_grid(height, width)
        primary = self.capsule.primary if self.head == "capsule" else None
        if primary is None:
            return h, w, 1
        ph, pw = primary.out_size(h), primary.out_size(w)
        if ph < 1 or pw < 1:
            raise CapsctlError(
                f"image {height}x{width} is too small for this model's primary capsules (the trunk gives "
                f"{h}x{w}, the primary capsules' kernel is {primary.kernel})"
            )
        return ph, pw, primary.types

    def capsule_count(self, height: int, width: int) -> int:
        """N: the routing's input capsules for an image of this size."""
        h, w, t = self.capsule_grid(height, width)
        return h * w * t

    def side_for(self, n: int, largest: int = 4096) -> int | None:
        """A square image side that gives N input capsules (non-shared weights fix N): the first of 28, 36
        and 32 that does (MNIST's digits, the MultiMNIST canvas, CIFAR-10's images: 29 to 36 give
        `efficient-multimnist`'s N, made for 36), else the largest; None if none up to `largest`.
        Training records the size where this would not give it back (recorded_size)."""
        side = self.min_image_size()
        for common in (28, 36, 32):
            if side <= common <= largest and self.capsule_count(common, common) == n:
                return common
        found = None
        while side <= largest:
            count = self.capsule_count(side, side)
            if count > n:
                break
            if count == n:
                found = side
            side += 1
        return found

    def recorded_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The training images' size to record beside N (capsule.image_size): None when a square side is
        what side_for gives back from N, so the files of the usual sizes keep their JSON; else (H, W)
        (a 2x2 pool maps 32 and 33, 36 and 37 to one N: a 36x36-trained model was exported for 37x37)."""
        n = self.capsule_count(height, width)
        return None if height == width and self.side_for(n, 1024) == height else (height, width)

    def fixed_input_size(self) -> tuple[int, int] | None:
        """(H, W) of an image that non-shared capsule weights were made for: the training images' size
        when recorded (recorded_size), else the square side that gives N (side_for); None for shared
        weights, the pool head, or when no square side gives N."""
        caps = self.capsule
        if self.head != "capsule" or caps.shared or caps.num_inputs is None:
            return None
        if caps.image_size is not None:
            return caps.image_size
        side = self.side_for(caps.num_inputs, 1024)
        return None if side is None else (side, side)

    def takes_size(self, height: int, width: int) -> bool:
        """Whether the capsule weights fit an image of this size (one the trunk takes): always with shared
        weights; non-shared ones need the input capsule grid of the images they were made for (N alone
        let a 40x32 image through a model of 32x40 images, its capsules transposed)."""
        caps = self.capsule
        if self.head != "capsule" or caps.shared:
            return True
        grid = self.capsule_grid(height, width)
        if grid[0] * grid[1] * grid[2] != caps.num_inputs:
            return False
        if caps.image_size is not None:
            return grid == self.capsule_grid(*caps.image_size)
        # square training images give a square grid; a non-square grid passes only for a file written
        # before the size was recorded whose N no square side gives (its count is all there is to check)
        return grid[0] == grid[1] or self.side_for(caps.num_inputs, 1024) is None

    def min_image_size(self) -> int:
        """The smallest square image side the model accepts."""
        side = 1
        primary = self.capsule.primary if self.head == "capsule" else None
        if primary is not None:
            side = primary.kernel
        for layer in reversed(self.trunk):
            if isinstance(layer, ConvLayer):
                side = side if layer.padding == "same" else (side - 1) * layer.stride + layer.kernel
            else:
                side = side * layer.size
        return side


def _names_from_json(names: Any) -> tuple[str, ...] | None:
    if names is None:
        return None
    if not isinstance(names, list):
        raise CapsctlError("model spec: class_names must be null or a list of strings")
    return tuple(names)


def numbered(count: int) -> tuple[str, ...]:
    """"0".."count-1": the names of classes that have none of their own (IDX files, an .npz without
    class_names, a model trained on one)."""
    return tuple(str(j) for j in range(count))


def names_of(spec: ModelSpec) -> tuple[str, ...]:
    """The classes' names: the spec's class_names, else "0".."J-1"."""
    if spec.class_names is not None:
        return spec.class_names
    return numbered(spec.num_classes)


def _layer_dict(layer: TrunkLayer) -> dict[str, Any]:
    if isinstance(layer, ConvLayer):
        d: dict[str, Any] = {"type": "conv", "filters": layer.filters, "kernel": layer.kernel}
        # written only when they differ from the defaults: older specs keep their JSON byte for byte
        if layer.stride != 1:
            d["stride"] = layer.stride
        if layer.padding != "valid":
            d["padding"] = layer.padding
        if layer.batchnorm:
            d["batchnorm"] = True
        return d
    return {"type": "avgpool", "size": layer.size}


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: an object naming a key twice is refused (the last one silently won)."""
    d: dict[str, Any] = {}
    for key, value in pairs:
        if key in d:
            raise ValueError(f"the key {key!r} appears twice in one object")
        d[key] = value
    return d


def _make(cls: Any, d: dict[str, Any], where: str) -> Any:
    """`cls(**d)` for the spec part at `where`, an unknown or missing field named there (a TypeError's
    Python wording, e.g. "ConvLayer.__init__() missing 1 required positional argument", named no field)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CapsctlError(f"model spec: unknown field {where}.{unknown[0]}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and
               f.name not in d]
    if missing:
        raise CapsctlError(f"model spec: {where} needs the field {missing[0]!r}")
    return cls(**d)


def _capsule_from_dict(d: dict[str, Any]) -> CapsuleSpec:
    if isinstance(d.get("image_size"), list):
        d = {**d, "image_size": tuple(d["image_size"])}
    primary = d.get("primary")
    if primary is None:
        return _make(CapsuleSpec, d, "capsule")
    if not isinstance(primary, dict):
        raise CapsctlError("model spec: capsule.primary must be null or an object")
    return _make(CapsuleSpec, {**d, "primary": _make(PrimarySpec, primary, "capsule.primary")}, "capsule")


def _decoder_dict(dec: DecoderSpec) -> dict[str, Any]:
    return {
        "hidden": list(dec.hidden),
        "image_shape": None if dec.image_shape is None else list(dec.image_shape),
    }


def _decoder_from_dict(d: Any) -> DecoderSpec | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise CapsctlError("model spec: 'decoder' must be null or an object")
    hidden, shape = d.get("hidden", [512, 1024]), d.get("image_shape")
    if not isinstance(hidden, list) or (shape is not None and not isinstance(shape, list)):
        raise CapsctlError("model spec: decoder.hidden and decoder.image_shape must be lists")
    converted = {"hidden": tuple(hidden), "image_shape": None if shape is None else tuple(shape)}
    return _make(DecoderSpec, {**d, **converted}, "decoder")


def _layer_from_dict(d: Any, i: int = 0) -> TrunkLayer:
    if not isinstance(d, dict):
        raise CapsctlError(f"model spec: trunk[{i}] must be an object, got {d!r:.40}")
    kind = d.get("type")
    rest = {k: v for k, v in d.items() if k != "type"}
    if kind == "conv":
        return _make(ConvLayer, rest, f"trunk[{i}]")
    if kind == "avgpool":
        return _make(AvgPoolLayer, rest, f"trunk[{i}]")
    raise CapsctlError(
        f"model spec: trunk[{i}].type must be 'conv' or 'avgpool', got {kind!r}"
    )


def _check_size_gives_inputs(spec: ModelSpec) -> None:
    """capsule.image_size is the size capsule.num_inputs was made for: a pair that disagree described a
    model that takes no image at all (every command refused it, naming the wrong size)."""
    h, w = spec.capsule.image_size or (0, 0)
    try:
        n = spec.capsule_count(h, w)
    except CapsctlError:
        n = 0
    if n != spec.capsule.num_inputs:
        raise CapsctlError(
            f"model spec: capsule.num_inputs is {spec.capsule.num_inputs} but capsule.image_size {h}x{w} "
            f"gives {n} input capsules; leave both out: training sets them from the images"
        )


def _positive_int(value: Any, name: str, upper: int = 1 << 16) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise CapsctlError(f"model spec: {name} must be an integer in 1..{upper}, got {value!r}")


def validate(spec: ModelSpec) -> None:
    """Raise CapsctlError naming the first bad field."""
    _positive_int(spec.in_channels, "in_channels", 64)
    _positive_int(spec.num_classes, "num_classes", 10_000)
    if not isinstance(spec.trunk, tuple):
        raise CapsctlError("model spec: trunk must be a list of layers")
    for i, layer in enumerate(spec.trunk):
        if isinstance(layer, ConvLayer):
            _positive_int(layer.filters, f"trunk[{i}].filters", 4096)
            _positive_int(layer.kernel, f"trunk[{i}].kernel", 15)
            _positive_int(layer.stride, f"trunk[{i}].stride", 8)
            if layer.padding not in PADDINGS:
                kinds, got = ", ".join(PADDINGS), layer.padding
                raise CapsctlError(f"model spec: trunk[{i}].padding must be one of {kinds}, got {got!r}")
            if layer.padding == "same" and (layer.stride != 1 or layer.kernel % 2 == 0):
                raise CapsctlError(f"model spec: trunk[{i}].padding 'same' needs stride 1 and an odd kernel")
            if not isinstance(layer.batchnorm, bool):
                raise CapsctlError(f"model spec: trunk[{i}].batchnorm must be true or false")
        elif isinstance(layer, AvgPoolLayer):
            _positive_int(layer.size, f"trunk[{i}].size", 16)
        else:
            raise CapsctlError(f"model spec: trunk[{i}] is not a layer")
    if spec.head not in HEADS:
        raise CapsctlError(f"model spec: head must be one of {', '.join(HEADS)}, got {spec.head!r}")
    c = spec.capsule
    _positive_int(c.dim, "capsule.dim", 1024)
    _positive_int(c.routings, "capsule.routings", 100)
    if c.routing not in ROUTINGS:
        raise CapsctlError(
            f"model spec: capsule.routing must be one of {', '.join(ROUTINGS)}, got {c.routing!r}"
        )
    if c.squash not in SQUASHES:
        raise CapsctlError(
            f"model spec: capsule.squash must be one of {', '.join(SQUASHES)}, got {c.squash!r}"
        )
    if not isinstance(c.shared, bool):
        raise CapsctlError("model spec: capsule.shared must be true or false")
    # (unset with shared false: `capsctl train` fills it in from the training images, as
    # decoder.image_shape; a model's weights need it, see capsctl.model.weights.expected_shapes)
    if c.num_inputs is not None:
        _positive_int(c.num_inputs, "capsule.num_inputs", 1 << 20)
    if c.image_size is not None:
        size = c.image_size
        if c.shared or not (isinstance(size, tuple) and len(size) == 2):
            raise CapsctlError("model spec: capsule.image_size is [H, W], for shared false only")
        for k, side in enumerate(size):
            _positive_int(side, f"capsule.image_size[{k}]", 1 << 16)
    primary = c.primary
    if primary is not None:
        if not isinstance(primary, PrimarySpec):
            raise CapsctlError("model spec: capsule.primary must be an object")
        if primary.kind not in PRIMARY_KINDS:
            raise CapsctlError(
                f"model spec: capsule.primary.kind must be one of {', '.join(PRIMARY_KINDS)}, "
                f"got {primary.kind!r}"
            )
        _positive_int(primary.types, "capsule.primary.types", 4096)
        _positive_int(primary.dim, "capsule.primary.dim", 1024)
        _positive_int(primary.kernel, "capsule.primary.kernel", 32)
        _positive_int(primary.stride, "capsule.primary.stride", 8)
        if primary.kind == "depthwise" and primary.types * primary.dim != spec.trunk_channels:
            c_trunk = spec.trunk_channels
            raise CapsctlError(
                f"model spec: depthwise primary capsules keep the trunk's {c_trunk} channels: "
                f"capsule.primary.types x dim must be {c_trunk}, got {primary.types} x {primary.dim}"
            )
    if c.routing == "attention" and c.shared:
        raise CapsctlError(
            "model spec: capsule.routing 'attention' needs capsule.shared false (a W and b per input)"
        )
    if spec.head == "capsule" and c.num_inputs is not None and c.image_size is not None:
        _check_size_gives_inputs(spec)
    _positive_int(spec.pool.hidden, "pool.hidden", 1 << 16)
    names = spec.class_names
    if names is not None:
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n for n in names):
            raise CapsctlError("model spec: class_names must be a list of non-empty strings")
        if len(names) != spec.num_classes:
            raise CapsctlError(
                f"model spec: class_names has {len(names)} names for num_classes {spec.num_classes}"
            )
        if len(set(names)) != len(names):
            raise CapsctlError("model spec: class_names holds a name twice")
    if spec.background not in (None, "light"):
        raise CapsctlError(f"model spec: background must be null or 'light', got {spec.background!r}")
    if spec.background is not None and spec.in_channels != 1:
        raise CapsctlError("model spec: background 'light' is for gray models (in_channels 1)")
    dec = spec.decoder
    if dec is not None:
        if spec.head != "capsule":
            raise CapsctlError(f"model spec: only a capsule head can have a decoder (head is {spec.head!r})")
        if not isinstance(dec, DecoderSpec) or not isinstance(dec.hidden, tuple):
            raise CapsctlError("model spec: decoder must be an object with a list 'hidden'")
        for k, width in enumerate(dec.hidden):
            _positive_int(width, f"decoder.hidden[{k}]", 1 << 16)
        if dec.image_shape is not None:
            if not isinstance(dec.image_shape, tuple) or len(dec.image_shape) != 3:
                raise CapsctlError("model spec: decoder.image_shape must be [H, W, C]")
            for name, value in zip("HWC", dec.image_shape, strict=True):
                _positive_int(value, f"decoder.image_shape {name}", 4096)
            if dec.image_shape[2] != spec.in_channels:
                raise CapsctlError(
                    f"model spec: decoder.image_shape has {dec.image_shape[2]} channels, "
                    f"in_channels is {spec.in_channels}"
                )


def default_recon_weight(spec: ModelSpec) -> float:
    """The reconstruction loss weight: 0.0005 (Sabour et al.'s, for 28x28x1) scaled by 784 / (H·W·C)."""
    dec = spec.decoder
    if dec is None or dec.image_shape is None:
        return 0.0005
    h, w, c = dec.image_shape
    return 0.0005 * 784 / (h * w * c)


def default_spec(head: str = "capsule") -> ModelSpec:
    """The seed experiment's model with the chosen head."""
    return ModelSpec(head=head)
