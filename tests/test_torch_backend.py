"""The PyTorch backend against the numpy reference, for every routing/squash variant and both heads."""

import numpy as np
import pytest

from capsctl.backend import OptimConfig, get_backend
from capsctl.model import reference
from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights

from ._helpers import VARIANTS, real_digits, routing_weights

pytestmark = pytest.mark.torch


@pytest.mark.parametrize(("routing", "squash"), VARIANTS)
@pytest.mark.parametrize("height", [28, 56])
def test_capsule_scores_and_trace_match_reference(mnist, routing, squash, height):
    spec = ModelSpec().with_capsule(routing=routing, squash=squash)
    w = routing_weights(spec)
    x = real_digits(mnist, 4, height)
    runner = get_backend("torch").runner(spec, w)
    ref_scores, ref_trace = reference.forward(spec, w, x)
    np.testing.assert_allclose(runner.scores(x, batch_size=3), ref_scores, atol=1e-4)
    lengths, trace = runner.trace(x)
    np.testing.assert_allclose(lengths, ref_scores, atol=1e-4)
    np.testing.assert_allclose(trace.couplings, ref_trace.couplings, atol=1e-4)
    np.testing.assert_allclose(trace.agreement, ref_trace.agreement, atol=1e-3 * np.abs(ref_trace.agreement).max())
    assert trace.couplings.shape == (4, 3, 10, spec.trunk_grid(height, 28)[0] * 8)
    np.testing.assert_allclose(trace.couplings.sum(axis=2), 1.0, atol=1e-5)


def test_routings_override_and_variants_differ(mnist):
    x = real_digits(mnist, 3)
    scores = {}
    for routing in ("su", "sabour", "su-unit"):
        spec = ModelSpec().with_capsule(routing=routing)
        runner = get_backend("torch").runner(spec, routing_weights(spec))
        scores[routing] = runner.scores(x)
        lengths, trace = runner.trace(x, routings=6)
        assert trace.couplings.shape[1] == 6
        np.testing.assert_allclose(lengths, reference.forward(spec, routing_weights(spec), x, routings=6)[0], atol=1e-4)
    # the three update rules are really different computations
    assert not np.allclose(scores["su"], scores["sabour"], atol=1e-6)
    assert not np.allclose(scores["su"], scores["su-unit"], atol=1e-6)


def test_pool_head_and_non_shared_match_reference(mnist):
    x = real_digits(mnist, 5)
    for spec in (ModelSpec(head="pool"), ModelSpec().with_capsule(shared=False, num_inputs=64)):
        w = routing_weights(spec)
        got = get_backend("torch").runner(spec, w).scores(x)
        np.testing.assert_allclose(got, reference.forward(spec, w, x)[0], atol=1e-4)


def test_one_training_step_lowers_the_margin_loss(mnist):
    spec = ModelSpec()
    x, y = mnist.train().images[:64], mnist.train().labels[:64]
    y1 = np.eye(10, dtype=np.float32)[y]
    trainer = get_backend("torch").trainer(spec, init_weights(spec, 0), OptimConfig())
    before = reference.margin_loss(trainer.scores(x), y1)
    losses = [trainer.step(x, y1, 1e-3)[0] for _ in range(5)]
    after = reference.margin_loss(trainer.scores(x), y1)
    assert losses[0] == pytest.approx(before, rel=1e-4)  # the backend's loss is the contract's margin loss
    assert after < before
    state = trainer.optimizer_state()
    assert state["step"][0] == 5
    assert state["m.head.capsule.kernel"].shape == (128, 160)
    assert state["m.trunk.0.kernel"].shape == (3, 3, 1, 64)
