"""φ over all (snippet, query) pairs plus the WSRA losses, forward + backward, for one process's share
of a global batch: fused projections vs a naive path that materialises Cat(v, t).

Each variant runs in its own child process so that peak memory (CUDA: max_memory_allocated;
CPU: growth of peak RSS over the set-up) is its own; the ratios come from this one run.

    python bench/bench_phi.py [--scale didemo|charades|all] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SCALES = {
    # local videos, snippets, video dim, global queries
    "didemo": dict(b=42, T=21, dv=2 * 1024 + 2, n=336),
    "charades": dict(b=16, T=200, dv=1024, n=128),
}
VARIANTS = {
    "naive": dict(naive=True),  # materialises Cat(v, t) for every pair
    "fused-autograd": dict(naive=False, kernel=False),  # projections once, broadcast-add, autograd keeps activations
    "fused-recompute": dict(naive=False, kernel=False, chunk=32, recompute=True),  # + chunks recomputed in backward
    "fused-kernel": dict(naive=False, kernel=True),  # depth 1 only: pair-MLP function storing no pair activations
}


def child(scale: str, variant: str, depth: int, repeats: int, device: str) -> dict:
    import torch

    from wsra_dist import losses as L
    from wsra_dist.model import WSRA, ScorerConfig

    torch.manual_seed(0)
    s, v = SCALES[scale], VARIANTS[variant]
    dev = torch.device(device)
    model = WSRA(ScorerConfig(s["dv"], 384, hidden=256, depth=depth, query_chunk=v.get("chunk", 0),
                              recompute=v.get("recompute", False), fused_kernel=v.get("kernel", False))).to(dev)
    video = torch.randn(s["b"], s["T"], s["dv"], device=dev)
    mask = torch.ones(s["b"], s["T"], dtype=torch.bool, device=dev)
    mask[::3, s["T"] * 3 // 4:] = False
    text = torch.randn(s["n"], 384, device=dev)
    vids = torch.arange(s["n"], device=dev) // 4
    cfg = L.LossConfig()
    tn = torch.nn.functional.normalize(text, dim=-1)
    neg = L.sample_negatives(tn @ tn.T, vids, cfg.k_top, cfg.k_last)
    local = slice(0, s["b"])
    pos = torch.arange(s["b"], device=dev)

    def step():
        out = model(video, mask, text[local])
        phi = model.scorer.all_pairs_naive(video, text) if v["naive"] else model.scorer.all_pairs(video, text)
        loss = L.snippet_loss(phi, mask, pos, neg.hard[local], s["n"], cfg.tau, cfg.margin)
        sp, sn = model.scorer.pair(out.fg, text[local]), model.scorer.pair(out.bg, text[local])
        loss = loss + 0.1 * L.video_loss(sp, sn, local, cfg.tau, cfg.margin)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Touch every kernel once on a tiny batch so library loading is not counted as peak memory.
    small = model.scorer.all_pairs_naive(video[:1, :2], text[:2]) if v["naive"] else model.scorer.all_pairs(video[:1, :2], text[:2])
    small.sum().backward()
    model.zero_grad(set_to_none=True)
    # Peak memory: growth over the set-up (CUDA allocator peak; CPU peak RSS, monotone, so the
    # first step sets it and later steps reuse the freed pages).
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time_s": min(times[1:]), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="all", choices=["all", *SCALES])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    ap.add_argument("--depth", default="1,2", help="hidden layers of φ's MLP to measure, comma-separated")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), a.repeats, a.device)))
        return
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, device {a.device}")
    rows = []
    for scale in SCALES if a.scale == "all" else [a.scale]:
        for depth in [int(d) for d in a.depth.split(",")]:
            res = {}
            for variant in VARIANTS:
                if variant == "fused-kernel" and depth != 1:
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--child", scale, variant, str(depth), "--repeats", str(a.repeats),
                     "--device", a.device], capture_output=True, text=True,
                )
                if out.returncode:
                    sys.exit(out.stderr)
                res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            base = res["naive"]
            for variant, r in res.items():
                rows.append((scale, depth, variant, r["time_s"], r["peak_bytes"] / 2**20,
                             base["time_s"] / r["time_s"], base["peak_bytes"] / max(r["peak_bytes"], 1)))
    print(f"{'scale':9} {'depth':>5} {'variant':22} {'time s':>8} {'peak MiB':>9} {'speed-up':>9} {'mem ratio':>9}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:5d} {r[2]:22} {r[3]:8.3f} {r[4]:9.0f} {r[5]:8.1f}x {r[6]:8.1f}x")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    main()
