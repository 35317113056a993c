"""A batch of queries as tensors: the loader's output and the objective's input."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    # (b, T, D) padded snippets, or (b, 6, ΣD) DiDeMo chunks (the model builds the 21 candidates from them)
    video: torch.Tensor
    mask: torch.Tensor  # (b, T) bool over snippets, or (b, 21) over DiDeMo candidates
    text: torch.Tensor  # (b, Dt)
    video_id: torch.Tensor  # (b,) int64, equal for queries of one video
    target: torch.Tensor  # (b, T) annotated-time distribution (supervised reference only)
    meta: list[dict] = field(default_factory=list)
    # the *global* batch's video ids on the host, where the loader knows them without reading the device
    # (the device-cache loader); the trainer decides the sampler's shortfall from them (no host sync)
    host_video_id: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        if self.video.device == torch.device(device):  # the device-cache loader's batches are there already
            return self
        return Batch(
            self.video.to(device, non_blocking=True),
            self.mask.to(device, non_blocking=True),
            self.text.to(device, non_blocking=True),
            self.video_id.to(device, non_blocking=True),
            self.target.to(device, non_blocking=True),
            self.meta,
            self.host_video_id,
        )
