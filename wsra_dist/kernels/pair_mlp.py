"""The depth-1 pair MLP of φ as fused Triton kernels: logits[b,t,n] = w · relu(pv[b,t] + pt[n]) + c.

Eager PyTorch (and `model._PairMLP1`) materialises (pairs x H) activations in chunks and launches several
kernels per chunk; on a GPU that is hundreds of tiny launches per step at batch 42, and memory-bound
passes at batch 2,048.  Here every program owns a tile of pairs, walks H in registers and writes only
the (B, T, N) logits; backward recomputes relu(pv + pt) tile by tile instead of storing it:

* forward:  grid (row tiles, query tiles); rows are the B*T snippets, flattened.
* backward, pass 1 (grid: row tiles x H tiles): reduces over queries -> d pv, and the partial sums of
  d w for the tile's rows (a (row tiles, H) buffer summed afterwards: no atomics, deterministic).
* backward, pass 2 (grid: query tiles x H tiles): reduces over rows -> d pt.
* d c = Σ g.

Accumulation is float32 whatever the input dtype (bf16/fp16 inputs are read and widened); gradients are
written in the inputs' dtypes.  Nothing reads a tensor value on the host (c is read by the kernel), so
a step that uses it can be captured in a CUDA graph.  The kernels run on the CPU under
TRITON_INTERPRET=1 (tests at tiny shapes); `pair_mlp_reference` is the eager definition.
"""

from __future__ import annotations

import torch

_BUILT: dict = {}  # interpret flag -> (fwd, bwd_rows, bwd_queries) kernels, built on first use


def pair_mlp_reference(pv: torch.Tensor, pt: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The definition: (B, T, H), (N, H), (H,), () -> (B, T, N), materialising every pair (tests only)."""
    return (pv.unsqueeze(2) + pt).clamp_min(0) @ w + c


def _interpret() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def triton_pair_mlp_available(device: torch.device | str) -> bool:
    """True where the fused kernels can run on `device`: CUDA with triton importable, or any device
    under TRITON_INTERPRET=1 (the CPU interpreter used by the tests)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed / broken install: the eager kernel serves
        return False
    return torch.device(device).type == "cuda" or _interpret()


def _configs(kind: str):
    """Tile shapes autotuned per (H, N) on the GPU; the interpreter takes the first (it is slow)."""
    import triton

    if kind == "fwd":
        shapes = [(32, 32, 8, 4), (64, 32, 8, 4), (64, 64, 4, 8), (32, 64, 8, 4), (128, 32, 4, 8), (64, 64, 8, 8)]
    else:  # backward: the reduced axis is the second
        shapes = [(32, 32, 8, 4), (64, 16, 16, 4), (32, 32, 16, 8), (64, 32, 8, 4), (16, 64, 16, 4), (128, 16, 8, 8)]
    return [triton.Config({"BA": a, "BB": b, "BH": h}, num_warps=nw) for a, b, h, nw in shapes]


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(pv, pt, w, c, out, R, N, H, s_pv, s_pt, s_out, RB, NB, BA: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
        r = tl.program_id(0) * BA + tl.arange(0, BA)
        n = tl.program_id(1) * BB + tl.arange(0, BB)
        rm, nm = r < R, n < N
        acc = tl.zeros((BA, BB), dtype=tl.float32)
        for h0 in range(0, H, BH):
            h = h0 + tl.arange(0, BH)
            hm = h < H
            a = tl.load(pv + r[:, None] * s_pv + h[None, :], mask=rm[:, None] & hm[None, :], other=0.0).to(tl.float32)
            b = tl.load(pt + n[:, None] * s_pt + h[None, :], mask=nm[:, None] & hm[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w + h, mask=hm, other=0.0).to(tl.float32)
            x = tl.maximum(a[:, None, :] + b[None, :, :], 0.0)
            acc += tl.sum(x * wv[None, None, :], axis=2)
        cv = tl.load(c).to(tl.float32)
        tl.store(out + r[:, None] * s_out + n[None, :], acc + cv, mask=rm[:, None] & nm[None, :])

    @triton.jit
    def bwd_rows(pv, pt, w, g, gpv, gw_part, R, N, H, s_pv, s_pt, s_g, s_gpv, RB, NB,
                 BA: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
        # one (row tile, H tile): d pv = w * Σ_n g[r,n] 1[x > 0];  partial d w = Σ_{r in tile, n} g relu(x)
        pid_r = tl.program_id(0)
        r = pid_r * BA + tl.arange(0, BA)
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        rm, hm = r < R, h < H
        a = tl.load(pv + r[:, None] * s_pv + h[None, :], mask=rm[:, None] & hm[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w + h, mask=hm, other=0.0).to(tl.float32)
        ga = tl.zeros((BA, BH), dtype=tl.float32)
        gw = tl.zeros((BH,), dtype=tl.float32)
        for n0 in range(0, N, BB):
            n = n0 + tl.arange(0, BB)
            nm = n < N
            b = tl.load(pt + n[:, None] * s_pt + h[None, :], mask=nm[:, None] & hm[None, :], other=0.0).to(tl.float32)
            gg = tl.load(g + r[:, None] * s_g + n[None, :], mask=rm[:, None] & nm[None, :], other=0.0).to(tl.float32)
            x = a[:, None, :] + b[None, :, :]
            g3 = gg[:, :, None]
            ga += tl.sum(tl.where(x > 0.0, g3, 0.0), axis=1)
            gw += tl.sum(tl.sum(tl.maximum(x, 0.0) * g3, axis=1), axis=0)
        tl.store(gpv + r[:, None] * s_gpv + h[None, :], ga * wv[None, :], mask=rm[:, None] & hm[None, :])
        tl.store(gw_part + pid_r * H + h, gw, mask=hm)

    @triton.jit
    def bwd_queries(pv, pt, w, g, gpt, R, N, H, s_pv, s_pt, s_g, s_gpt, RB, NB,
                    BA: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
        # one (query tile, H tile): d pt = w * Σ_r g[r,n] 1[x > 0]
        n = tl.program_id(0) * BA + tl.arange(0, BA)
        h = tl.program_id(1) * BH + tl.arange(0, BH)
        nm, hm = n < N, h < H
        b = tl.load(pt + n[:, None] * s_pt + h[None, :], mask=nm[:, None] & hm[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w + h, mask=hm, other=0.0).to(tl.float32)
        gb = tl.zeros((BA, BH), dtype=tl.float32)
        for r0 in range(0, R, BB):
            r = r0 + tl.arange(0, BB)
            rm = r < R
            a = tl.load(pv + r[:, None] * s_pv + h[None, :], mask=rm[:, None] & hm[None, :], other=0.0).to(tl.float32)
            gg = tl.load(g + r[None, :] * s_g + n[:, None], mask=nm[:, None] & rm[None, :], other=0.0).to(tl.float32)
            x = b[:, None, :] + a[None, :, :]  # (queries, rows, H)
            gb += tl.sum(tl.where(x > 0.0, gg[:, :, None], 0.0), axis=1)
        tl.store(gpt + n[:, None] * s_gpt + h[None, :], gb * wv[None, :], mask=nm[:, None] & hm[None, :])

    if _interpret():
        return fwd, bwd_rows, bwd_queries, True
    # Tuned once per (H, power-of-two bucket of rows and queries): the epoch tail reuses a tuned config.
    # gw_part is zeroed before each trial and before the run that follows tuning (a trial with smaller row
    # tiles writes rows the chosen config does not).
    key = ["H", "RB", "NB"]
    return (triton.autotune(_configs("fwd"), key=key)(fwd),
            triton.autotune(_configs("bwd"), key=key, reset_to_zero=["gw_part"])(bwd_rows),
            triton.autotune(_configs("bwd"), key=key)(bwd_queries), False)


def _kernels():
    flag = _interpret()
    if flag not in _BUILT:
        _BUILT[flag] = _build()
    return _BUILT[flag]


_FIXED = {"BA": 16, "BB": 16, "BH": 16}  # interpreter tiles (smaller than most test shapes' padded sizes)


def _bucket(x: int) -> int:
    """Autotune keys by powers of two: the batch's last step or a new N reuses a tuned config."""
    return 1 << max(int(x) - 1, 0).bit_length()


class _PairMLPTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pv, pt, w, c):  # type: ignore[override]
        fwd, _, _, fixed = _kernels()
        B, T, H = pv.shape
        N = pt.shape[0]
        pv2, pt2, w1 = pv.reshape(B * T, H).contiguous(), pt.contiguous(), w.contiguous()
        c1 = c.reshape(1).to(torch.float32)
        out = torch.empty(B * T, N, device=pv.device, dtype=torch.float32)
        R = B * T
        if R and N:
            kw = _FIXED if fixed else {}
            grid = lambda m: (triton_cdiv(R, m["BA"]), triton_cdiv(N, m["BB"]))  # noqa: E731
            fwd[grid](pv2, pt2, w1, c1, out, R, N, H, pv2.stride(0), pt2.stride(0), out.stride(0), _bucket(R), _bucket(N),
                      **kw)
        ctx.save_for_backward(pv2, pt2, w1)
        ctx.shape = (B, T)
        ctx.c_dtype = c.dtype
        out = out.view(B, T, N)
        return out if pv.dtype == torch.float32 else out.to(pv.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        _, bwd_rows, bwd_queries, fixed = _kernels()
        pv2, pt2, w1 = ctx.saved_tensors
        B, T = ctx.shape
        R, H = pv2.shape
        N = pt2.shape[0]
        g2 = g.reshape(R, N).contiguous()
        gpv = torch.empty_like(pv2)
        gpt = torch.empty_like(pt2)
        kw = _FIXED if fixed else {}
        if R and N:
            # d w's partial sums: one row per row tile; sized for the smallest row tile any config uses
            rows_min = 16
            gw_part = torch.zeros(triton_cdiv(R, rows_min), H, device=pv2.device, dtype=torch.float32)
            grid_r = lambda m: (triton_cdiv(R, m["BA"]), triton_cdiv(H, m["BH"]))  # noqa: E731
            bwd_rows[grid_r](pv2, pt2, w1, g2, gpv, gw_part, R, N, H, pv2.stride(0), pt2.stride(0), g2.stride(0),
                             gpv.stride(0), _bucket(R), _bucket(N), **kw)
            grid_q = lambda m: (triton_cdiv(N, m["BA"]), triton_cdiv(H, m["BH"]))  # noqa: E731
            bwd_queries[grid_q](pv2, pt2, w1, g2, gpt, R, N, H, pv2.stride(0), pt2.stride(0), g2.stride(0),
                                gpt.stride(0), _bucket(R), _bucket(N), **kw)
            gw = gw_part.sum(0).to(w1.dtype)
        else:
            gpv.zero_(), gpt.zero_()
            gw = torch.zeros_like(w1)
        gc = g2.sum().to(ctx.c_dtype)
        return gpv.view(B, T, H), gpt, gw, gc


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pair_mlp_logits(pv: torch.Tensor, pt: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Fused logits[b,t,n] = w · relu(pv[b,t] + pt[n]) + c: pv (B, T, H), pt (N, H), w (H,), c () -> (B, T, N).

    Differentiable in all four inputs; needs `triton_pair_mlp_available(pv.device)`.  Output float32 for
    float32 inputs, else the inputs' promoted dtype (accumulated in float32 either way)."""
    if pv.dim() != 3 or pt.dim() != 2 or pv.shape[-1] != pt.shape[-1] or w.shape != (pv.shape[-1],):
        raise ValueError(f"pair_mlp_logits: shapes pv {tuple(pv.shape)}, pt {tuple(pt.shape)}, w {tuple(w.shape)} "
                         "do not fit (B, T, H), (N, H), (H,)")
    return _PairMLPTriton.apply(pv, pt, w, c)
