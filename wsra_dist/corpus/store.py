"""How a corpus holds its candidates' first-layer projections: densely, or as DiDeMo's per-video parts.

φ's first layer is linear, so a candidate's projection W_v x + b is fixed once the video is known.  Two layouts:

* `DenseStore` ("candidates"): pv (M, H), one row per candidate.  Any protocol (Charades-STA / ActivityNet
  windows, or DiDeMo with LayerNorm inputs, which is not linear in the parts).
* `DidemoChunkStore` ("didemo_chunks"): per video the 6 projected chunks of each modality and the global
  part, plus 21 denominators per modality and 21 norms (model.Scorer.didemo_parts): 7 rows of H for a
  one-modality video instead of 21, so an index is 3x smaller and reading it from memory costs a third.
  The 21 candidates are rebuilt block by block when scored (`model.didemo_from_parts`, the training
  arithmetic), never all at once.

Both give `blocks(rows, device, shift)`: new float32 buffers (the caller may overwrite them) of projections (K, Vb, H) of Vb consecutive videos' K candidates each
(candidate c of the block's video v at [c, v]; the dense layout yields K = 1 and Vb = rows).  The parts are kept
chunk-major in memory, local (M, 6, V, H), so a block's 21 x Vb candidates are one (21, 6) x (6, Vb H) GEMM
per modality and a few in-place passes over a block small enough to stay in cache: 6x faster than
materialising the block by batched per-video products (bench/bench_search.py).
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..data.records import DataError

LAYOUTS = ("candidates", "didemo_chunks", "snippets")
N_DIDEMO = 21


class DenseStore:
    layout = "candidates"

    def __init__(self, pv: torch.Tensor):
        self.pv = pv

    @property
    def rows(self) -> int:
        return int(self.pv.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.pv.shape[1]) if self.pv.dim() == 2 else 0

    def to(self, device) -> "DenseStore":
        return DenseStore(self.pv.to(device))

    def blocks(self, rows: int, device=None, shift: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.rows, rows):
            b = self.pv[s : s + rows].to(device or self.pv.device, torch.float32, copy=True).unsqueeze(0)
            yield s, b if shift is None else b.add_(shift)

    def cat(self, other: "DenseStore") -> "DenseStore":
        return DenseStore(torch.cat([self.pv.float(), other.pv.float()]))

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"pv": self.pv.to(dtype).contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], videos: int) -> "DenseStore":
        return cls(t["pv"])

    def check_finite(self) -> bool:
        return all(bool(torch.isfinite(b).all()) for _, b in self.blocks(1 << 16))

    def flat(self) -> torch.Tensor:
        """(M, H) float32 projections, video-major (tests and tools; scoring goes through blocks)."""
        return self.pv.float()


class DidemoChunkStore:
    """Per-video parts (Scorer.didemo_parts) of V DiDeMo videos, and the shared TEF term and bias.

    g (V, H), local (M, 6, V, H) chunk-major, den (V, 21, M), norm (V, 21), tef (21, H), bias (H)."""

    layout = "didemo_chunks"

    def __init__(self, g: torch.Tensor, local: torch.Tensor, den: torch.Tensor, norm: torch.Tensor,
                 tef: torch.Tensor, bias: torch.Tensor):
        self.g, self.local, self.den, self.norm, self.tef, self.bias = g, local, den, norm, tef, bias

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], bias: torch.Tensor) -> "DidemoChunkStore":
        """From Scorer.didemo_parts (local (V, M, 6, H))."""
        return cls(parts["g"], parts["local"].permute(1, 2, 0, 3).contiguous(), parts["den"], parts["norm"],
                   parts["tef"], bias.detach())

    @property
    def videos(self) -> int:
        return int(self.g.shape[0])

    @property
    def rows(self) -> int:
        return N_DIDEMO * self.videos

    @property
    def hidden(self) -> int:
        return int(self.g.shape[1])

    def to(self, device) -> "DidemoChunkStore":
        return DidemoChunkStore(*(x.to(device) for x in (self.g, self.local, self.den, self.norm, self.tef, self.bias)))

    def blocks(self, rows: int, device=None, shift: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """pv_c = (g + tef_c + Σ_m (A @ local_m)[c] / den_cm) / norm_c + bias, as model.didemo_from_parts
        (the same value up to float rounding; tests hold them within 1e-5); + shift (H) when given, in the
        same pass (search adds the query's projection here)."""
        from ..geometry import didemo_pooling_matrix

        dev = device or self.g.device
        step = max(1, rows // N_DIDEMO)
        A = didemo_pooling_matrix(torch.float32, dev)
        tef, bias = self.tef.to(dev, torch.float32), self.bias.to(dev, torch.float32)
        if shift is not None:
            bias = bias + shift.to(dev, torch.float32)
        has_tef = bool(tef.any())
        H = self.hidden
        for v0 in range(0, self.videos, step):
            v1 = min(self.videos, v0 + step)
            n = v1 - v0
            k = self.norm[v0:v1].to(dev, torch.float32).reciprocal().T.unsqueeze(-1)  # (21, n, 1)
            den = self.den[v0:v1].to(dev, torch.float32)
            y = None
            for m in range(self.local.shape[0]):
                t = (A @ self.local[m, :, v0:v1].to(dev, torch.float32).reshape(6, -1)).view(N_DIDEMO, n, H)
                t.mul_(k / den[:, :, m].T.unsqueeze(-1))
                y = t if y is None else y.add_(t)
            y.addcmul_(self.g[v0:v1].to(dev, torch.float32).unsqueeze(0), k)
            if has_tef:
                y.addcmul_(tef.unsqueeze(1), k)
            yield N_DIDEMO * v0, y.add_(bias)

    def flat(self) -> torch.Tensor:
        """(21 V, H) float32 projections, video-major (tests and tools; scoring goes through blocks)."""
        return torch.cat([b.transpose(0, 1).reshape(-1, self.hidden) for _, b in self.blocks(1 << 16)])

    def cat(self, other: "DidemoChunkStore") -> "DidemoChunkStore":
        if self.local.shape[:2] != other.local.shape[:2] or self.hidden != other.hidden:
            raise DataError("the videos to append have another feature layout than the index's")
        return DidemoChunkStore(torch.cat([self.g.float(), other.g.float()]),
                                torch.cat([self.local.float(), other.local.float()], 2),
                                torch.cat([self.den, other.den]), torch.cat([self.norm, other.norm]),
                                self.tef, self.bias)

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The projections at the index dtype; denominators, norms, TEF and bias (21 scalars a video) in fp32."""
        return {"g": self.g.to(dtype).contiguous(), "local": self.local.to(dtype).contiguous(),
                "den": self.den.float().contiguous(), "norm": self.norm.float().contiguous(),
                "tef": self.tef.float().contiguous(), "bias": self.bias.float().contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], videos: int) -> "DidemoChunkStore":
        s = cls(t["g"], t["local"], t["den"], t["norm"], t["tef"], t["bias"])
        H = s.hidden
        ok = (s.g.shape == (videos, H) and s.local.dim() == 4 and s.local.shape[1:] == (6, videos, H)
              and s.den.shape == (videos, N_DIDEMO, s.local.shape[0])
              and s.norm.shape == (videos, N_DIDEMO) and s.tef.shape == (N_DIDEMO, H) and s.bias.shape == (H,))
        if not ok:
            raise ValueError("the stored parts' shapes do not fit together")
        return s

    def check_finite(self) -> bool:
        return all(bool(torch.isfinite(x.float()).all()) for x in (self.g, self.local, self.den, self.norm,
                                                                   self.tef, self.bias))


class SnippetStore:
    """Projected snippets of every video and each candidate window's snippet range: for models that rank windows by
    the inside-vs-outside contrast of their snippets' logits (`model.scale_calibration: contrast`), which a
    window's own projection cannot give.  pv (S, H) video after video, first/count (V,) their rows, ranges (M, 2)
    [a, b) within the candidate's video, cand_video (M,)."""

    layout = "snippets"

    def __init__(self, pv: torch.Tensor, first: torch.Tensor, count: torch.Tensor, ranges: torch.Tensor,
                 cand_video: torch.Tensor):
        self.pv, self.first, self.count, self.ranges, self.cand_video = pv, first, count, ranges, cand_video

    @property
    def rows(self) -> int:
        return int(self.ranges.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.pv.shape[1]) if self.pv.dim() == 2 else 0

    def to(self, device) -> "SnippetStore":
        return SnippetStore(self.pv.to(device), self.first, self.count, self.ranges, self.cand_video)

    def snippet_blocks(self, rows: int, device=None, shift: torch.Tensor | None = None):
        return DenseStore(self.pv).blocks(rows, device, shift)

    def contrast(self, snippet_logits: torch.Tensor, weight: float) -> torch.Tensor:
        """(N, M) float64: per candidate, the mean logit of its snippets minus `weight` x the mean of its video's
        other snippets (none: the video's mean), scale_calibration.inside_outside for every video at once."""
        x = snippet_logits.to(torch.float64)
        c = torch.nn.functional.pad(x.cumsum(1), (1, 0))  # (N, S + 1)
        dev = x.device
        v = self.cand_video.to(dev).long()
        off, T = self.first.to(dev).long()[v], self.count.to(dev).long()[v]
        a, b = off + self.ranges[:, 0].to(dev).long(), off + self.ranges[:, 1].to(dev).long()
        inside = c[:, b] - c[:, a]
        total = c[:, off + T] - c[:, off]
        n, rest = (b - a).to(torch.float64), (T - (b - a)).to(torch.float64)
        out = torch.where(rest > 0, (total - inside) / rest.clamp(min=1), total / T.to(torch.float64))
        return inside / n - float(weight) * out

    def cat(self, other: "SnippetStore") -> "SnippetStore":
        V = self.first.shape[0]
        return SnippetStore(torch.cat([self.pv.float(), other.pv.float()]),
                            torch.cat([self.first, other.first + self.pv.shape[0]]), torch.cat([self.count, other.count]),
                            torch.cat([self.ranges, other.ranges]), torch.cat([self.cand_video, other.cand_video + V]))

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"snippets": self.pv.to(dtype).contiguous(), "snip_first": self.first.long().contiguous(),
                "snip_count": self.count.long().contiguous(), "ranges": self.ranges.int().contiguous(),
                "cand_video": self.cand_video.int().contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], videos: int) -> "SnippetStore":
        s = cls(t["snippets"], t["snip_first"], t["snip_count"], t["ranges"], t["cand_video"])
        ok = (s.first.shape == (videos,) and s.count.shape == (videos,) and int(s.count.sum()) == s.pv.shape[0]
              and s.ranges.dim() == 2 and s.ranges.shape[1] == 2 and s.cand_video.shape == (s.ranges.shape[0],))
        if ok and len(s.ranges):
            ok = (bool((s.ranges[:, 0] >= 0).all()) and bool((s.ranges[:, 0] < s.ranges[:, 1]).all())
                  and int(s.cand_video.max()) < videos
                  and bool((s.ranges[:, 1] <= s.count[s.cand_video.long()]).all()))
        if not ok:
            raise ValueError("the stored snippets and windows do not fit together")
        return s

    def check_finite(self) -> bool:
        return bool(torch.isfinite(self.pv.float()).all())

    def flat(self) -> torch.Tensor:
        raise NotImplementedError("a snippets index holds no per-candidate projections")


def store_from_tensors(layout: str, t: dict[str, torch.Tensor], videos: int):
    if layout == "candidates":
        return DenseStore.from_tensors(t, videos)
    if layout == "snippets":
        return SnippetStore.from_tensors(t, videos)
    if layout == "didemo_chunks":
        return DidemoChunkStore.from_tensors(t, videos)
    raise ValueError(f"unknown candidate layout {layout!r} (known: {', '.join(LAYOUTS)})")


def cat_stores(a, b):
    if a.layout != b.layout:
        raise DataError(f"cannot append {b.layout!r} candidates to an index of {a.layout!r} candidates")
    return a.cat(b)
