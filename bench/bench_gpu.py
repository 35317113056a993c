"""GPU training throughput of wsra-dist, one JSON line per measurement (a contract: checks outside this repo run it).

    python bench/bench_gpu.py [--shards TRAIN --test TEST] [--epochs 10] [--batches 42,336,1024,2048]
                              [--cpu-steps 30] [--cpu-full] [--budget-s 340] [--out FILE.jsonl]

One process, on the first CUDA device (or the CPU with --device cpu, for a smoke run at small --batches).
In this order, each line `{"bench": ..., ...}` on stdout (and appended to --out):

1. `gemm`: fp32 (TF32 off) and bf16 matmul rates, 8192^3 on a GPU (1024^3 on a CPU): the machine's ceiling.
2. `kernel`: the fused Triton pair MLP against the eager definition at real shapes (max |Δ| of the values and of
   the four gradients, float32), the first check of the kernels outside the CPU interpreter.
3. `step`: one training step (model + every loss term of `recipes/didemo_best.yaml` + backward + Adam; hidden
   1024, 21 candidates, DiDeMo flow chunks (6, 1024), text 384) on one preloaded batch, per global batch and per
   variant: `eager` (the chunked autograd kernel: the CPU path), `eager_query_chunk` (one chunk of all queries),
   `compile` (torch.compile of the pair MLP), `triton` (the fused kernels), `triton_bf16` (+ bf16 autocast),
   `triton_graph` (+ the whole step replayed from a CUDA graph, wsra_dist/step.py).  ms per step (median of
   timed steps after warm-up), peak GPU memory.  A variant that does not fit the budget or memory says so.
4. `trainer`: the real trainer (`wsra_dist.train`, in this process) on --shards at global batch 42:
   `baseline` (streaming loader, eager kernel, no graph: the path before this benchmark) for a few hundred steps,
   then `default` (what a recipe gets on a GPU: device cache, Triton, CUDA graph) for --epochs with --test
   evaluated: steady-state queries/s (TensorBoard's samples_per_s after the first log), train_s, test metrics.
5. `equality`: the same short run (--cpu-steps, fp32, same seed, no shuffle noise) on the CPU and on the GPU
   (eager, and default): max |Δ| of the weights; with --cpu-full also the full CPU run's test metrics.
Without --shards a planted DiDeMo set is written to a temp folder (timings only; learning needs real shards).
The script stops starting new measurements after --budget-s and prints `{"bench": "skipped", ...}` for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RECIPE = ROOT / "recipes" / "didemo_best.yaml"
T0 = time.time()
ARGS = None


def emit(**row) -> None:
    row = {"bench": row.pop("bench"), **row, "t_s": round(time.time() - T0, 1)}
    line = json.dumps(row)
    print(line, flush=True)
    if ARGS is not None and ARGS.out:
        with open(ARGS.out, "a") as f:
            f.write(line + "\n")


def over_budget(what: str) -> bool:
    if time.time() - T0 > ARGS.budget_s:
        emit(bench="skipped", what=what, why=f"past --budget-s {ARGS.budget_s}")
        return True
    return False


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of fn() over reps calls (synchronised)."""
    ts = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------------------------------------ 1. GEMM
def gemm(device) -> None:
    import torch

    n = 8192 if device.type == "cuda" else 1024
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        s = timed(lambda a=a, b=b: a @ b, device, 5 if device.type == "cuda" else 3)
        emit(bench="gemm", dtype=str(dtype).split(".")[-1], n=n, tflops=round(2 * n**3 / s / 1e12, 2))
        del a, b


# ------------------------------------------------------------------------------------------------ 2. kernel
def kernel_check(device) -> None:
    import torch

    from wsra_dist.kernels import pair_mlp_logits, pair_mlp_reference, triton_pair_mlp_available

    if not triton_pair_mlp_available(device):
        emit(bench="kernel", skipped="triton kernels unavailable on this device")
        return
    shapes = ((42, 42, 1024), (336, 336, 1024), (7, 5, 1000)) if device.type == "cuda" else ((3, 5, 40),)
    for B, N, H in shapes:  # (the CPU: Triton's interpreter, a smoke test of this script)
        g = torch.Generator(device=device).manual_seed(0)
        xs = [torch.randn(s, device=device, generator=g) for s in ((B, 21, H), (N, H), (H,), ())]
        gout = torch.randn(B, 21, N, device=device, generator=g)
        outs, grads = [], []
        for f in (pair_mlp_reference, pair_mlp_logits):
            ins = [x.clone().requires_grad_() for x in xs]
            if f is pair_mlp_reference:  # float64 definition
                ins = [x.double().detach().requires_grad_() for x in xs]
            o = f(*ins)
            o.backward(gout.to(o.dtype))
            outs.append(o.double())
            grads.append([i.grad.double() for i in ins])
        rel = lambda a, b: float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))  # noqa: E731
        emit(bench="kernel", shape=[B, 21, N, H], max_rel_err_logits=rel(outs[1], outs[0]),
             max_rel_err_grads={k: rel(a, b) for k, a, b in zip(("pv", "pt", "w", "c"), grads[1], grads[0])})


# ------------------------------------------------------------------------------------------------ 3. steps
class _Acc:
    """The two accelerator calls the step makes, for a bare step without accelerate."""

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, c):
        import torch

        return torch.nn.utils.clip_grad_norm_(params, c)


def _batch(B: int, device):
    import torch

    from wsra_dist.data.batch import Batch

    g = torch.Generator(device="cpu").manual_seed(B)
    video = torch.randn(B, 6, 1024, generator=g).abs()
    text = torch.randn(B, 384, generator=g)
    vid = torch.arange(B) // 4  # 4 queries per video, as DiDeMo's ~4.1
    target = torch.zeros(B, 21)
    target[:, 0] = 1
    b = Batch(video, torch.ones(B, 21, dtype=torch.bool), text, vid, target)
    return b.to(device)


def _step_model(variant: str, B: int, device):
    import torch

    from wsra_dist.config import load_recipe
    from wsra_dist.evaluation.predict import model_from_info
    from wsra_dist.step import EagerStep, GraphedStep
    from wsra_dist.train import build_optimizer

    over = {"eager": ["model.pair_kernel=eager"], "eager_query_chunk": ["model.pair_kernel=eager", f"model.query_chunk={B}"],
            "compile": ["model.pair_kernel=eager", "model.compile=true"], "triton": ["model.pair_kernel=triton"],
            "triton_bf16": ["model.pair_kernel=triton"], "triton_graph": ["model.pair_kernel=triton"]}[variant]
    r = load_recipe(str(RECIPE), over)
    info = {"dims": {"video": 2048, "text": 384}, "layout": {"kind": "didemo_chunks", "modalities": [1024], "tef": False},
            "model": {**r.model.__dict__}}
    torch.manual_seed(0)
    model = model_from_info(info).to(device).train()
    graph = variant == "triton_graph"
    opt = build_optimizer(r, model.parameters(), capturable=graph and device.type == "cuda")
    if graph:  # (on a CPU only under WSRA_TEST_EMULATE_GRAPH=1: a smoke test of this script)
        step = GraphedStep(model, opt, _Acc(), 0.0, r.loss, emulate=device.type != "cuda")
    else:
        step = EagerStep(model, opt, _Acc(), 0.0)
    return r, step


def step_table(device, batches: list[int]) -> None:
    import torch

    from wsra_dist.distributed import Gatherer
    from wsra_dist.kernels import triton_pair_mlp_available

    variants = ["eager", "eager_query_chunk", "compile", "triton", "triton_bf16", "triton_graph"]
    for B in batches:
        batch = _batch(B, device)
        for v in variants:
            if over_budget(f"step B={B} {v}"):
                return
            if v.startswith("triton") and not triton_pair_mlp_available(device):
                emit(bench="step", batch=B, variant=v, skipped="no GPU")
                continue
            if v == "triton_bf16" and device.type != "cuda":
                emit(bench="step", batch=B, variant=v, skipped="bf16 autocast is measured on a GPU")
                continue
            if v == "eager_query_chunk" and B * B * 21 * 1024 * 4 * 3 > 60 * 2**30:
                emit(bench="step", batch=B, variant=v, skipped="(B, 21, B, 1024) activations exceed 60 GiB")
                continue
            try:
                r, step = _step_model(v, B, device)
                amp = torch.autocast("cuda", dtype=torch.bfloat16) if v == "triton_bf16" else _null()

                def once():
                    with amp:
                        step(batch, r.loss, Gatherer(B, device))

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t_first = time.perf_counter()
                once()
                sync(device)
                first = time.perf_counter() - t_first
                for _ in range(4):  # warm-up (graph capture happens at the 4th call)
                    once()
                est = timed(once, device, 2)
                reps = max(3, min(30, int(3.0 / max(est, 1e-4))))
                s = timed(once, device, reps)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                emit(bench="step", batch=B, variant=v, ms=round(s * 1e3, 3), reps=reps, first_call_s=round(first, 2),
                     peak_gib=None if peak is None else round(peak, 3),
                     graph_replays=getattr(step, "replays", None))
            except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
                emit(bench="step", batch=B, variant=v, error=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------ 4-5. trainer
def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _train(shards: str, test: str, out: Path, *over: str) -> dict:
    from bench_train import tensorboard_rate

    from wsra_dist.config import load_recipe
    from wsra_dist.train import train

    _reset_accelerate()
    r = load_recipe(str(RECIPE), [f"data.train_shards={shards}", "data.val_shards=", f"data.test_shards={test}",
                                  f"output_dir={out}", "train.progress=false", "seed=0", *over])
    train(r)
    h = json.loads((out / "history.json").read_text())
    return {"queries_per_s_steady": round(tensorboard_rate(out), 1),
            "queries_per_s_loop": round(h["train_samples"] / max(h["train_s"], 1e-9), 1),
            "train_s": h["train_s"], "steps": h["steps"], "graph_replays": h.get("graph_replays"), "test": h["test"]}


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def trainer_runs(device, shards: str, test: str, tmp: Path) -> None:
    dev = [f"train.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
    if not over_budget("trainer baseline"):
        row = _train(shards, "", tmp / "baseline", *dev, "train.max_steps=240", "data.device_cache=false",
                     "model.pair_kernel=eager", "train.cuda_graph=false")
        emit(bench="trainer", variant="baseline (streaming, eager kernel, no graph)", batch=42, **row)
    if not over_budget("trainer default"):
        row = _train(shards, test, tmp / "default", *dev, f"train.epochs={ARGS.epochs}")
        emit(bench="trainer", variant="default (device cache, Triton, CUDA graph where available)", batch=42,
             epochs=ARGS.epochs, **row)


def equality(device, shards: str, test: str, tmp: Path) -> None:
    if over_budget("equality"):
        return
    n = ARGS.cpu_steps
    common = [f"train.max_steps={n}", "data.shuffle=false", "optim.lr=1e-4"]
    cpu = tmp / "eq-cpu"
    _train(shards, "", cpu, "train.device=cpu", *common)
    w_cpu = _weights(cpu)
    if device.type != "cuda":
        emit(bench="equality", skipped="no GPU: only the CPU run")
    else:
        for name, over in (("gpu eager", ["model.pair_kernel=eager", "train.cuda_graph=false", "data.device_cache=false"]),
                           ("gpu default", [])):
            run = tmp / f"eq-{name.replace(' ', '-')}"
            _train(shards, "", run, "train.device=cuda", *common, *over)
            w = _weights(run)
            diff = max(float((w[k].float() - w_cpu[k].float()).abs().max()) for k in w_cpu)
            emit(bench="equality", run=name, steps=n, max_abs_weight_diff_vs_cpu=diff)
    if ARGS.cpu_full and test and not over_budget("cpu full run"):
        row = _train(shards, test, tmp / "cpu-full", "train.device=cpu", f"train.epochs={ARGS.epochs}")
        emit(bench="trainer", variant="cpu (reference)", batch=42, epochs=ARGS.epochs, **row)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="", help="DiDeMo training shards (default: a planted set in a temp folder)")
    ap.add_argument("--test", default="", help="DiDeMo test shards for the trainer's test metrics")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the default trainer run (default 10)")
    ap.add_argument("--batches", default="42,336,1024,2048", help="global batches of the step table")
    ap.add_argument("--cpu-steps", type=int, default=30, help="steps of the CPU/GPU equality run")
    ap.add_argument("--cpu-full", action="store_true", help="also the full CPU run (its test metrics beside the GPU's)")
    ap.add_argument("--budget-s", type=float, default=340.0, help="start no new measurement after this many seconds")
    ap.add_argument("--device", default="", help="cuda (default when there is one) or cpu")
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    ap.add_argument("--only", default="gemm,kernel,step,trainer,equality", help="comma-separated parts to run")
    ARGS = ap.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import describe

    device = torch.device(ARGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = set(ARGS.only.split(","))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    emit(bench="machine", host=describe(), gpu=gpu, torch=torch.__version__,
         cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, test = ARGS.shards, ARGS.test
        if not shards and parts & {"trainer", "equality"}:
            from wsra_dist.data.pack import shard_didemo
            from wsra_dist.data.synthetic import synth

            synth("didemo", tmp / "data", 800, 0)
            shard_didemo(tmp / "data" / "train_data.json", [str(tmp / "data" / "average_global_flow.h5")],
                         tmp / "shards", 200, progress=False, cache_dir=str(tmp / "cache"))
            shards = str(tmp / "shards")
            emit(bench="data", shards="planted DiDeMo (800 videos; timings only)")
        if "gemm" in parts:
            gemm(device)
        if "kernel" in parts:
            kernel_check(device)
        if "step" in parts:
            step_table(device, [int(b) for b in ARGS.batches.split(",") if b])
        if "trainer" in parts:
            trainer_runs(device, shards, test, tmp)
        if "equality" in parts:
            equality(device, shards, test, tmp)
    emit(bench="done", total_s=round(time.time() - T0, 1))


if __name__ == "__main__":
    main()
