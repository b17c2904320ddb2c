"""capsctl.inspection: statistics, geometry and reading order on synthetic traces, and the
backends' traces against the numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capsctl.errors import CapsctlError
from capsctl.inspect.analysis import (
    centres_of_mass,
    coupling_deltas,
    coupling_entropy,
    evidence,
    grid_extent,
    grid_geometry,
    heat_maps,
    inspect_one,
    predicted_classes,
    reading_order,
    resolve_direction,
)
from capsctl.model import reference
from capsctl.model.spec import AvgPoolLayer, ConvLayer, ModelSpec
from capsctl.model.weights import init_weights

# A trunk-less spec: the grid is the image itself (offset 0, stride 1), so synthetic maps are easy.
FLAT = ModelSpec(trunk=(), num_classes=4)


def blob_trace(grid: tuple[int, int], spots: dict[int, tuple[int, int]], j: int = 4, r: int = 3):
    """Couplings/agreements (R, J, N) where class k's evidence is a single spot at spots[k]."""
    gh, gw = grid
    c = np.full((r, j, gh, gw), 1.0 / j)
    a = np.zeros((r, j, gh, gw))
    for k, (y, x) in spots.items():
        c[-1, :, y, x] = 0.0
        c[-1, k, y, x] = 1.0
        a[:, k, y, x] = 2.0
    return c.reshape(r, j, -1), a.reshape(r, j, -1)


def test_deltas_and_entropy():
    # (R=3, J=2, N=2)
    c = np.array([[[0.5, 0.5], [0.5, 0.5]], [[0.9, 0.1], [0.1, 0.9]], [[1.0, 0.0], [0.0, 1.0]]])
    d = coupling_deltas(c)
    assert d[0] is None
    assert d[1] == pytest.approx(0.4) and d[2] == pytest.approx(0.1)
    e = coupling_entropy(c)
    assert e[0] == pytest.approx(np.log(2))
    assert e[1] == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))
    assert e[2] == pytest.approx(0.0, abs=1e-12)


def test_grid_geometry_of_the_default_trunk():
    spec = ModelSpec()
    assert grid_geometry(spec) == (6.5, 2.0)  # two 3x3 convs, 2x2 pool, two 3x3 convs
    assert spec.trunk_grid(28, 28) == (8, 8)
    left, right, bottom, top = grid_extent(spec, (8, 8))
    assert (left, right, bottom, top) == (5.5, 21.5, 21.5, 5.5)  # centres 6.5..20.5, cells 2 px wide
    spec2 = ModelSpec(trunk=(AvgPoolLayer(2), ConvLayer(4, 5)))
    assert grid_geometry(spec2) == (0.5 + 2 * 2, 2.0)


def test_heat_maps_are_row_major():
    x = np.arange(2 * 3 * 6).reshape(2, 3, 6)
    m = heat_maps(x, (2, 3))
    assert m.shape == (2, 3, 2, 3) and m[1, 2, 1, 0] == x[1, 2, 3]
    with pytest.raises(CapsctlError, match="grid 2x2"):
        heat_maps(x, (2, 2))


def test_centres_of_mass_in_pixels():
    w = np.zeros((2, 12))
    w[0, 1 * 4 + 3] = 1.0  # grid (3, 4): class 0 at row 1, col 3
    w[0, 2 * 4 + 3] = 1.0  # and row 2, col 3 -> centre (1.5, 3)
    c = centres_of_mass(w, (3, 4), FLAT)
    np.testing.assert_allclose(c[0], [1.5, 3.0])
    assert np.isnan(c[1]).all()  # no evidence at all
    spec = ModelSpec()  # default trunk: grid index g sits at pixel 6.5 + 2 g
    w = np.zeros((1, 64))
    w[0, 8 * 7 + 0] = 1.0
    np.testing.assert_allclose(centres_of_mass(w, (8, 8), spec)[0], [6.5 + 14, 6.5])


def test_reading_order_top_to_bottom_and_left_to_right():
    c, a = blob_trace((6, 2), {2: (0, 1), 0: (5, 0), 3: (3, 1)})
    res = inspect_one(FLAT, np.array([0.9, 0.1, 0.8, 0.7]), (6, 2), c, a)
    assert res.predicted == [0, 2, 3]
    assert res.direction == "top-to-bottom" and res.order == [2, 3, 0]
    c, a = blob_trace((2, 6), {2: (0, 4), 0: (1, 1)})
    res = inspect_one(FLAT, np.array([0.9, 0.1, 0.8, 0.2]), (2, 6), c, a)
    assert res.direction == "left-to-right" and res.order == [0, 2]
    res = inspect_one(FLAT, np.array([0.9, 0.1, 0.8, 0.2]), (2, 6), c, a, direction="top-to-bottom")
    assert res.order == [2, 0]  # class 2 sits in row 0


def test_order_uses_top_k_when_asked_and_square_images_read_left_to_right():
    c, a = blob_trace((4, 4), {1: (3, 0), 3: (0, 3)})
    res = inspect_one(FLAT, np.array([0.1, 0.45, 0.2, 0.4]), (4, 4), c, a, top=2)
    assert res.predicted == [] and res.top == [1, 3] and res.selected == [1, 3]
    assert resolve_direction("auto", (4, 4)) == "left-to-right" and res.order == [1, 3]
    res = inspect_one(FLAT, np.array([0.1, 0.45, 0.2, 0.4]), (4, 4), c, a)
    assert res.order == []  # nothing above 0.5 and no --top: nothing to order


@pytest.mark.parametrize("weighting", ["contribution", "coupling", "raw"])
def test_every_weighting_finds_isolated_spots(weighting):
    c, a = blob_trace((5, 2), {1: (4, 1), 2: (0, 0)})
    res = inspect_one(FLAT, np.array([0.0, 0.9, 0.9, 0.0]), (5, 2), c, a, weighting=weighting)
    assert res.order == [2, 1]


def test_classes_without_evidence_go_last_and_bad_options_are_refused():
    centres = np.array([[np.nan, np.nan], [3.0, 1.0], [1.0, 1.0]])
    assert reading_order([0, 1, 2], centres, "top-to-bottom") == [2, 1, 0]
    with pytest.raises(CapsctlError, match="--order"):
        resolve_direction("diagonal", (3, 3))
    with pytest.raises(CapsctlError, match="weighting"):
        evidence(np.ones((1, 2, 3)), np.ones((1, 2, 3)), "magic")


def test_predicted_classes_sorted_by_score():
    assert predicted_classes(np.array([0.6, 0.2, 0.95, 0.51])) == [2, 0, 3]


def sharp_weights(spec: ModelSpec, seed: int = 0, scale: float = 6.0) -> dict[str, np.ndarray]:
    """Initial weights with a scaled capsule kernel, so routing moves the couplings visibly."""
    w = init_weights(spec, seed)
    w["head.capsule.kernel"] = w["head.capsule.kernel"] * scale
    return w


def composite(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((1, 40, 28, 1), np.float32)
    x[0, 4:16, 8:20, 0] = rng.uniform(0.5, 1.0, (12, 12))
    x[0, 24:36, 6:14, 0] = 1.0
    return x


def test_reference_trace_feeds_a_json_able_inspection():
    spec = ModelSpec(trunk=(ConvLayer(8), AvgPoolLayer(2), ConvLayer(8)), capsule=ModelSpec().capsule)
    x = composite()
    scores, trace = reference.forward(spec, sharp_weights(spec), x, routings=4)
    assert trace is not None
    res = inspect_one(spec, scores[0], x.shape[1:3], trace.couplings[0], trace.agreement[0], top=2)
    d = json.loads(json.dumps(res.to_json()))
    gh, gw = spec.trunk_grid(40, 28)
    assert d["grid"] == [gh, gw] and d["routings"] == 4
    c = np.array(d["couplings"])
    assert c.shape == (4, 10, gh * gw)
    np.testing.assert_allclose(c.sum(axis=1), 1.0, atol=1e-9)
    assert len(d["iterations"]) == 4 and d["iterations"][0]["mean_abs_delta"] is None
    assert d["iterations"][-1]["mean_entropy"] < np.log(10)  # routing moved away from uniform
    assert sorted(d["order"]) == sorted(d["top"]) and set(d["centres"]) == {str(j) for j in d["top"]}


@pytest.mark.parametrize("routing", ["su", "sabour", "su-unit"])
def test_backend_trace_matches_reference(backend, routing):
    spec = ModelSpec(trunk=(ConvLayer(8), AvgPoolLayer(2), ConvLayer(16))).with_capsule(routing=routing)
    weights = sharp_weights(spec, seed=1)
    x = np.concatenate([composite(0), composite(1)])
    ref_scores, ref = reference.forward(spec, weights, x, routings=5)
    scores, trace = backend.runner(spec, weights).trace(x, routings=5)
    assert ref is not None and trace.couplings.shape == ref.couplings.shape == (2, 5, 10, 17 * 11)
    assert ref.couplings[:, -1].std() > 0.01  # the test means something: couplings are far from uniform
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(trace.couplings, ref.couplings, atol=1e-4)
    agreement_atol = 1e-4 * max(1.0, float(np.abs(ref.agreement).max()))
    np.testing.assert_allclose(trace.agreement, ref.agreement, atol=agreement_atol)
    for i in range(2):
        a = inspect_one(spec, scores[i], (40, 28), trace.couplings[i], trace.agreement[i], top=2)
        b = inspect_one(spec, ref_scores[i], (40, 28), ref.couplings[i], ref.agreement[i], top=2)
        np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-4)
        np.testing.assert_allclose(a.centres[b.top], b.centres[b.top], atol=1e-2)
        # The same top-2 (in order) and reading order follow from the closeness above only away from
        # ties: the reference's margins must exceed twice the backend's actual difference. (These
        # saturated scores lie 1.6e-4 apart, inside the 1e-4 tolerance, but float32 is ~1e-7 off.)
        ranked = np.sort(ref_scores[i])[::-1]
        assert min(ranked[0] - ranked[1], ranked[1] - ranked[2]) > 2 * np.abs(scores[i] - ref_scores[i]).max()
        axis = 0 if b.direction == "top-to-bottom" else 1
        apart = abs(b.centres[b.top[0], axis] - b.centres[b.top[1], axis])
        assert apart > 2 * np.abs(a.centres[b.top] - b.centres[b.top]).max(), b.centres[b.top]
        assert a.order == b.order and a.top == b.top



def test_routing_statistics_of_primary_capsules_are_each_capsules_not_a_places_mean():
    """With primary capsules (TYPES at each place) the per-iteration entropy and |Δc| are those of every
    input capsule: one-hot couplings have entropy 0 (the mean over a place's types made it 2.25 nats
    for `efficient`, whose 16 capsules sit at one place)."""
    from capsctl.inspect.analysis import inspect_one
    from capsctl.model.presets import preset

    spec = preset("efficient")
    gh, gw, types = spec.capsule_grid(28, 28)
    n, j = gh * gw * types, spec.num_classes
    one_hot = np.zeros((1, j, n))
    one_hot[0, np.arange(n) % j, np.arange(n)] = 1.0  # each capsule to one class, the classes in turn
    res = inspect_one(spec, np.full(j, 0.5), (28, 28), one_hot, np.ones_like(one_hot))
    assert res.entropy == pytest.approx([0.0], abs=1e-12)
    uniform = np.full((2, j, n), 1.0 / j)
    res = inspect_one(spec, np.full(j, 0.5), (28, 28), np.concatenate([one_hot, uniform[:1]]), uniform)
    assert res.entropy == pytest.approx([0.0, np.log(j)], abs=1e-12)
    assert res.deltas[1] == pytest.approx(np.abs(one_hot[0] - uniform[0]).mean())
