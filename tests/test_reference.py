"""The numpy reference itself, checked against properties that follow from the formulas."""

import numpy as np
import pytest

from capsctl.model import reference
from capsctl.model.spec import EPS


def test_squash_lengths():
    s = np.array([[3.0, 4.0]])  # |s| = 5
    n2 = 25 + EPS
    assert np.linalg.norm(reference.squash(s, "su")) == pytest.approx(np.sqrt(n2) * 5 / (0.5 + n2), rel=1e-6)
    assert np.linalg.norm(reference.squash(s, "sabour")) == pytest.approx(25 / 26, rel=1e-6)
    # 'su' squashes 1-length vectors to 1/1.5, 'sabour' to 1/2
    e = np.array([[1.0, 0.0]])
    assert np.linalg.norm(reference.squash(e, "su")) == pytest.approx(1 / 1.5, rel=1e-6)
    assert np.linalg.norm(reference.squash(e, "sabour")) == pytest.approx(0.5, rel=1e-6)


def _loop_routing(u_hat, routings, routing, squash):
    """Per-sample, per-capsule Python loops: an independent transcription of the formulas."""
    b_sz, n, j, _ = u_hat.shape
    out = np.zeros((b_sz, j, u_hat.shape[3]))
    for bi in range(b_sz):
        logits = np.zeros((j, n))
        for r in range(1, routings + 1):
            c = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
            s = np.array([sum(c[jj, i] * u_hat[bi, i, jj] for i in range(n)) for jj in range(j)])
            v = reference.squash(s, squash)
            if r < routings:
                for jj in range(j):
                    for i in range(n):
                        if routing == "su-unit":
                            logits[jj, i] = u_hat[bi, i, jj] @ (s[jj] / np.sqrt(s[jj] @ s[jj] + EPS))
                        elif routing == "su":
                            logits[jj, i] = u_hat[bi, i, jj] @ v[jj]
                        else:
                            logits[jj, i] += u_hat[bi, i, jj] @ v[jj]
        out[bi] = v
    return out


@pytest.mark.parametrize("routing", ["su", "sabour", "su-unit"])
@pytest.mark.parametrize("squash", ["su", "sabour"])
def test_vectorised_routing_equals_loops(routing, squash):
    u_hat = np.random.default_rng(0).normal(size=(2, 7, 4, 3))
    v, trace = reference.route(u_hat, 3, routing, squash)
    np.testing.assert_allclose(v, _loop_routing(u_hat, 3, routing, squash), atol=1e-12)
    np.testing.assert_allclose(trace.couplings.sum(axis=2), 1.0)
    np.testing.assert_allclose(trace.couplings[:, 0], 0.25)  # b = 0: uniform over J = 4


def test_margin_loss_contract():
    p = np.array([[0.95, 0.05], [0.5, 0.5]])
    y = np.array([[1.0, 0.0], [1.0, 0.0]])
    # sample 0: no loss; sample 1: (0.4² + 0.25·0.4²)/2
    assert reference.margin_loss(p, y) == pytest.approx((0 + (0.16 + 0.25 * 0.16) / 2) / 2)
