import json

import pytest

from capsctl.errors import CapsctlError
from capsctl.model.spec import AvgPoolLayer, CapsuleSpec, ConvLayer, ModelSpec
from capsctl.model.weights import expected_shapes, parameter_count


def test_defaults_are_the_seed_experiment():
    spec = ModelSpec()
    d = json.loads(spec.to_json())
    assert d == {
        "in_channels": 1,
        "num_classes": 10,
        "trunk": [
            {"type": "conv", "filters": 64, "kernel": 3},
            {"type": "conv", "filters": 64, "kernel": 3},
            {"type": "avgpool", "size": 2},
            {"type": "conv", "filters": 128, "kernel": 3},
            {"type": "conv", "filters": 128, "kernel": 3},
        ],
        "head": "capsule",
        "capsule": {"dim": 16, "routings": 3, "routing": "su", "squash": "su", "shared": True,
                    "num_inputs": None},
        "pool": {"hidden": 128},
    }


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(),
        ModelSpec(head="pool"),
        ModelSpec().with_capsule(routing="sabour", squash="sabour", routings=5),
        ModelSpec().with_capsule(shared=False, num_inputs=64),
        ModelSpec(in_channels=3, num_classes=7, trunk=(ConvLayer(8, 5), AvgPoolLayer(3), ConvLayer(4))),
    ],
)
def test_json_round_trip(spec):
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


def test_parameter_counts_match_the_seed():
    # trunk 259,008 + capsule W 128x160 / pool dense 128x128+128 + 128x10+10
    assert parameter_count(ModelSpec()) == 279_488
    assert parameter_count(ModelSpec(head="pool")) == 276_810


def test_shapes_and_grid():
    spec = ModelSpec()
    assert spec.trunk_grid(28, 28) == (8, 8)
    assert spec.trunk_grid(56, 28) == (22, 8)
    assert spec.min_image_size() == 14
    assert spec.trunk_grid(14, 14) == (1, 1)
    shapes = expected_shapes(spec)
    assert shapes["trunk.0.kernel"] == (3, 3, 1, 64)
    assert shapes["trunk.3.kernel"] == (3, 3, 128, 128)
    assert shapes["head.capsule.kernel"] == (128, 160)
    shapes = expected_shapes(spec.with_capsule(shared=False, num_inputs=64))
    assert shapes["head.capsule.kernel"] == (64, 128, 160)
    with pytest.raises(CapsctlError, match="too small"):
        spec.trunk_grid(13, 28)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"head": "dense"}', "head must be one of"),
        ('{"capsule": {"routing": "em"}}', "capsule.routing"),
        ('{"capsule": {"squash": "x"}}', "capsule.squash"),
        ('{"capsule": {"routings": 0}}', "capsule.routings"),
        ('{"capsule": {"dim": -1}}', "capsule.dim"),
        ('{"capsule": {"num_inputs": 0}}', "capsule.num_inputs"),
        ('{"trunk": [{"type": "conv", "filters": 8, "padding": "full"}]}', "padding must be one of"),
        ('{"trunk": [{"type": "conv", "filters": 8, "stride": 2, "padding": "same"}]}', "needs stride 1"),
        ('{"trunk": [{"type": "conv", "filters": 8, "stride": 0}]}', "trunk\\[0\\].stride"),
        ('{"capsule": {"primary": {"kind": "em"}}}', "capsule.primary.kind"),
        ('{"capsule": {"primary": {"types": 0}}}', "capsule.primary.types"),
        ('{"capsule": {"primary": 3}}', "capsule.primary must be null or an object"),
        ('{"capsule": {"colour": 1}}', "colour"),
        ('{"trunk": [{"type": "maxpool", "size": 2}]}', "trunk\\[0\\].type must be 'conv' or 'avgpool'"),
        # each named by its place (they said "'int' object is not iterable", "ConvLayer.__init__() missing
        # 1 required positional argument"), a key given twice and a 5000-digit number refused in one line
        ('{"trunk": 5}', "trunk must be a list of layers"),
        ('{"trunk": null}', "trunk must be a list of layers"),
        ('{"trunk": [{"type": "avgpool", "size": 2}, 7]}', "trunk\\[1\\] must be an object"),
        ('{"trunk": [{"type": "conv", "kernel": 3}]}', "trunk\\[0\\] needs the field 'filters'"),
        ('{"trunk": [{"type": "conv", "filters": 4, "dilation": 2}]}', "unknown field trunk\\[0\\].dilation"),
        ('{"capsule": {"primary": {"kind": "conv", "size": 3}}}', "unknown field capsule.primary.size"),
        ('{"pool": {"depth": 3}}', "unknown field pool.depth"),
        ('{"head": "pool", "head": "capsule"}', "the key 'head' appears twice"),
        ('{"num_classes": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"trunk": [{"type": "conv", "filters": 0, "kernel": 3}]}', "trunk\\[0\\].filters"),
        ('{"num_classes": true}', "num_classes"),
        ('{"extra": 1}', "unknown field"),
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_validation_names_the_bad_field(text, message):
    with pytest.raises(CapsctlError, match=message):
        ModelSpec.from_json(text)


def test_unshared_weights_need_their_input_count_before_weights_exist():
    spec = ModelSpec.from_json('{"capsule": {"shared": false}}')  # `capsctl train` fills num_inputs in
    with pytest.raises(CapsctlError, match="num_inputs is not set"):
        expected_shapes(spec)
    assert expected_shapes(spec.with_capsule(num_inputs=64))["head.capsule.kernel"] == (64, 128, 160)


def test_strides_padding_and_primary_capsules_set_the_capsule_count():
    from capsctl.model.spec import ConvLayer, PrimarySpec

    # Sabour et al. 2017: Conv 256 9x9 -> 20x20; primary capsules 9x9 stride 2 -> 6x6 x 32 types = 1,152
    spec = ModelSpec(trunk=(ConvLayer(256, 9),), capsule=CapsuleSpec(primary=PrimarySpec()))
    assert spec.capsule_grid(28, 28) == (6, 6, 32) and spec.capsule_count(28, 28) == 1152
    assert spec.capsule_input_dim == 8 and spec.min_image_size() == 17
    assert spec.capsule_count(17, 17) == 32
    with pytest.raises(CapsctlError, match="too small for this model's primary capsules"):
        spec.capsule_count(16, 28)
    strided = ModelSpec(trunk=(ConvLayer(8, 3, stride=2), ConvLayer(8, 3, padding="same")))
    assert strided.trunk_grid(28, 28) == (13, 13) and strided.min_image_size() == 3
    assert ModelSpec.from_json(spec.to_json()) == spec and ModelSpec.from_json(strided.to_json()) == strided
    # the defaults are not written: older specs keep their JSON byte for byte
    assert "stride" not in ModelSpec().to_json() and "primary" not in ModelSpec().to_json()


def test_spec_is_frozen():
    spec = ModelSpec()
    with pytest.raises(AttributeError):
        spec.head = "pool"  # type: ignore[misc]
