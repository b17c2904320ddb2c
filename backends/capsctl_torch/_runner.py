"""Inference: class scores in batches, and the routing trace of a few images."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from capsctl.model.reference import RoutingTrace
from capsctl.model.spec import ModelSpec

from ._env import device, memory_format
from ._layers import CapsNet, CapsuleHead, mask
from ._weights import to_native


def build(spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> CapsNet:
    model = CapsNet(spec)
    state = {k: torch.from_numpy(v) for k, v in to_native(spec, weights).items()}
    model.load_state_dict(state, strict=True)
    # Module.to takes memory_format (torch.nn.Module.to's docs); torch's overloads leave it out
    return model.to(device(), memory_format=memory_format())  # type: ignore[call-overload]


def to_input(images: np.ndarray) -> torch.Tensor:
    # NHWC numpy viewed as NCHW: exactly the channels_last layout, so no copy is made here
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).to(device())


def batched_scores(model: CapsNet, images: np.ndarray, batch_size: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(model(to_input(images[start : start + batch_size])).float().cpu().numpy())
    model.train(was_training)
    if not out:
        return np.zeros((0, model.spec.num_classes), np.float32)
    return np.concatenate(out)


class TorchRunner:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray]) -> None:
        self.spec = spec
        self.model = build(spec, weights).eval()

    def scores(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return batched_scores(self.model, images, batch_size)

    def trace(self, images: np.ndarray, routings: int | None = None) -> tuple[np.ndarray, RoutingTrace]:
        head = self.model.head
        if not isinstance(head, CapsuleHead):
            raise ValueError("the pooling head has no routing to trace")
        with torch.inference_mode():
            lengths, cs, ags = head(self.model.trunk(to_input(images)), routings, trace=True)
        return lengths.cpu().numpy(), RoutingTrace(
            torch.stack(cs, 1).cpu().numpy(), torch.stack(ags, 1).cpu().numpy()
        )

    def capsules(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(self.model.head, CapsuleHead):
            raise ValueError("the pooling head has no capsules")
        with torch.inference_mode():
            return self.model.capsules(to_input(images)).float().cpu().numpy()

    def decode(self, masked: np.ndarray) -> np.ndarray:
        if self.model.decoder is None:
            raise ValueError("this model has no decoder")
        v = torch.from_numpy(np.ascontiguousarray(masked, dtype=np.float32)).to(device())
        with torch.inference_mode():
            return self.model.decoder(v).permute(0, 2, 3, 1).float().cpu().numpy()

    def reconstruct(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        if self.model.decoder is None:
            raise ValueError("this model has no decoder")
        with torch.inference_mode():
            v = self.model.capsules(to_input(images))
            onehot = torch.nn.functional.one_hot(
                torch.as_tensor(np.asarray(classes, np.int64), device=v.device), v.shape[1]
            ).to(v.dtype)
            return self.model.decoder(mask(v, onehot)).permute(0, 2, 3, 1).float().cpu().numpy()
