"""Framework kernels for `capsctl bench` on PyTorch: a large sgemm and the routing pair.

Imported only in the benchmark's child process for the torch backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import capsctl_torch  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
from capsctl.model.spec import ModelSpec
from capsctl_torch._env import device
from capsctl_torch._layers import CapsuleHead, safe_norm, squash


def _sync() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


def threads() -> dict[str, int]:
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}


def sgemm(n: int) -> Callable[[], None]:
    """One float32 n×n×n matmul per call (2·n³ FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device())
    b = torch.randn(n, n, generator=gen).to(device())
    c = torch.empty(n, n, device=device())

    def run() -> None:
        torch.mm(a, b, out=c)
        _sync()

    return run


def naive_scores(f: torch.Tensor, kernel: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Capsule head the way early Keras code wrote it: a Python loop over the input capsules,
    one small op per capsule per routing iteration (`map_fn` style), same formulas as ours."""
    caps = spec.capsule
    j, d = spec.num_classes, caps.dim
    bsz, c = f.shape[0], f.shape[1]
    u = f.permute(0, 2, 3, 1).reshape(bsz, -1, c)
    n = u.shape[1]
    u_hat = [(u[:, i] @ (kernel if kernel.dim() == 2 else kernel[i])).view(bsz, j, d) for i in range(n)]
    b = [u.new_zeros(bsz, j) for _ in range(n)]
    v = u.new_zeros(())
    for r in range(1, caps.routings + 1):
        cs = [torch.softmax(b_i, dim=1) for b_i in b]
        s = u_hat[0] * cs[0].unsqueeze(-1)
        for i in range(1, n):
            s = s + u_hat[i] * cs[i].unsqueeze(-1)
        v = squash(s, caps.squash)
        if r < caps.routings:
            target = s / safe_norm(s).unsqueeze(-1) if caps.routing == "su-unit" else v
            agree = [(u_hat[i] * target).sum(-1) for i in range(n)]
            b = [b[i] + agree[i] for i in range(n)] if caps.routing == "sabour" else agree
    return safe_norm(v)


def routing_fns(
    spec: ModelSpec, kernel: np.ndarray, batch: int, size: tuple[int, int] = (28, 28)
) -> dict[str, Callable[[], None]]:
    """Forward + backward of the capsule head (û and routing) on fixed trunk features of `size` images,
    two ways."""
    head = CapsuleHead(spec).to(device())
    with torch.no_grad():
        head.kernel.copy_(torch.from_numpy(kernel))
    gh, gw = spec.trunk_grid(*size)
    gen = torch.Generator().manual_seed(0)
    f = torch.rand(batch, spec.trunk_channels, gh, gw, generator=gen)
    f = f.to(device(), memory_format=torch.channels_last)
    f.requires_grad_()  # as in training: the gradient flows on into the trunk

    def ours() -> None:
        head.kernel.grad = f.grad = None
        head(f)[0].sum().backward()
        _sync()

    def naive() -> None:
        head.kernel.grad = f.grad = None
        naive_scores(f, head.kernel, spec).sum().backward()
        _sync()

    return {"naive": naive, "vectorised": ours}
