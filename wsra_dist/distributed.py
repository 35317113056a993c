"""Gather across processes (with and without gradient) and loss scaling; nothing else.

With N processes each holding b_r rows, `Gatherer` concatenates rows in rank order, so the global
batch of N processes equals the batch of one process that reads the same samples in that order.
Gradients: the backward of the gather all-reduces the gradient of the whole gathered tensor and
keeps the local slice, so d(Σ_r share_r)/d(local rows) reaches every process.  Data-parallel
wrappers (DDP, DeepSpeed) then *average* parameter gradients, hence `loss_scale` = world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no reduce_scatter; sum then slice
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _gather_padded(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """all_gather of tensors whose first dimension differs across ranks (padded to the max)."""
    x = x.contiguous()
    m = max(sizes)
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class Gatherer:
    """Builds the global batch from each process's rows.  World size 1: the identity."""

    def __init__(self, n_local: int, device: torch.device | None = None):
        self.distributed = is_distributed()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        if self.distributed:
            t = torch.tensor([n_local], dtype=torch.long, device=device)
            out = [torch.zeros_like(t) for _ in range(self.world)]
            dist.all_gather(out, t)
            self.sizes = tuple(int(o.item()) for o in out)
        else:
            self.sizes = (n_local,)
        start = sum(self.sizes[: self.rank])
        self.local = slice(start, start + n_local)
        self.n_global = sum(self.sizes)

    def const(self, x: torch.Tensor) -> torch.Tensor:
        """Gather without gradient (text features, ids)."""
        if not self.distributed:
            return x
        return _gather_padded(x.detach(), self.sizes)

    def with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Gather keeping the autograd graph to the local rows."""
        if not self.distributed:
            return x
        return _GatherWithGrad.apply(x, self.sizes, self.rank)

    @property
    def loss_scale(self) -> float:
        """Factor on the local share so that averaged gradients equal the one-process gradient."""
        return float(self.world)
