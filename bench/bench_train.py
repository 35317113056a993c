"""Training throughput: the full trainer (shards, loader, gather, logging) against the bare model+loss
loop on preloaded tensors, as a ratio in one run; and 1 vs 2 processes on this machine.

    python bench/bench_train.py [--shards shards/planted_didemo/train] [--steps 60]

Without --shards a planted DiDeMo training set is written to a temp folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "planted_didemo.yaml"


def bare_loop(shards: str, batch: int, steps: int) -> float:
    """samples/s of model + losses + backward + step over batches already in memory."""
    import torch

    from wsra_dist.config import load_recipe
    from wsra_dist.data.loader import EpochLoader, ShardSource
    from wsra_dist.evaluation.predict import model_from_info
    from wsra_dist.objective import wsra_objective
    from wsra_dist.train import build_optimizer, model_info

    r = load_recipe(RECIPE, [f"data.train_shards={shards}", f"train.batch_size={batch}"])
    src = ShardSource.open(shards)
    torch.manual_seed(0)
    model = model_from_info(model_info(r, src.manifest))
    opt = build_optimizer(r, model.parameters())
    batches = []
    for b in EpochLoader(src, batch, shuffle=False).epoch(0):
        batches.append(b)
        if len(batches) == steps + 5:
            break
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


def trainer(shards: str, batch: int, steps: int, procs: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "wsra_dist.train"]
    env = dict(os.environ)
    if procs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "wsra_dist.train"]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
    cmd += [str(RECIPE), f"data.train_shards={shards}", "data.val_shards=", "data.test_shards=",
            f"train.batch_size={batch // procs}", f"train.max_steps={steps}", f"output_dir={out}",
            "train.progress=false", "train.log_every=10", "data.shuffle=true"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    h = json.loads((out / "history.json").read_text())
    return h["train_samples"] / h["train_loop_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=42, help="global batch")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if not shards:
            from wsra_dist.data.pack import shard_didemo
            from wsra_dist.data.synthetic import synth

            synth("didemo", Path(tmp) / "data", 1200, 0)
            shard_didemo(Path(tmp) / "data" / "train_data.json", [str(Path(tmp) / "data" / "average_global_flow.h5")],
                         Path(tmp) / "shards", 500, progress=False)
            shards = str(Path(tmp) / "shards")
        print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores; global batch {a.batch}, "
              f"{a.steps} steps, planted DiDeMo (21 x 2048 candidates, 384-d text)")
        bare = bare_loop(shards, a.batch, a.steps)
        full = trainer(shards, a.batch, a.steps, 1, Path(tmp) / "r1")
        two = trainer(shards, a.batch, a.steps, 2, Path(tmp) / "r2")
        print(f"{'path':56s} {'samples/s':>10s} {'ratio':>7s}")
        print(f"{'bare model + losses + step, preloaded batches':56s} {bare:10.0f} {1.0:7.2f}")
        print(f"{'full trainer, 1 process (shards, loader, logging)':56s} {full:10.0f} {full / bare:7.2f}")
        print(f"{'full trainer, 2 processes x batch/2 (gloo, 1 thread each)':56s} {two:10.0f} {two / full:7.2f} (vs 1 process)")


if __name__ == "__main__":
    main()
