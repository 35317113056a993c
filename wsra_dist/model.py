"""The scoring function φ (fused over all snippet-query pairs) and referring attention (Eq. 1-2).

φ(v, t) = Sigmoid(MLP(Cat(v, t))).  The first layer of the MLP acting on Cat(v, t) equals
W_v v + W_t t + b, so snippets and queries are projected once and broadcast-added: the
(videos x snippets x queries x D) concatenation is never built.  A single linear layer would be
additive in v and t and could not rank snippets differently for different queries, hence the MLP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint


MODEL_FORMAT = "wsra-dist-model/1"  # in config.json and the safetensors metadata
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # save_pretrained
RUN_CONFIG_FILE = "wsra_model.json"  # the same dict in training run and checkpoint folders
SHAPE_KEYS = ("hidden", "depth", "input_norm")  # model.* keys that decide the parameters' names and shapes


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors with the format version in its metadata, written to a staging name and swapped in."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": MODEL_FORMAT, "wsra_dist_version": __version__})
    os.replace(tmp, path)


@dataclass
class ScorerConfig:
    video_dim: int
    text_dim: int
    hidden: int = 256
    depth: int = 2  # number of hidden layers (>= 1)
    dropout: float = 0.0
    input_norm: str = "l2"  # none | l2 | layernorm, applied to v and t separately
    query_chunk: int = 0  # 0: all queries at once; else queries per chunk in all_pairs
    recompute: bool = False  # recompute each chunk's activations in backward (activation checkpointing)
    fused_kernel: bool = True  # depth 1: the pair-MLP autograd function that stores no pair activations
    compile: bool = False  # depth 1: the same pair MLP through torch.compile (one fused loop; see _compiled_pairs)
    # depth 1: auto (the fused Triton kernels on CUDA unless `compile`; the chunked eager kernel elsewhere) |
    # triton (always; on the CPU only under TRITON_INTERPRET=1) | eager (the chunked autograd function / compile)
    pair_kernel: str = "auto"


class Scorer(nn.Module):
    """φ as an MLP on Cat(v, t) whose first layer is split into a video and a text projection."""

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        if cfg.depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {cfg.depth}")
        if cfg.pair_kernel not in ("auto", "triton", "eager"):
            raise ValueError(f"model.pair_kernel must be auto|triton|eager, got {cfg.pair_kernel!r}")
        if cfg.input_norm not in ("none", "l2", "layernorm"):
            raise ValueError(f"model.input_norm must be none|l2|layernorm, got {cfg.input_norm!r}")
        self.cfg = cfg
        if cfg.input_norm == "layernorm":
            self.norm_v: nn.Module = nn.LayerNorm(cfg.video_dim)
            self.norm_t: nn.Module = nn.LayerNorm(cfg.text_dim)
        else:
            self.norm_v = self.norm_t = nn.Identity()
        # First layer of FC(Cat(v, t)): W = [W_v | W_t], bias lives on the video side.
        self.proj_v = nn.Linear(cfg.video_dim, cfg.hidden)
        self.proj_t = nn.Linear(cfg.text_dim, cfg.hidden, bias=False)
        layers: list[nn.Module] = []
        for _ in range(cfg.depth - 1):
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden)]
        layers += [nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1)]
        self.tail = nn.Sequential(*layers)

    # -- inputs -------------------------------------------------------------------------------
    def _nv(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v, dim=-1, eps=1e-6) if self.cfg.input_norm == "l2" else self.norm_v(v)

    def _nt(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1, eps=1e-6) if self.cfg.input_norm == "l2" else self.norm_t(t)

    def project_video(self, v: torch.Tensor) -> torch.Tensor:
        return self.proj_v(self._nv(v))

    def project_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.proj_t(self._nt(t))

    def project_didemo(self, chunks: torch.Tensor, modality_dims: tuple[int, ...], tef: bool) -> torch.Tensor:
        """project_video of the 21 DiDeMo candidates, computed from the 6 chunks: (b, 6, ΣD) -> (b, 21, H).

        A candidate is concat(g/(|g|+ε), l/(|l|+ε) per modality[, TEF]) with g, l means of chunks, and
        φ's first layer is linear: W x = Σ W_g g/(|g|+ε) + W_l l/(|l|+ε) (+ W_tef tef), where W_g g is the
        mean of the projected chunks.  So the 6 chunks are projected once (not 21 candidates of 2ΣD) and
        the norms come from the 6 x 6 Gram matrix.  `geometry.didemo_candidates_from_chunks` + project_video
        is the materialised reference (equal within 1e-5 in float64, values and gradients).
        LayerNorm input normalisation is not linear in the parts, so it uses the materialised path.
        """
        from .geometry import didemo_candidates_from_chunks

        if self.cfg.input_norm == "layernorm":
            return self.project_video(didemo_candidates_from_chunks(chunks, modality_dims, tef))
        return self.didemo_from_parts(self.didemo_parts(chunks, modality_dims, tef))

    def didemo_parts(self, chunks: torch.Tensor, modality_dims: tuple[int, ...], tef: bool) -> dict[str, torch.Tensor]:
        """The query-independent pieces the 21 candidate projections are sums of (not for layernorm):
        g (b, H): Σ over modalities of W_g · (mean chunk)/(|mean chunk|+ε); local (b, M, 6, H): W_l · chunk per
        modality; den (b, 21, M): |candidate's local mean|+ε per modality; norm (b, 21): |x| for the l2 input
        norm (1 without it); tef (21, H): W_tef · tef (zeros without TEF).  Divisions, not reciprocals: the
        same arithmetic as before the split, so training is bit-for-bit unchanged.  7 rows of H per video and
        modality instead of 21: what a search index stores (corpus/store.py)."""
        from .geometry import didemo_pooling_matrix, didemo_tef

        W = self.proj_v.weight  # (H, 2ΣD [+2])
        H = W.shape[0]
        A = didemo_pooling_matrix(chunks.dtype, chunks.device)  # (21, 6)
        g = 0
        locs, dens = [], []
        sq = 0  # squared norm of each candidate vector (for the l2 input norm)
        off = ow = 0
        for d in modality_dims:
            c = chunks[..., off : off + d]
            off += d
            p = c @ torch.cat([W[:, ow : ow + d], W[:, ow + d : ow + 2 * d]], 0).T  # (b, 6, 2H): global | local
            ow += 2 * d
            G = c @ c.transpose(-1, -2)  # (b, 6, 6)
            gn = G.mean((-1, -2)).clamp_min(0).sqrt()  # |mean of the 6 chunks|
            ln = torch.einsum("ci,bij,cj->bc", A, G, A).clamp_min(0).sqrt()  # |mean of each candidate's chunks|
            g = g + p[..., :H].mean(-2) / (gn + 1e-5).unsqueeze(-1)
            locs.append(p[..., H:])
            dens.append(ln + 1e-5)
            sq = sq + (gn / (gn + 1e-5)).square().unsqueeze(-1) + (ln / (ln + 1e-5)).square()
        if tef:
            t = didemo_tef(chunks.dtype, chunks.device)
            tw = t @ W[:, ow : ow + 2].T
            sq = sq + t.square().sum(-1)
        else:
            tw = chunks.new_zeros(A.shape[0], H)
        norm = sq.sqrt().clamp_min(1e-6) if self.cfg.input_norm == "l2" else torch.ones_like(sq)  # F.normalize
        return {"g": g, "local": torch.stack(locs, -3), "den": torch.stack(dens, -1), "norm": norm, "tef": tw}

    def didemo_from_parts(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """(b, 21, H) candidate projections from didemo_parts."""
        return didemo_from_parts(parts, self.proj_v.bias)

    def project_windows(self, snippets: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        """project_video of window means: snippets (T, D), ranges (W, 2) [a, b) snippet indices -> (W, H).

        The snippets are projected once and each window is a difference of prefix sums; the norm of a
        window mean comes from a 2-D prefix sum of the T x T Gram matrix (sums in float64: long videos).
        `geometry.window_features` + project_video is the materialised reference.
        """
        a, b = ranges[:, 0].long(), ranges[:, 1].long()
        n = (b - a).to(torch.float64).unsqueeze(-1)
        if self.cfg.input_norm == "layernorm":
            cs = F.pad(snippets.to(torch.float64).cumsum(0), (0, 0, 1, 0))
            return self.project_video(((cs[b] - cs[a]) / n).to(snippets.dtype))
        p = F.pad((snippets @ self.proj_v.weight.T).to(torch.float64).cumsum(0), (0, 0, 1, 0))  # (T+1, H)
        wm = (p[b] - p[a]) / n  # W · window mean
        if self.cfg.input_norm == "l2":
            x = snippets.to(torch.float64)
            c = F.pad((x @ x.T).cumsum(0).cumsum(1), (1, 0, 1, 0))  # (T+1, T+1)
            sq = (c[b, b] - c[a, b] - c[b, a] + c[a, a]).clamp_min(0) / n.squeeze(-1).square()
            wm = wm / sq.sqrt().clamp_min(1e-6).unsqueeze(-1)
        return wm.to(snippets.dtype) + self.proj_v.bias

    # -- scores -------------------------------------------------------------------------------
    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.tail(h).squeeze(-1)

    def pair_logits(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logit of φ for aligned pairs: v (..., Dv) with t broadcastable to (..., Dt)."""
        return self.logits_from_hidden(self.project_video(v) + self.project_text(t))

    def pair(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """φ(v, t) for aligned pairs."""
        return torch.sigmoid(self.pair_logits(v, t))

    def all_pairs_logits(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits for every (snippet, query) pair: v (B, T, Dv), t (N, Dt) -> (B, T, N)."""
        return self.all_pairs_logits_projected(self.project_video(v), self.project_text(t))

    def all_pairs_logits_projected(self, pv: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
        """all_pairs_logits from projected snippets pv (B, T, H) and queries pt (N, H)."""
        if self.cfg.fused_kernel and self.cfg.depth == 1 and (self.cfg.dropout == 0 or not self.training):
            last = self.tail[-1]
            if self._use_triton(pv.device):
                from .kernels import pair_mlp_logits

                return pair_mlp_logits(pv, pt, last.weight[0], last.bias[0])
            if self.cfg.compile and (fn := _compiled_pairs()) is not None:
                return fn(pv, pt, last.weight[0], last.bias[0])
            # Chunks of ~2^18 pair activations (1 MB) stay in L2 across the broadcast-add, ReLU and
            # product: 1.6-1.7x faster than one 38 MB chunk at 42 x 21 x 42 x 256 (bench/bench_train.py).
            chunk = self.cfg.query_chunk or max(1, (1 << 18) // max(1, pv.shape[0] * pv.shape[1] * pv.shape[2]))
            return _PairMLP1.apply(pv, pt, last.weight[0], last.bias[0], chunk)
        chunk = self.cfg.query_chunk or pt.shape[0]
        outs = []
        for s in range(0, pt.shape[0], chunk):
            ptc = pt[s : s + chunk]
            if self.cfg.recompute and torch.is_grad_enabled():
                outs.append(_checkpoint(self._chunk_logits, pv, ptc, use_reentrant=False))
            else:
                outs.append(self._chunk_logits(pv, ptc))
        return torch.cat(outs, dim=-1)

    def _use_triton(self, device: torch.device) -> bool:
        kind = self.cfg.pair_kernel
        if kind == "eager" or (kind == "auto" and (device.type != "cuda" or self.cfg.compile)):
            return False
        from .kernels import triton_pair_mlp_available

        if triton_pair_mlp_available(device):
            return True
        if kind == "triton":  # a setting this machine cannot serve: one line, not an "internal error"
            from .config import ConfigError

            raise ConfigError(pair_kernel_unavailable(device))
        return False  # auto on CUDA without triton: the eager kernel computes the same thing

    def _chunk_logits(self, pv: torch.Tensor, ptc: torch.Tensor) -> torch.Tensor:
        return self.logits_from_hidden(pv.unsqueeze(-2) + ptc)  # (B, T, n, H) -> (B, T, n)

    def all_pairs(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """φ for every (snippet, query) pair: (B, T, Dv) x (N, Dt) -> (B, T, N)."""
        return torch.sigmoid(self.all_pairs_logits(v, t))

    def all_pairs_naive(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Baseline that materialises Cat(v, t) for every pair (benchmarks and tests only)."""
        B, T, _ = v.shape
        N = t.shape[0]
        x = torch.cat(
            [self._nv(v).unsqueeze(2).expand(B, T, N, -1), self._nt(t).expand(B, T, N, -1)], dim=-1
        )
        w = torch.cat([self.proj_v.weight, self.proj_t.weight], dim=1)
        return torch.sigmoid(self.logits_from_hidden(F.linear(x, w, self.proj_v.bias)))


def pair_kernel_unavailable(device: torch.device | str) -> str:
    """Why model.pair_kernel=triton cannot run on `device` (the trainer checks it before writing anything)."""
    return (f"model.pair_kernel=triton needs triton and a CUDA device (or TRITON_INTERPRET=1), not {device}: "
            "install triton or set model.pair_kernel=auto")


def didemo_from_parts(parts: dict[str, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """(b, 21, H) DiDeMo candidate projections from Scorer.didemo_parts and φ's first-layer bias, in the parts'
    widest dtype (a search index stores them at fp16 and rebuilds candidates block by block in fp32)."""
    from .geometry import didemo_pooling_matrix

    loc = parts["local"]
    dt = torch.promote_types(loc.dtype, parts["den"].dtype)
    A = didemo_pooling_matrix(dt, loc.device)
    # Σ_m (A @ local_m)[c] / den[c, m]: (b, M, 21, H) summed over M
    acc = ((A @ loc.to(dt)) / parts["den"].to(dt).transpose(-1, -2).unsqueeze(-1)).sum(-3)
    acc = parts["g"].to(dt).unsqueeze(-2) + acc + parts["tef"].to(dt)
    return acc / parts["norm"].to(dt).unsqueeze(-1) + bias.to(dt)


def _pair_logits(pv: torch.Tensor, pt: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (pv.unsqueeze(2) + pt).clamp_min(0) @ w + c


_COMPILED: list = []  # [fn or None]: compiled once per process, None when torch.compile is unavailable here


def _compiled_pairs():
    """`_pair_logits` through torch.compile (inductor), or None where it cannot compile (warned once).

    Eager PyTorch runs the broadcast-add, ReLU and product as separate passes over b x T x N x H
    values (memory-bound); inductor fuses them, and their backward, into loops that keep no pair
    activations: 8x faster than `_PairMLP1` at 42 x 21 x 42 x 256 on one CPU thread
    (bench/bench_train.py).  The first compile costs ~20 s on CPU (~6 s from inductor's disk cache).
    """
    if not _COMPILED:
        import warnings

        fn = torch.compile(_pair_logits, dynamic=True)
        try:  # compile now, on tiny inputs, so a missing compiler is found here and not mid-step
            x = torch.zeros(1, 2, 3, requires_grad=True)
            fn(x, torch.zeros(2, 3), torch.zeros(3), torch.zeros(())).sum().backward()
        except Exception as e:  # no C++ compiler / triton: the eager kernel computes the same thing
            warnings.warn(f"model.compile: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using the eager pair kernel", RuntimeWarning, stacklevel=2)
            fn = None
        _COMPILED.append(fn)
    return _COMPILED[0]


class _PairMLP1(torch.autograd.Function):
    """logit[b,t,n] = w · relu(pv[b,t] + pt[n]) + c, chunked over queries.

    Autograd would keep the (B, T, N, H) pre-activations for backward; this keeps only pv, pt and
    recomputes each chunk's broadcast-add in backward (cheap, memory-bound), so activation memory
    is one chunk, never B x T x N x H.
    """

    @staticmethod
    def forward(ctx, pv, pt, w, c, chunk: int):  # type: ignore[override]
        out = pv.new_empty(pv.shape[0], pv.shape[1], pt.shape[0])
        for s in range(0, pt.shape[0], chunk):
            h = (pv.unsqueeze(2) + pt[s : s + chunk]).clamp_min_(0)
            out[..., s : s + chunk] = h @ w + c
        ctx.save_for_backward(pv, pt, w)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pv, pt, w = ctx.saved_tensors
        H = pv.shape[-1]
        gpv = torch.zeros_like(pv)
        gpt = torch.empty_like(pt)
        gw = torch.zeros_like(w)
        for s in range(0, pt.shape[0], ctx.chunk):
            h = (pv.unsqueeze(2) + pt[s : s + ctx.chunk]).clamp_min_(0)  # (B, T, n, H), recomputed
            gc = g[..., s : s + ctx.chunk].contiguous()
            gw += (gc.reshape(1, -1) @ h.reshape(-1, H))[0]
            dh = h.sign_().mul_(gc.unsqueeze(-1)).mul_(w)  # relu'(.) * g * w, in the same buffer
            gpv += dh.sum(2)
            gpt[s : s + ctx.chunk] = dh.sum((0, 1))
        return gpv, gpt, gw, g.sum(), None


def referring_attention(scores: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Eq. 2: α_t = softmax over the valid snippets of exp(φ(v_t, t)); scores, mask (B, T)."""
    return torch.softmax((scale * scores).masked_fill(~mask, float("-inf")), dim=-1)


def pool_foreground_background(
    v: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: v_f = Σ α_t v_t and v_b = 1/(T-1) Σ (1-α_t) v_t over the valid T snippets."""
    m = mask.to(v.dtype)
    fg = torch.einsum("bt,btd->bd", alpha * m, v)
    length = m.sum(-1, keepdim=True)
    # T = 1 has no background; the clamp keeps it finite (v_b = 0 there since 1 - α = 0).
    bg = torch.einsum("bt,btd->bd", (1 - alpha) * m, v) / (length - 1).clamp_min(1)
    return fg, bg


@dataclass
class WSRAOutput:
    scores: torch.Tensor  # (b, T) φ(v_t, t_own)
    logits: torch.Tensor  # (b, T) pre-sigmoid
    alpha: torch.Tensor  # (b, T)
    fg: torch.Tensor  # (b, Dv)
    bg: torch.Tensor  # (b, Dv)
    s_pos: torch.Tensor  # (b,) φ(v_f, t_own)
    s_neg: torch.Tensor  # (b,) φ(v_b, t_own)
    phi_all: torch.Tensor | None = None  # (b, T, N) φ(v_t, t_n) for every global query n
    phi_fg: torch.Tensor | None = None  # (b, N) φ(v_f, t_n)


def check_chunk_consistency(v, name: str = "model.chunk_consistency") -> float:
    """A chunk-consistency weight μ (from a config dict or a flag `name`): a finite number >= 0, else ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class DidemoLayout:
    """Inputs are DiDeMo's (6, ΣD) chunks; candidates are built per feature file (modality) [+ TEF]."""

    modality_dims: tuple[int, ...]
    tef: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "DidemoLayout | None":
        if not d or d.get("kind") != "didemo_chunks":
            return None
        return cls(tuple(int(x) for x in d["modalities"]), bool(d.get("tef", False)))

    def to_dict(self) -> dict:
        return {"kind": "didemo_chunks", "modalities": list(self.modality_dims), "tef": self.tef}


class WSRA(nn.Module):
    """Referring attention for a batch of (video, own query) samples.

    Everything that touches parameters happens in forward, because data-parallel wrappers (DDP,
    DeepSpeed) synchronise gradients only for what runs through the wrapped forward.

    With a `didemo` layout the video input is (b, 6, ΣD) chunks: the 21 candidates are the model's
    "snippets", materialised for pooling (Eq. 1) and projected from the chunks (`Scorer.project_didemo`)
    unless `project_chunks` is False (the materialised reference).
    """

    def __init__(self, cfg: ScorerConfig, attention_scale: float = 1.0, didemo: DidemoLayout | None = None,
                 project_chunks: bool = True, chunk_consistency: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.attention_scale = attention_scale
        self.chunk_consistency = chunk_consistency  # DiDeMo ranking rule (rank_logits); training never uses it
        self.scorer = Scorer(cfg)
        self.didemo = didemo
        self.project_chunks = project_chunks
        self.info: dict = {}  # what from_info built it from (dims, layout, model settings, text model, ...)

    # ------------------------------------------------------------------ Hugging Face-style API
    @classmethod
    def from_info(cls, info: dict) -> "WSRA":
        """The model a config dict describes (`config.json` / a run's `wsra_model.json`): no weights."""
        m, dims = info["model"], info["dims"]
        cfg = ScorerConfig(video_dim=int(dims["video"]), text_dim=int(dims["text"]), hidden=m["hidden"],
                           depth=m["depth"], dropout=m["dropout"], input_norm=m["input_norm"],
                           query_chunk=m.get("query_chunk", 0), recompute=False,
                           fused_kernel=m.get("fused_kernel", True), compile=bool(m.get("compile", False)),
                           pair_kernel=m.get("pair_kernel", "auto"))
        model = cls(cfg, attention_scale=m.get("attention_scale", 1.0), didemo=DidemoLayout.from_dict(info.get("layout")),
                    project_chunks=m.get("project_chunks", True), chunk_consistency=check_chunk_consistency(m.get("chunk_consistency", 0.0)))
        model.info = dict(info)
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """`config.json` + `model.safetensors` (metadata: format version) into `directory`, each replaced atomically."""
        if not self.info:
            raise ValueError("save_pretrained needs the model's config: build it with WSRA.from_info / from_pretrained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_safetensors(state, directory / WEIGHTS_FILE)
        tmp = directory / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps({**self.info, "format": MODEL_FORMAT}, indent=1))
        os.replace(tmp, directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "WSRA":
        """A model in eval mode from a `save_pretrained` folder, a training run folder or one of its checkpoints."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = next((path / f for f in (CONFIG_FILE, RUN_CONFIG_FILE) if (path / f).is_file()), None)
        if cfg_file is None or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path}: needs {WEIGHTS_FILE} and {CONFIG_FILE} (or a run's {RUN_CONFIG_FILE}): "
                                    "give a save_pretrained folder, a finished run folder or a checkpoint folder")
        try:
            info = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
        for where, v in ((cfg_file, info.get("format")), (path / WEIGHTS_FILE, fmt)):
            if v is not None and v.split("/")[0] != MODEL_FORMAT.split("/")[0]:
                raise ValueError(f"{where}: format {v!r} is not a wsra-dist model ({MODEL_FORMAT})")
            if v is not None and int(v.split("/")[-1]) > int(MODEL_FORMAT.split("/")[-1]):
                raise ValueError(f"{where}: format {v} is newer than this wsra-dist reads ({MODEL_FORMAT}); upgrade")
        try:
            model = cls.from_info(info)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{cfg_file}: incomplete model config (missing {e})") from None
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
        want = model.state_dict()
        # a config edited (or copied from another run) beside the weights: name the first disagreement, not
        # torch's multi-line RuntimeError
        for k in sorted(set(want) | set(state)):
            if k not in state or k not in want or tuple(state[k].shape) != tuple(want[k].shape):
                got = tuple(state[k].shape) if k in state else "missing"
                exp = tuple(want[k].shape) if k in want else "not in the model"
                raise ValueError(f"{path / WEIGHTS_FILE}: tensor {k!r} is {got} but {cfg_file.name} describes "
                                 f"{exp}: the weights and the config come from different models")
        model.load_state_dict(state)
        return model.to(device).eval()

    def candidates(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(model-space snippets/candidates (b, T, Dv), their first-layer projections (b, T, H))."""
        if self.didemo is None:
            return video, self.scorer.project_video(video)
        from .geometry import didemo_candidates_from_chunks

        cand = didemo_candidates_from_chunks(video, self.didemo.modality_dims, self.didemo.tef)
        if self.project_chunks:
            return cand, self.scorer.project_didemo(video, self.didemo.modality_dims, self.didemo.tef)
        return cand, self.scorer.project_video(cand)

    def candidate_logits(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """What the candidates are ranked by for their own query: (b, T) from video inputs and text (b, Dt).
        The logit of φ(candidate, query), or with `chunk_consistency` on DiDeMo rank_logits of it.  Rank by
        these, not by φ: a float32 sigmoid is exactly 1 above a logit of ~17, which a confident model reaches
        (ties then fall to the candidate order)."""
        _, pv = self.candidates(video)
        return self.rank_logits(self.scorer.logits_from_hidden(pv + self.scorer.project_text(text).unsqueeze(1)))

    def candidate_scores(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """sigmoid(candidate_logits): φ(candidate, query) when ranked by φ alone; (b, T)."""
        return torch.sigmoid(self.candidate_logits(video, text))

    def rank_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What DiDeMo's 21 candidates are ranked by, from their φ logits (..., 21): (logit + μ x the lowest
        logit of the candidate's single chunks) / (1 + μ) (μ = `chunk_consistency`; 0 or another layout: the
        logits as they are).  A candidate that adds a chunk not showing the query is pulled down by that chunk,
        which φ of the pooled candidate alone does not do (docs/method.md, "Ranking DiDeMo candidates").  Dividing
        by 1 + μ changes no ranking; it keeps the value a weighted mean of logits (a single chunk keeps its own),
        so sigmoid of it stays in φ's range and does not saturate sooner than φ."""
        if self.didemo is None or not self.chunk_consistency:
            return logits
        from .geometry import didemo_chunk_min

        w = self.chunk_consistency / (1.0 + self.chunk_consistency)  # in float64: any finite μ >= 0
        return (1.0 - w) * logits + w * didemo_chunk_min(logits)

    def forward(self, video: torch.Tensor, mask: torch.Tensor, text: torch.Tensor,
                text_global: torch.Tensor | None = None, all_pairs: bool = False, fg_pairs: bool = False) -> WSRAOutput:
        v, pv = self.candidates(video)
        pt_own = self.scorer.project_text(text)
        logits = self.scorer.logits_from_hidden(pv + pt_own.unsqueeze(1))  # (b, T)
        scores = torch.sigmoid(logits)
        alpha = referring_attention(scores, mask, self.attention_scale)
        fg, bg = pool_foreground_background(v, alpha, mask)
        s_pos, s_neg = self.scorer.pair(fg, text), self.scorer.pair(bg, text)
        pt_g = self.scorer.project_text(text_global) if (all_pairs or fg_pairs) else None
        phi_all = torch.sigmoid(self.scorer.all_pairs_logits_projected(pv, pt_g)) if all_pairs else None
        phi_fg = (torch.sigmoid(self.scorer.all_pairs_logits_projected(self.scorer.project_video(fg).unsqueeze(1), pt_g))
                  .squeeze(1) if fg_pairs else None)
        return WSRAOutput(scores, logits, alpha, fg, bg, s_pos, s_neg, phi_all, phi_fg)
