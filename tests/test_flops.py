"""FLOP counts of the seed models, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest

from capsctl.errors import CapsctlError
from capsctl.model import flops
from capsctl.model.spec import AvgPoolLayer, ConvLayer, ModelSpec, default_spec


def test_seed_trunk_convs_by_hand():
    # 28 -> conv3 26 -> conv3 24 -> pool 12 -> conv3 10 -> conv3 8; 2*k*k*Cin*Cout*H'*W'
    f = flops.count(default_spec("capsule"), 28, 28)
    assert f.convs == (2 * 9 * 1 * 64 * 26 * 26, 2 * 9 * 64 * 64 * 24 * 24, 2 * 9 * 64 * 128 * 10 * 10,
                       2 * 9 * 128 * 128 * 8 * 8)
    assert f.trunk == 778_752 + 42_467_328 + 14_745_600 + 18_874_368 == 76_866_048


def test_seed_capsule_head_by_hand():
    f = flops.count(default_spec("capsule"), 28, 28)
    # N = 8*8 = 64 inputs, C = 128, J = 10, D = 16
    assert f.predictions == 2 * 64 * 128 * 10 * 16 == 2_621_440
    # per iteration: softmax 3*J*N = 1920, s 2*J*N*D = 20480, squash 3*J*D = 480, agreement 20480 (r < R)
    # r=1,2: 43360 each; r=3: 22880; scores 2*J*D = 320
    assert f.routing == 43_360 * 2 + 22_880 + 320 == 109_920
    assert f.dense == 0
    assert f.forward == 79_597_408
    assert f.train_step == 3 * 79_597_408


def test_seed_pool_head_by_hand():
    f = flops.count(default_spec("pool"), 28, 28)
    assert f.predictions == f.routing == 0
    assert f.dense == 2 * 128 * 128 + 2 * 128 * 10 == 35_328
    assert f.forward == 76_866_048 + 35_328


def test_routing_variants_differ_as_formulas_say():
    base = default_spec("capsule")
    su = flops.count(base).routing
    sabour = flops.count(base.with_capsule(routing="sabour")).routing
    unit = flops.count(base.with_capsule(routing="su-unit")).routing
    j, n, d = 10, 64, 16
    assert sabour - su == 2 * j * n  # b += agreement in iterations 1 and 2
    assert unit == su  # su-unit scales s to unit length (3*J*D) where su squashes (3*J*D)
    one = flops.count(base.with_capsule(routings=1)).routing
    assert one == 3 * j * n + 2 * j * n * d + 3 * j * d + 2 * j * d


def test_image_size_scales_the_grid():
    f = flops.count(default_spec("capsule"), 56, 28)
    # trunk grid 22 x 8 = 176 capsules
    assert f.predictions == 2 * 176 * 128 * 160
    assert f.convs[0] == 2 * 9 * 64 * 54 * 26


def test_small_spec_and_too_small_image():
    spec = ModelSpec(in_channels=3, num_classes=4, trunk=(ConvLayer(8, 5), AvgPoolLayer(2)), head="pool")
    f = flops.count(spec, 12, 12)
    assert f.convs == (2 * 25 * 3 * 8 * 8 * 8,)
    assert f.dense == 2 * 8 * 128 + 2 * 128 * 4
    with pytest.raises(CapsctlError, match="too small"):
        flops.count(default_spec(), 8, 8)


def test_decoder_dense_layers_by_hand():
    from capsctl.model.spec import DecoderSpec

    base = default_spec("capsule")
    spec = base.replace(decoder=DecoderSpec(hidden=(512, 1024), image_shape=(28, 28, 1)))
    plain, dec = flops.count(base), flops.count(spec)
    # multiply-adds: J*D = 10*16 = 160 -> 512 -> 1024 -> 28*28*1 = 784
    macs = 160 * 512 + 512 * 1024 + 1024 * 784
    assert macs == 1_409_024
    assert dec.decoder == 2 * macs == 2_818_048 and plain.decoder == 0
    assert dec.forward - plain.forward == 2 * macs
    assert dec.train_step - plain.train_step == 3 * 2 * macs
    assert dec.head == plain.head and dec.trunk == plain.trunk  # class scores don't run the decoder
    assert flops.decoder_flops(spec, 56, 28) == 2 * macs  # image_shape set: the decoder's own size
    unsized = base.replace(decoder=DecoderSpec(hidden=(8,)))
    assert flops.count(unsized, 56, 28).decoder == 2 * (160 * 8 + 8 * 56 * 28)  # else the counted size


def test_attention_routing_is_one_pass_by_its_formula():
    """Attention routing was counted as R iterations of dynamic routing: a spec saying routings 5 was
    counted 5 times for the same network, and even R = 1 was not the attention pass's count."""
    j, n, d = 10, 64, 16
    per_position = default_spec("capsule").with_capsule(shared=False, num_inputs=n, routing="attention")
    # Σ_k û (JND), a = û·Σ (2JND), / sqrt(D) (JN), softmax over j (3JN), c + b (JN), s (2JND), squash
    # (3JD), scores (2JD)
    want = j * n * d + 2 * j * n * d + j * n + 3 * j * n + j * n + 2 * j * n * d + 3 * j * d + 2 * j * d
    for routings in (1, 5):
        assert flops.count(per_position.with_capsule(routings=routings), 28, 28).routing == want
