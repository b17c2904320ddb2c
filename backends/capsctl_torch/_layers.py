"""The model as torch modules: trunk, capsule head with dynamic routing, pooling head.

Formulas follow the spec contract (capsctl.spec); tensors of the capsule head are
û (B, J, N, D), logits b and couplings c (B, J, N), s and v (B, J, D).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.model.spec import BN_EPS, BN_MOMENTUM, EPS, ConvLayer, ModelSpec


def squash(s: torch.Tensor, kind: str) -> torch.Tensor:
    n2 = (s * s).sum(-1, keepdim=True) + EPS
    if kind == "efficient":  # Efficient-CapsNet: (1 - e^-|s|)·s/|s| (-expm1: exact near |s| = 0)
        n = n2.sqrt()
        return -torch.expm1(-n) * s / n
    return s * n2.sqrt() / ((0.5 if kind == "su" else 1.0) + n2)


def route_attention(
    u_hat: torch.Tensor, bias: torch.Tensor, squash_kind: str, trace: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Efficient-CapsNet's self-attention routing, one pass, over û (B, J, N, D) with the log prior b
    (N, J): a_ij = Σ_k û_j|i·û_j|k / sqrt(D) = û_j|i·(Σ_k û_j|k) / sqrt(D), c = softmax over j,
    s_j = Σ_i (c_ij + b_ij) û_j|i, v = squash(s). Trace: c and û·v (one iteration)."""
    total = u_hat.sum(2, keepdim=True)  # (B, J, 1, D): Σ_k û_j|k
    a = (u_hat @ total.transpose(2, 3)).squeeze(-1) / math.sqrt(u_hat.shape[-1])  # (B, J, N)
    c = torch.softmax(a, dim=1)
    s = ((c + bias.t()).unsqueeze(2) @ u_hat).squeeze(2)  # (B, J, D)
    v = squash(s, squash_kind)
    if not trace:
        return v, [], []
    return v, [c], [(u_hat @ v.unsqueeze(-1)).squeeze(-1)]


class BatchNorm(nn.Module):
    """Batch normalisation as the spec states it (capsctl.model.spec.BN_EPS, BN_MOMENTUM): the running
    variance is updated with the batch's biased variance, as Keras does (torch's BatchNorm2d uses the
    unbiased one), so both backends keep the same statistics. Parameters `weight` (γ) and `bias` (β),
    buffers `running_mean`, `running_var`.

    In a data-parallel job (`sum_over_ranks` set, a differentiable sum of a tensor over the ranks) the
    batch statistics are the global batch's, as one process computes them; `counts` is False on a rank
    whose only image is the dummy of an empty slice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.counts = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            mean, var = self.running_mean, self.running_var
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, BN_EPS)
        if self.sum_over_ranks is None:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        else:
            var, mean = self._global_moments(x, self.sum_over_ranks)
        with torch.no_grad():
            self.running_mean.mul_(BN_MOMENTUM).add_(mean, alpha=1 - BN_MOMENTUM)
            self.running_var.mul_(BN_MOMENTUM).add_(var, alpha=1 - BN_MOMENTUM)
        scale = self.weight * torch.rsqrt(var + BN_EPS)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]

    def _global_moments(
        self, x: torch.Tensor, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(biased variance, mean) per channel over every rank's rows. Two passes, each one sum over the
        ranks: the variance is Σ(x − mean)²/n, as var_mean computes it, not E[x²] − mean² (which loses
        digits when the mean is large against the spread)."""
        rows = x if self.counts else x[:0]
        n = torch.full((1,), rows.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        total = sum_over_ranks(torch.cat([rows.sum((0, 2, 3)), n]))
        mean = total[:-1] / total[-1]
        squares = ((rows - mean[None, :, None, None]) ** 2).sum((0, 2, 3))
        return sum_over_ranks(squares) / total[-1], mean


def safe_norm(s: torch.Tensor) -> torch.Tensor:
    return ((s * s).sum(-1) + EPS).sqrt()


def route(
    u_hat: torch.Tensor, routings: int, routing: str, squash_kind: str, trace: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Dynamic routing over û (B, J, N, D). Returns v (B, J, D) and, if `trace`, per-iteration
    couplings c and agreements û·squash(s), each (B, J, N)."""
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)
    cs: list[torch.Tensor] = []
    ags: list[torch.Tensor] = []
    v = u_hat.new_zeros(())
    for r in range(1, routings + 1):
        c = torch.softmax(b, dim=1)
        s = (c.unsqueeze(2) @ u_hat).squeeze(2)  # (B,J,1,N) @ (B,J,N,D): s_j = Σ_i c_ij û_j|i
        v = squash(s, squash_kind)
        if trace:
            cs.append(c)
            ags.append((u_hat @ v.unsqueeze(-1)).squeeze(-1))
        if r < routings:
            if routing == "su-unit":
                b = (u_hat @ (s / safe_norm(s).unsqueeze(-1)).unsqueeze(-1)).squeeze(-1)
            else:
                agree = (u_hat @ v.unsqueeze(-1)).squeeze(-1)
                b = agree if routing == "su" else b + agree
    return v, cs, ags


def route_shared(
    u: torch.Tensor, kernel: torch.Tensor, dim: int, routings: int, routing: str, squash_kind: str,
    trace: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The same routing as `route` for a shared kernel, without ever building û (B, J, N, D).

    û_j|i = u_i·W_j is linear in u_i, so s_j = Σ_i c_ij û_j|i = (Σ_i c_ij u_i)·W_j and
    û_j|i·v_j = u_i·(W_j v_j): every step is a batched matmul over inputs u (B, N, C) with
    C-wide rows. That is 2.6× fewer FLOPs than building û for the seed model and no 5 MB
    intermediate to write, read back five times and differentiate (measured: the capsule head's
    training step 36 -> 22 ms CPU at batch 128). Results equal `route` up to float rounding."""
    bsz, n, c_in = u.shape
    w = kernel.view(c_in, -1, dim).transpose(0, 1)  # (J, C, D): W_j
    j = w.shape[0]
    b = None
    cs: list[torch.Tensor] = []
    ags: list[torch.Tensor] = []
    v = u.new_zeros(())
    for r in range(1, routings + 1):
        if b is None:  # softmax of zero logits is 1/J everywhere: Σ_i c_ij u_i is a mean-like sum
            c = u.new_full((bsz, j, n), 1.0 / j)
            cu = (u.sum(1, keepdim=True) / j).expand(bsz, j, c_in)
        else:
            c = torch.softmax(b, dim=1)  # over the output capsules j
            cu = c @ u  # (B, J, C): Σ_i c_ij u_i
        s = torch.bmm(cu.transpose(0, 1), w).transpose(0, 1)  # (B, J, D): (Σ_i c_ij u_i)·W_j
        v = squash(s, squash_kind)
        if trace:
            cs.append(c)
            ags.append(_agreement(u, w, v))
        if r < routings:
            target = s / safe_norm(s).unsqueeze(-1) if routing == "su-unit" else v
            agree = _agreement(u, w, target)
            b = agree if routing != "sabour" or b is None else b + agree
    return v, cs, ags


def _agreement(u: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """û_j|i·v_j = u_i·(W_j v_j), (B, J, N), from u (B, N, C), W (J, C, D), v (B, J, D)."""
    wv = torch.bmm(v.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # (B, J, C): W_j v_j
    return wv @ u.transpose(1, 2)


class Trunk(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.plan: list[tuple[str, int]] = []
        convs: list[nn.Conv2d] = []
        bns: dict[str, BatchNorm] = {}  # by conv index (str: ModuleDict keys)
        channels = spec.in_channels
        for layer in spec.trunk:
            if isinstance(layer, ConvLayer):
                self.plan.append(("conv", len(convs)))
                if layer.batchnorm:
                    bns[str(len(convs))] = BatchNorm(layer.filters)
                conv = nn.Conv2d(channels, layer.filters, layer.kernel, layer.stride, padding=layer.padding)
                convs.append(conv)
                channels = layer.filters
            else:
                self.plan.append(("pool", layer.size))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleDict(bns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, arg in self.plan:
            if kind == "pool":
                x = F.avg_pool2d(x, arg)
                continue
            x = F.relu(self.convs[arg](x))
            if str(arg) in self.bns:  # after the ReLU (Efficient-CapsNet's order)
                x = self.bns[str(arg)](x)
        return x


class CapsuleHead(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        caps = spec.capsule
        self.j, self.d = spec.num_classes, caps.dim
        self.routings, self.routing, self.squash = caps.routings, caps.routing, caps.squash
        p = caps.primary
        # primary capsules: a convolution whose TYPES·DIM channels are TYPES capsules of DIM at each place
        c_trunk = spec.trunk_channels
        groups = c_trunk if p is not None and p.kind == "depthwise" else 1  # depthwise: a filter a channel
        self.primary = (
            None if p is None else nn.Conv2d(c_trunk, p.types * p.dim, p.kernel, p.stride, groups=groups)
        )
        self.primary_dim = p.dim if p is not None else 0
        c = spec.capsule_input_dim
        if caps.shared:
            shape: tuple[int, ...] = (c, self.j * self.d)
        else:
            assert caps.num_inputs is not None  # validate() requires it for per-position weights
            shape = (caps.num_inputs, c, self.j * self.d)
        self.kernel = nn.Parameter(torch.zeros(shape))
        # attention routing's log prior b (N, J); None for the iterative routings
        attention = caps.routing == "attention"
        self.bias = nn.Parameter(torch.zeros(caps.num_inputs or 0, self.j)) if attention else None

    def inputs(self, f: torch.Tensor) -> torch.Tensor:
        """Trunk features (B, C, H, W) -> the routing's input capsules u (B, N, C'): the positions,
        row-major over (H, W), or the squashed primary capsules, row-major over (row, column, type)."""
        bsz = f.shape[0]
        if self.primary is None:
            return f.permute(0, 2, 3, 1).reshape(bsz, -1, f.shape[1])  # free for channels_last
        z = self.primary(f).permute(0, 2, 3, 1)  # (B, H', W', TYPES·DIM)
        return squash(z.reshape(bsz, -1, self.primary_dim), self.squash)

    def predictions(self, f: torch.Tensor) -> torch.Tensor:
        """Trunk features (B, C, H, W) -> û (B, J, N, D)."""
        bsz = f.shape[0]
        u = self.inputs(f)
        if self.kernel.dim() == 2:
            uh = u @ self.kernel
        else:
            uh = torch.einsum("bnc,nck->bnk", u, self.kernel)
        return uh.view(bsz, -1, self.j, self.d).transpose(1, 2).contiguous()

    def capsules(self, f: torch.Tensor, routings: int | None = None, trace: bool = False):
        """Output capsules v (B, J, D) and, if `trace`, the per-iteration couplings and agreements."""
        r = routings or self.routings
        if self.bias is not None:
            return route_attention(self.predictions(f), self.bias, self.squash, trace)
        if self.kernel.dim() == 2:
            return route_shared(self.inputs(f), self.kernel, self.d, r, self.routing, self.squash, trace)
        return route(self.predictions(f), r, self.routing, self.squash, trace)

    def forward(self, f: torch.Tensor, routings: int | None = None, trace: bool = False):
        v, cs, ags = self.capsules(f, routings, trace)
        return safe_norm(v), cs, ags


class Decoder(nn.Module):
    """Masked capsules (B, J, D) -> Dense+ReLU per hidden width -> Dense(H·W·C)+sigmoid -> (B, C, H, W)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        dec = spec.decoder
        assert dec is not None and dec.image_shape is not None  # expected_shapes requires both
        self.image_shape = dec.image_shape
        h, w, c = dec.image_shape
        widths = [spec.num_classes * spec.capsule.dim, *dec.hidden, h * w * c]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        x = masked.flatten(1)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            x = F.relu(x) if k < len(self.layers) - 1 else torch.sigmoid(x)
        h, w, c = self.image_shape
        return x.view(-1, h, w, c).permute(0, 3, 1, 2)  # channels-last order of the canonical file


def mask(v: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """v (B, J, D) with every capsule but the one-hot's set to zero."""
    return v * onehot.unsqueeze(-1)


class PoolHead(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.dense0 = nn.Linear(spec.trunk_channels, spec.pool.hidden)
        self.dense1 = nn.Linear(spec.pool.hidden, spec.num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dense1(F.relu(self.dense0(f.mean(dim=(2, 3))))))


class CapsNet(nn.Module):
    """Trunk + head; input (B, C, H, W) float32, output class scores (B, J)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = Trunk(spec)
        self.head: nn.Module = CapsuleHead(spec) if spec.head == "capsule" else PoolHead(spec)
        self.decoder = Decoder(spec) if spec.decoder is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        if isinstance(self.head, CapsuleHead):
            return self.head(f)[0]
        return self.head(f)

    def capsules(self, x: torch.Tensor) -> torch.Tensor:
        """Output capsules v (B, J, D) of images (B, C, H, W) (capsule head only)."""
        assert isinstance(self.head, CapsuleHead)
        return self.head.capsules(self.trunk(x))[0]


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ over pixels of (reconstruction − input)², mean over the batch."""
    return (recon - x).square().flatten(1).sum(1).mean()


def margin_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per = y * F.relu(0.9 - p).square() + 0.25 * (1 - y) * F.relu(p - 0.1).square()
    return per.mean(dim=1).mean()
