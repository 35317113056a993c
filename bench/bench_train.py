"""Training throughput on DiDeMo-like data, in samples/s per GFLOP/s of fp32 GEMM measured in the same run:
the materialised-candidate path (`model.project_chunks=false`, the baseline) against projecting the 6
chunks once (`model.project_chunks=true`), and that + the pair MLP through torch.compile
(`model.compile=true`), for the bare model+loss+backward+step loop on preloaded batches and for the full
trainer (`python -m wsra_dist.train`, shards + loader + logging).

    python bench/bench_train.py [--shards DIR] [--videos 1200] [--steps 60] [--threads 1]

Without --shards a planted DiDeMo training set (`synth("didemo", ...)`, one feature file: (6, 1024) chunks,
so candidates of 2 x 1024; bundled 384-d text model) is written and sharded into a temp folder first.
`recipes/planted_didemo.yaml` (global batch 42, hidden 256, four loss terms).  GEMM GFLOP/s = 2 * 1024^3 /
(median time of a 1024 x 1024 x 1024 fp32 torch.matmul), measured before and after the training runs
(their mean is the divisor).  torch.set_num_threads(--threads) here and OMP_NUM_THREADS=--threads for the
trainer subprocesses; default 1, because on a machine shared with other busy processes a 2-thread OpenMP
team on 2 cores stalls at every barrier (measured here: ~20 samples/s instead of ~450) and the numbers
become meaningless.  Pass --threads N on an idle machine.  Bare-loop variants alternate (baseline,
projected, compiled, baseline, ...) and the best of each is kept; the compiled variant's compile happens
in the warm-up steps (bare loop) or before the first TensorBoard log (trainer), so neither rate includes it.
Full-trainer samples/s: steady state from the TensorBoard `samples_per_s` scalars (logged every 10 steps;
the first log, which includes start-up, is left out) and, for reference, train_samples / train_loop_s of
history.json (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "planted_didemo.yaml"
TARGET = 6.0  # samples/s per GFLOP/s (the target; the old path measured ~2.2)


def machine(threads: int) -> str:
    import torch

    from machine import describe

    return (describe() + "; "
            f"Python {platform.python_version()}, torch {torch.__version__}; torch threads {threads} "
            f"(OMP_NUM_THREADS={threads} for the trainer)")


def gemm_gflops(reps: int = 25) -> float:
    """fp32 GFLOP/s of a 1024^3 matmul: 2 * 1024^3 / median seconds per call."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=g)
    b = torch.randn(1024, 1024, generator=g)
    for _ in range(3):
        torch.matmul(a, b)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t)
    return 2 * 1024**3 / statistics.median(ts) / 1e9


VARIANTS = {  # name -> recipe overrides
    "before": ["model.project_chunks=false", "model.compile=false"],
    "projected": ["model.project_chunks=true", "model.compile=false"],
    "compiled": ["model.project_chunks=true", "model.compile=true"],
}


def bare_loops(shards: str, batch: int, steps: int, rounds: int = 2) -> dict[str, float]:
    """samples/s of model + losses + backward + step over batches already in memory, per variant."""
    import torch

    from wsra_dist.config import load_recipe
    from wsra_dist.data.loader import EpochLoader, ShardSource
    from wsra_dist.evaluation.predict import model_from_info
    from wsra_dist.objective import wsra_objective
    from wsra_dist.train import build_optimizer, model_info

    src = ShardSource.open(shards)
    batches = []
    for b in EpochLoader(src, batch, shuffle=False).epoch(0):
        batches.append(b)
        if len(batches) == steps + 5:
            break
    if len(batches) < steps + 5:
        sys.exit(f"{shards}: only {len(batches)} batches of {batch} in an epoch; need {steps + 5} (use more --videos "
                 "or fewer --steps)")

    def once(variant: str) -> float:
        r = load_recipe(RECIPE, [f"data.train_shards={shards}", f"train.batch_size={batch}", *VARIANTS[variant]])
        torch.manual_seed(0)
        model = model_from_info(model_info(r, src.manifest))
        assert model.project_chunks is (variant != "before")
        opt = build_optimizer(r, model.parameters())
        for b in batches[:5]:  # warm-up
            wsra_objective(model, b, r.loss).loss.backward()
            opt.zero_grad()
        t = time.perf_counter()
        n = 0
        for b in batches[5:]:
            out = wsra_objective(model, b, r.loss)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += b.video.shape[0]
        return n / (time.perf_counter() - t)

    best = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(rounds):
        for v in VARIANTS:
            best[v] = max(best[v], once(v))
    return best


def tensorboard_rate(out: Path) -> float:
    """Steady-state samples/s: Σ samples_per_s_i * Δt_i / Σ Δt_i over the logs after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(out.rglob("events.out.tfevents*"))
    if not files:
        return float("nan")
    ev = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "samples_per_s" in acc.Tags().get("scalars", []):
            ev += acc.Scalars("samples_per_s")
    ev.sort(key=lambda e: e.step)
    if len(ev) < 2:
        return float("nan")
    num = sum(e.value * (e.wall_time - p.wall_time) for p, e in zip(ev, ev[1:]))
    return num / (ev[-1].wall_time - ev[0].wall_time)


def trainer(shards: str, batch: int, steps: int, variant: str, threads: int, out: Path) -> tuple[float, float]:
    """(steady-state samples/s from TensorBoard, samples/s of the whole training loop from history.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "wsra_dist.train", str(RECIPE), f"data.train_shards={shards}", "data.val_shards=",
           "data.test_shards=", f"train.batch_size={batch}", f"train.max_steps={steps}", f"output_dir={out}",
           "train.progress=false", "train.log_every=10", "data.shuffle=true", *VARIANTS[variant]]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    h = json.loads((out / "history.json").read_text())
    return tensorboard_rate(out), h["train_samples"] / h["train_loop_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="DiDeMo training shards (default: planted, written to a temp folder)")
    ap.add_argument("--videos", type=int, default=1200, help="planted training videos when --shards is not given")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=42, help="global batch (one process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, GEMM and training alike (default 1)")
    ap.add_argument("--no-trainer", action="store_true", help="only the bare loops")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    print(machine(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if not shards:
            from wsra_dist.data.pack import shard_didemo
            from wsra_dist.data.synthetic import synth

            synth("didemo", Path(tmp) / "data", a.videos, 0)
            shard_didemo(Path(tmp) / "data" / "train_data.json", [str(Path(tmp) / "data" / "average_global_flow.h5")],
                         Path(tmp) / "shards", 500, progress=False, cache_dir=str(Path(tmp) / "cache"))
            shards = str(Path(tmp) / "shards")
        from wsra_dist.data.shards import load_manifest

        m = load_manifest(shards)
        print(f"{shards if a.shards else 'planted DiDeMo'}: {m['num_videos']} videos, {m['num_queries']} queries, "
              f"chunks (6, {m['dims']['stored']}) -> 21 candidates of {m['dims']['video']}, text {m['dims']['text']}; "
              f"global batch {a.batch}, {a.steps} timed steps")
        g0 = gemm_gflops()
        bare = bare_loops(shards, a.batch, a.steps)
        full = {}
        if not a.no_trainer:
            for v in VARIANTS:
                full[v] = trainer(shards, a.batch, a.steps, v, a.threads, Path(tmp) / f"run-{v}")
        g1 = gemm_gflops()
        gf = (g0 + g1) / 2
        print(f"fp32 GEMM 1024^3: {g0:.1f} GFLOP/s before, {g1:.1f} after; divisor {gf:.1f} GFLOP/s")
        print(f"{'path':64s} {'samples/s':>9s} {'per GFLOP/s':>11s} {'vs before':>9s}")
        label = {"before": "project_chunks=false (materialised, before)", "projected": "project_chunks=true",
                 "compiled": "project_chunks=true + compile=true"}
        rows = [(f"bare loop, {label[v]}", bare[v], bare["before"]) for v in VARIANTS]
        if full:
            rows += [(f"full trainer (TB steady state), {label[v]}", full[v][0], full["before"][0]) for v in VARIANTS]
            rows += [(f"full trainer (history.json, start-up incl.), {v}", full[v][1], full["before"][1])
                     for v in VARIANTS]
        for name, v, before in rows:
            print(f"{name:64s} {v:9.0f} {v / gf:11.2f} {v / before:9.2f}")
        if full:
            print("full trainer / bare loop (TB steady state): " + ", ".join(
                f"{v} {full[v][0] / bare[v]:.2f}" for v in VARIANTS))
        for v in ("projected", "compiled"):
            best = full[v][0] if full else bare[v]
            print(f"target >= {TARGET} samples/s per GFLOP/s ({'full trainer' if full else 'bare loop'}, {label[v]}): "
                  f"{best / gf:.2f} -> {'met' if best / gf >= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
