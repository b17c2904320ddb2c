"""One optimiser step at a time, driven by capsctl.training (which owns data, schedule, checkpoints)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from capsctl.backend import DigitTargets, OptimConfig
from capsctl.model import layout
from capsctl.model.spec import ModelSpec, default_recon_weight

from ._env import tune_malloc
from ._layers import margin_loss, mask, reconstruction_loss, safe_norm
from ._runner import batched_scores, build, to_input
from ._weights import table, to_canonical


def correct_rows(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, whether its k highest scores `p` are exactly its k targets (k = the 1s in `y`): argmax ==
    argmax for a one-hot row (as always), the top-2 set == the label set for a two-hot one (--compose);
    equal scores rank the lower class first, as capsctl.data.composites.set_matches (eval-pairs) does."""
    pos = y > 0.5
    j = torch.arange(p.shape[1], device=p.device)
    pi, pj = p[:, :, None], p[:, None, :]
    above = (pi > pj) | ((pi == pj) & (j[:, None] < j[None, :]))  # class i ranks above class j
    target_over_other = pos[:, :, None] & ~pos[:, None, :]
    sets = (above | ~target_over_other).flatten(1).all(1)
    return torch.where(pos.sum(1) == 1, p.argmax(1) == y.argmax(1), sets)


def digit_tensors(digits: DigitTargets | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The loss's `parts` (B, k, C, H, W) and `part_hot` (B, k, J) of DigitTargets, or (None, None)."""
    if digits is None:
        return None, None
    b, k = digits.images.shape[:2]
    parts = to_input(digits.images.reshape(b * k, *digits.images.shape[2:]))
    hot = torch.from_numpy(np.ascontiguousarray(digits.onehots, dtype=np.float32)).to(parts.device)
    return parts.reshape(b, k, *parts.shape[1:]), hot


class TorchTrainer:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: OptimConfig) -> None:
        tune_malloc()
        self.spec = spec
        self.model = build(spec, weights).train()
        self.params = dict(self.model.named_parameters())
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-3, betas=(optim.beta1, optim.beta2), eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.recon_weight = default_recon_weight(spec) if optim.recon_weight is None else optim.recon_weight

    def step(
        self, x: np.ndarray, y_onehot: np.ndarray, lr: float, digits: DigitTargets | None = None
    ) -> tuple[float, int]:
        for group in self.opt.param_groups:
            group["lr"] = lr
        # (on the model's device: any parameter's; a trunk may have no conv at all)
        y = torch.from_numpy(y_onehot).to(next(iter(self.params.values())).device)
        images = to_input(x)
        loss, p = self.loss(images, y, *digit_tensors(digits))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        correct = int(correct_rows(p.detach(), y).sum())
        return float(loss.detach()), correct

    def loss(
        self,
        images: torch.Tensor,
        y: torch.Tensor,
        parts: torch.Tensor | None = None,
        part_hot: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch, class scores): the forward pass a step differentiates. `parts`
        (B, k, C, H, W) and `part_hot` (B, k, J): the digits of a composite, each redrawn apart."""
        if self.model.decoder is None:
            p = self.model(images)
            return margin_loss(p, y), p
        v = self.model.capsules(images)
        p = safe_norm(v)
        if parts is None or part_hot is None:  # the reconstruction is drawn from the true class's capsule
            recon = self.model.decoder(mask(v, y))
            return margin_loss(p, y) + self.recon_weight * reconstruction_loss(recon, images), p
        # each digit from its own capsule alone, against that digit alone (Sabour et al.'s MultiMNIST):
        # the k masked copies of v go through the decoder as one batch
        b = part_hot.shape[0]
        recon = self.model.decoder((v.unsqueeze(1) * part_hot.unsqueeze(-1)).flatten(0, 1))
        redraw = reconstruction_loss(recon.reshape(b, -1), parts.reshape(b, -1))  # Σ over k and pixels
        return margin_loss(p, y) + self.recon_weight * redraw, p

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return batched_scores(self.model, images, batch_size)

    def weights(self) -> dict[str, np.ndarray]:
        # the state dict: parameters and the batch norms' running statistics
        state = self.model.state_dict()
        return to_canonical(self.spec, {k: v.detach().cpu().numpy() for k, v in state.items()})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        m, v = {}, {}
        step = 0.0
        for key, param in self.params.items():
            st = self.opt.state.get(param)
            if not st:
                return {}
            m[key] = st["exp_avg"].cpu().numpy()
            v[key] = st["exp_avg_sq"].cpu().numpy()
            step = float(st["step"])
        slots = table(self.spec, trained_only=True)  # (running statistics have no Adam slots)
        out.update({f"m.{k}": a for k, a in layout.to_canonical(slots, m).items()})
        out.update({f"v.{k}": a for k, a in layout.to_canonical(slots, v).items()})
        out["step"] = np.array([step], np.float64)
        return out

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        step = float(state["step"][0])
        slots = table(self.spec, trained_only=True)
        m = layout.to_native(slots, {name: state[f"m.{name}"] for name in slots})
        v = layout.to_native(slots, {name: state[f"v.{name}"] for name in slots})
        for key, param in self.params.items():
            self.opt.state[param] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": torch.from_numpy(m[key]).to(param.device),
                "exp_avg_sq": torch.from_numpy(v[key]).to(param.device),
            }
