"""One optimizer step (objective -> backward -> clip -> optimizer), eager or replayed from a CUDA graph.

The step reads no tensor value on the host: the sampler's shortfall is decided by the trainer from host-side
video ids before the batch reaches the device (`check_sampler=False` here), loss terms stay on the device
and are read only at logging steps.  So at a fixed batch shape the whole step can be captured once as a
CUDA graph and replayed: one launch per step instead of hundreds (`train.cuda_graph`, docs/method.md).

Graph mode (`GraphedStep`) takes a shape after it was seen `WARMUP` times (the warm-up steps are real,
eager steps on a side stream, which also lets Triton autotune before capture); every other shape (the
epoch's tail, a reduced loss config) runs eagerly.  A capture that fails (an operation that cannot be
captured) is reported once and the run continues eagerly: the graph is an optimisation, never a
dependency.  Not used with several processes (the collectives of the gather and of DDP stay outside
graphs), DeepSpeed, mixed precision or on the CPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .data.batch import Batch
from .distributed import Gatherer
from .losses import LossConfig
from .objective import wsra_objective

WARMUP = 3  # eager steps of a shape before it is captured
MAX_GRAPHS = 2  # shapes captured per run (the full batch and, e.g., a folded last batch)


@dataclass
class StepResult:
    loss: torch.Tensor  # local share of the total (device)
    terms: dict[str, torch.Tensor]  # local shares of the terms (device)
    negatives: object | None  # the sampler's choice (debug hook)
    grad_norm: torch.Tensor | None = None  # before clipping (device); when asked for or clipping


def grad_norm(params) -> torch.Tensor | None:
    """The global L2 norm of the gradients, on the device (no host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


class EagerStep:
    """The reference step: what every other mode must compute."""

    graphed = False

    def __init__(self, model, optimizer, accelerator, grad_clip: float):
        self.model, self.optimizer, self.accelerator, self.grad_clip = model, optimizer, accelerator, grad_clip

    def __call__(self, batch: Batch, cfg: LossConfig, g: Gatherer, want_norm: bool = False) -> StepResult:
        out = wsra_objective(self.model, batch, cfg, g, check_sampler=False)
        self.accelerator.backward(out.loss * g.loss_scale)
        norm = None
        if self.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        elif want_norm:
            norm = grad_norm(self.model.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(out.loss, out.terms, out.negatives, norm)


class _CudaGraph:
    """torch.cuda.CUDAGraph behind capture(fn) / replay()."""

    def __init__(self, device: torch.device):
        self.graph = torch.cuda.CUDAGraph()
        self.device = device

    def capture(self, fn):
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class _EmulatedGraph:
    """Test stand-in for the CPU (WSRA_TEST_EMULATE_GRAPH=1): 'capture' runs fn once on the static buffers and
    'replay' runs it again, so the static-input plumbing is checked against eager training where no GPU is."""

    def __init__(self, device: torch.device):
        self.fn = self.result = None

    def capture(self, fn):
        self.fn = fn
        self.result = fn()
        return self.result

    def replay(self) -> None:
        """Re-run and write the outputs into the captured ones, as a replayed graph does."""
        new = self.fn()
        old = self.result
        with torch.no_grad():
            pairs = [(old.loss, new.loss), (old.grad_norm, new.grad_norm)]
            pairs += [(old.terms[k], new.terms[k]) for k in old.terms]
            if old.negatives is not None:
                pairs += [(getattr(old.negatives, f), getattr(new.negatives, f)) for f in
                          ("hard", "pseudo", "easy", "pseudo_positive")]
            for a, b in pairs:
                if a is not None:
                    a.copy_(b)


def _signature(batch: Batch) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in (batch.video, batch.mask, batch.text, batch.video_id, batch.target))


class GraphedStep(EagerStep):
    """EagerStep whose steady state (one batch shape, the recipe's full loss config) replays a captured graph."""

    graphed = True

    def __init__(self, model, optimizer, accelerator, grad_clip: float, loss_cfg: LossConfig, emulate: bool = False):
        super().__init__(model, optimizer, accelerator, grad_clip)
        self.loss_cfg = loss_cfg
        self.inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper adds no work here
        self.kind = _EmulatedGraph if emulate else _CudaGraph
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}  # signature -> (graph, static batch, result, static grads)
        self.failed = False
        self.replays = 0

    def __call__(self, batch: Batch, cfg: LossConfig, g: Gatherer, want_norm: bool = False) -> StepResult:
        sig = _signature(batch)
        if self.failed or cfg != self.loss_cfg:
            return self._eager(batch, cfg, g, want_norm)
        if sig in self.graphs:
            graph, static, result, _ = self.graphs[sig]
            for name in ("video", "mask", "text", "video_id", "target"):
                getattr(static, name).copy_(getattr(batch, name), non_blocking=True)
            graph.replay()
            self.replays += 1
            return result
        self.seen[sig] = self.seen.get(sig, 0) + 1
        if self.seen[sig] <= WARMUP or len(self.graphs) >= MAX_GRAPHS:
            return self._eager(batch, cfg, g, want_norm, side_stream=self.seen[sig] <= WARMUP)
        return self._capture(sig, batch, cfg, g)

    def _eager(self, batch, cfg, g, want_norm: bool = False, side_stream: bool = False) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)  # a replay leaves the graph's gradients in .grad
        if side_stream and self.kind is _CudaGraph:  # warm-up on a side stream, as torch.cuda.graph asks
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                r = super().__call__(batch, cfg, g, want_norm)
            torch.cuda.current_stream().wait_stream(s)
            return r
        return super().__call__(batch, cfg, g, want_norm)

    def _step_body(self, static: Batch, cfg: LossConfig, g: Gatherer) -> StepResult:
        # .grad = None first: in a capture, backward then allocates the gradients in the graph's pool and
        # replays overwrite them (no accumulation); the emulation re-runs this body and needs the same.
        self.optimizer.zero_grad(set_to_none=True)
        out = wsra_objective(self.model, static, cfg, g, check_sampler=False)
        (out.loss * g.loss_scale).backward()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        else:  # always: a replay cannot be asked for it at logging steps only (a few small kernels)
            norm = grad_norm(self.model.parameters())
        self.inner.step()
        return StepResult(out.loss, out.terms, out.negatives, norm)

    def _capture(self, sig, batch: Batch, cfg: LossConfig, g: Gatherer) -> StepResult:
        static = Batch(*(getattr(batch, n).clone() for n in ("video", "mask", "text", "video_id", "target")),
                       meta=batch.meta)
        graph = self.kind(batch.video.device)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
        try:
            result = graph.capture(lambda: self._step_body(static, cfg, g))
        except Exception as e:  # noqa: BLE001 - an uncapturable operation: eager from now on, same numbers
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"train.cuda_graph: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "training continues without CUDA graphs", RuntimeWarning, stacklevel=2)
            if self.kind is _CudaGraph:
                torch.cuda.synchronize()
            return self._eager(batch, cfg, g)
        grads = [p.grad for p in self.model.parameters()]  # kept alive: the graph writes into them
        self.graphs[sig] = (graph, static, result, grads)
        if self.kind is _CudaGraph:
            graph.replay()  # capture records without running: this step's work happens now
        else:  # the emulation ran the step while 'capturing'
            pass
        self.replays += 1
        return result


def _emulate() -> bool:
    return os.environ.get("WSRA_TEST_EMULATE_GRAPH") == "1"


def graph_blockers(recipe, accelerator, world: int) -> list[str]:
    """Why this run cannot replay CUDA graphs ([]: it can).  Decided before the optimizer is built, because
    Adam must be built `capturable` (its step counter on the device) for its step to be captured."""
    if recipe.train.cuda_graph == "false":
        return ["train.cuda_graph=false"]
    blockers = []
    if accelerator.device.type != "cuda" and not _emulate():
        blockers.append("not on a GPU")
    if world > 1:
        blockers.append("several processes (collectives stay outside graphs)")
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        blockers.append("DeepSpeed")
    if str(accelerator.mixed_precision) != "no":
        blockers.append(f"mixed precision {accelerator.mixed_precision}")
    return blockers


def make_step(model, optimizer, accelerator, recipe, blockers: list[str]) -> tuple[EagerStep, str]:
    """The step for `recipe.train.cuda_graph` (auto | true | false) given `graph_blockers`, and a line saying which."""
    clip = recipe.optim.grad_clip
    if blockers:  # train.cuda_graph=true that cannot be served: the trainer prints one warning line (not a
        # RuntimeWarning, which printed its file:line and source line, once per process)
        return EagerStep(model, optimizer, accelerator, clip), "eager step (" + ", ".join(blockers) + ")"
    step = GraphedStep(model, optimizer, accelerator, clip, recipe.loss, emulate=_emulate())
    return step, "steady-state step replayed from a CUDA graph" + (" (emulated for a test)" if _emulate() else "")
