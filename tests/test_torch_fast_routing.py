"""The torch backend's shared-kernel routing (û never built) equals routing over û, values and gradients."""

from __future__ import annotations

import pytest

from capsctl.model.spec import default_spec

pytestmark = pytest.mark.torch  # torch is imported inside the tests: collecting needs no torch

VARIANTS = [("su", "su"), ("sabour", "sabour"), ("su-unit", "su"), ("sabour", "su")]


@pytest.mark.parametrize(("routing", "squash"), VARIANTS)
@pytest.mark.parametrize("routings", [1, 3])
def test_route_shared_matches_route_over_u_hat(routing, squash, routings):
    import torch
    from capsctl_torch._layers import route, route_shared

    gen = torch.Generator().manual_seed(0)
    b, n, c, j, d = 3, 12, 8, 4, 5
    u1 = torch.rand(b, n, c, generator=gen, dtype=torch.float64).requires_grad_()
    w1 = (torch.randn(c, j * d, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    u2, w2 = u1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()

    u_hat = (u1 @ w1).view(b, n, j, d).transpose(1, 2)  # (B, J, N, D)
    v1, cs1, ags1 = route(u_hat, routings, routing, squash, trace=True)
    v2, cs2, ags2 = route_shared(u2, w2, d, routings, routing, squash, trace=True)
    torch.testing.assert_close(v2, v1)
    for a, e in zip(cs2 + ags2, cs1 + ags1, strict=True):
        torch.testing.assert_close(a, e)
    weights = torch.rand(b, j, d, generator=gen, dtype=torch.float64)
    (v1 * weights).sum().backward()
    (v2 * weights).sum().backward()
    torch.testing.assert_close(u2.grad, u1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_head_uses_the_shared_path_and_scores_match():
    import torch
    from capsctl_torch._layers import CapsuleHead, route, safe_norm

    spec = default_spec("capsule")
    head = CapsuleHead(spec).double()
    with torch.no_grad():
        head.kernel.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    f = torch.rand(2, spec.trunk_channels, 3, 4, dtype=torch.float64)
    scores = head(f)[0]
    v, _, _ = route(head.predictions(f), spec.capsule.routings, spec.capsule.routing, spec.capsule.squash)
    torch.testing.assert_close(scores, safe_norm(v))
