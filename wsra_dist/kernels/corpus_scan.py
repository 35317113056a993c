"""One query against every DiDeMo candidate of an index, straight from the stored per-video parts (Triton).

The parts layout (corpus/store.py DidemoChunkStore) keeps per video the global part g (H), the 6 projected chunks
of each modality local (M, 6, V, H) and, per candidate c = (s, e), M denominators and a norm.  A candidate's
first-layer projection is

    pv_c = (g + tef_c + Σ_m mean(local[m, s..e]) / den[c, m]) / norm_c + bias

and its logit w · relu(pv_c + pt) + c0.  The eager path (store.blocks + ReLU + product) writes every candidate's
(H,) row to memory and reads it back several times; here a program owns one candidate of BV videos, walks H in
tiles in registers and writes only the (V, 21) logits, so memory traffic is the stored parts (fp16 or fp32, read
as they are) and nothing else.  Programs run candidate-fastest, so the 21 programs of a video tile read its
parts from L2.  Forward only (search and evaluation; no gradient).  Runs on the CPU under TRITON_INTERPRET=1
(tests at tiny shapes against `didemo_scan_reference`, which is store.blocks' arithmetic).
"""

from __future__ import annotations

import torch

_BUILT: dict = {}


def didemo_scan_reference(g, local, den, norm, tef, bias, pt, w, c0) -> torch.Tensor:
    """(V, 21) float32 logits by the eager definition (materialises every candidate; tests only)."""
    from ..geometry import didemo_pooling_matrix

    A = didemo_pooling_matrix(torch.float64, g.device)
    x = torch.einsum("ck,mkvh->vcmh", A, local.double()) / den.double().unsqueeze(-1)  # (V, 21, M, H)
    pv = (g.double().unsqueeze(1) + tef.double() + x.sum(2)) / norm.double().unsqueeze(-1) + bias.double()
    return ((pv + pt.double()).clamp_min(0) @ w.double() + c0.double()).float()


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def scan(g, local, den, norm, tef, shift, w, c0, span_s, span_e, out, V, H, M,
             s_g, s_lm, s_lk, s_lv, s_dv, s_dc, s_nv, s_tef, s_out, BV: tl.constexpr, BH: tl.constexpr):
        cand = tl.program_id(0)
        v = tl.program_id(1) * BV + tl.arange(0, BV)
        vm = v < V
        a = tl.load(span_s + cand)
        b = tl.load(span_e + cand)
        inv_len = 1.0 / (b - a + 1).to(tl.float32)
        k_norm = 1.0 / tl.load(norm + v * s_nv + cand, mask=vm, other=1.0).to(tl.float32)
        acc = tl.zeros((BV,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            h = h0 + tl.arange(0, BH)
            hm = h < H
            mk = vm[:, None] & hm[None, :]
            y = tl.load(g + v[:, None] * s_g + h[None, :], mask=mk, other=0.0).to(tl.float32)
            y += tl.load(tef + cand * s_tef + h, mask=hm, other=0.0).to(tl.float32)[None, :]
            for m in range(M):
                span = tl.zeros((BV, BH), dtype=tl.float32)
                for k in range(a, b + 1):
                    span += tl.load(local + m * s_lm + k * s_lk + v[:, None] * s_lv + h[None, :], mask=mk,
                                    other=0.0).to(tl.float32)
                d = tl.load(den + v * s_dv + cand * s_dc + m, mask=vm, other=1.0).to(tl.float32)
                y += span * (inv_len / d)[:, None]
            y = y * k_norm[:, None] + tl.load(shift + h, mask=hm, other=0.0).to(tl.float32)[None, :]
            wv = tl.load(w + h, mask=hm, other=0.0).to(tl.float32)
            acc += tl.sum(tl.maximum(y, 0.0) * wv[None, :], axis=1)
        tl.store(out + v * s_out + cand, acc + tl.load(c0).to(tl.float32), mask=vm)

    return scan


def _kernel():
    from .pair_mlp import _interpret

    flag = _interpret()
    if flag not in _BUILT:
        _BUILT[flag] = _build()
    return _BUILT[flag], flag


def _spans(device) -> tuple[torch.Tensor, torch.Tensor]:
    from ..geometry import DIDEMO_CANDIDATES

    s = torch.tensor([a for a, _ in DIDEMO_CANDIDATES], dtype=torch.int32, device=device)
    e = torch.tensor([b for _, b in DIDEMO_CANDIDATES], dtype=torch.int32, device=device)
    return s, e


def didemo_scan_logits(g: torch.Tensor, local: torch.Tensor, den: torch.Tensor, norm: torch.Tensor,
                       tef: torch.Tensor, bias: torch.Tensor, pt: torch.Tensor, w: torch.Tensor,
                       c0: torch.Tensor) -> torch.Tensor:
    """(V, 21) float32 logits of one projected query pt (H,) against every candidate of V videos' parts:
    g (V, H), local (M, 6, V, H) (any float dtype, read as stored), den (V, 21, M), norm (V, 21), tef (21, H),
    bias (H,), w (H,), c0 (); needs `triton_pair_mlp_available(g.device)`."""
    V, H = g.shape
    M = local.shape[0]
    if local.shape[1:] != (6, V, H) or den.shape != (V, 21, M) or norm.shape != (V, 21) or tef.shape != (21, H):
        raise ValueError(f"didemo_scan_logits: parts of shapes g {tuple(g.shape)}, local {tuple(local.shape)}, den "
                         f"{tuple(den.shape)}, norm {tuple(norm.shape)}, tef {tuple(tef.shape)} do not fit")
    scan, interpret = _kernel()
    dev = g.device
    g, local = g.contiguous(), local.contiguous()
    den, norm = den.float().contiguous(), norm.float().contiguous()
    tef = tef.float().contiguous()
    shift = (bias.float() + pt.float().reshape(H)).contiguous()
    w1, c1 = w.float().contiguous(), c0.float().reshape(1).contiguous()
    out = torch.empty(V, 21, device=dev, dtype=torch.float32)
    if V == 0:
        return out
    s, e = _spans(dev)
    BV, BH = (16, 16) if interpret else (32, 128)
    grid = (21, -(-V // BV))
    scan[grid](g, local, den, norm, tef, shift, w1, c1, s, e, out, V, H, M,
               g.stride(0), local.stride(0), local.stride(1), local.stride(2), den.stride(0), den.stride(1),
               norm.stride(0), tef.stride(0), out.stride(0), BV=BV, BH=BH)
    return out
