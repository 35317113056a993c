"""accelerate-driven WSRA training: shards -> batches -> model -> gather -> losses -> step.

    accelerate launch [--config_file accelerate_config.yaml] -m wsra_dist.train RECIPE.yaml [key=value ...]

Each process reads its own shards; text features and pooled video features are gathered across
processes with gradient, so the losses see the global batch, and the local loss share is scaled by
the world size so that averaged gradients equal those of one process holding the whole batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from .config import Recipe, dump_recipe, flatten, load_recipe, to_dict
from .data.loader import EpochLoader, ShardSource
from .distributed import Gatherer
from .evaluation.predict import INFO_FILE, MODEL_FILE, model_from_info, predict
from .objective import wsra_objective

CKPT_DIR = "checkpoints"


class TrainState:
    """Position in training, saved with accelerate's state so a resume continues mid-epoch."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples = 0
        self.history: list[dict] = []  # one row per finished epoch (validation metrics, times)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "samples": self.samples,
                "history": json.dumps(self.history)}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch = int(d["step"]), int(d["epoch"])
        self.batch_in_epoch, self.samples = int(d["batch_in_epoch"]), int(d["samples"])
        self.history = json.loads(d.get("history", "[]"))


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    has_gpu = torch.cuda.is_available()
    if recipe.train.device == "cuda" and not has_gpu:
        raise RuntimeError("the recipe asks for train.device=cuda but no GPU is visible (torch.cuda.is_available() is False)")
    use_cpu = recipe.train.device == "cpu" or not has_gpu
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.process_group_timeout_s),
                                backend="gloo" if (use_cpu and deepspeed) else None)
    kwargs = dict(log_with="tensorboard",
                  project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=recipe.output_dir),
                  kwargs_handlers=[pg])
    # DeepSpeed on CPU needs the gloo group (not cpu=True), otherwise every rank thinks it is alone.
    return Accelerator(cpu=use_cpu and not deepspeed, **kwargs)


def build_optimizer(recipe: Recipe, params):
    o = recipe.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def model_info(recipe: Recipe, manifest: dict) -> dict:
    return {"dims": {"video": manifest["dims"]["video"], "text": manifest["dims"]["text"]},
            "benchmark": manifest.get("benchmark"), "text": manifest.get("text", {}), "reader": manifest.get("reader", {}),
            "model": to_dict(recipe)["model"], "recipe_name": recipe.name}


def _atomic_dir(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_weights(accelerator, model, out_dir: Path, info: dict, recipe: Recipe) -> None:
    """model.safetensors + wsra_model.json + recipe.yaml into out_dir (main process, files replaced atomically)."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)  # gathers ZeRO shards on every rank
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        tmp = out_dir / f".{MODEL_FILE}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / MODEL_FILE)
        for name, text in ((INFO_FILE, json.dumps(info, indent=1)), ("recipe.yaml", dump_recipe(recipe))):
            t = out_dir / f".{name}.tmp"
            t.write_text(text)
            os.replace(t, out_dir / name)


def checkpoint(accelerator, model, recipe: Recipe, state: TrainState, info: dict) -> None:
    root = Path(recipe.output_dir) / CKPT_DIR
    final = root / f"step-{state.step:08d}"
    tmp = root / f".step-{state.step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    save_weights(accelerator, model, tmp, info, recipe)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint folder without the .tmp name is always complete
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - recipe.train.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_resume(recipe: Recipe) -> Path | None:
    if not recipe.resume:
        return None
    if recipe.resume != "latest":
        p = Path(recipe.resume)
        if not p.is_dir():
            raise FileNotFoundError(f"resume={recipe.resume}: no such checkpoint folder")
        return p
    done = sorted((Path(recipe.output_dir) / CKPT_DIR).glob("step-*"))
    return done[-1] if done else None


def evaluate_split(accelerator, model, source: ShardSource, recipe: Recipe) -> dict:
    """Distributed evaluation through the evaluator: predictions per process, gathered, scored on all."""
    from accelerate.utils import gather_object

    from .evaluation.scoring import score_charades, score_didemo

    protocol = source.manifest["benchmark"]
    net = accelerator.unwrap_model(model)
    preds, truth = predict(net, source, protocol, recipe.eval.batch_size, accelerator.num_processes,
                           accelerator.process_index, accelerator.device, recipe.data.verify_checksums)
    if accelerator.num_processes > 1:
        preds, truth = gather_object(preds), gather_object(truth)
    if protocol == "didemo":
        return score_didemo(preds, truth)
    return score_charades(preds, truth, strict=recipe.eval.strict_iou, nms=recipe.eval.nms if recipe.eval.nms >= 0 else None)


def check_batch_size(recipe: Recipe, world: int) -> None:
    lc = recipe.loss
    if not (lc.w_snippet or lc.w_batch or (lc.w_cross and lc.cross_negatives == "hard")):
        return
    k_top = max(lc.k_top - 1, 0) if lc.self_in_top_k else lc.k_top
    need = k_top + lc.k_last + 2  # + the query itself + at least one hard negative
    if world * recipe.train.batch_size < need:
        raise ValueError(f"global batch {world} x {recipe.train.batch_size} = {world * recipe.train.batch_size} is too small "
                         f"for K_top={lc.k_top} + K_last={lc.k_last}: needs at least {need} queries")


def train(recipe: Recipe) -> Path:
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    accelerator = make_accelerator(recipe)
    set_seed(recipe.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True)
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batch_size(recipe, world)
    train_src = ShardSource.open(recipe.data.train_shards, recipe.data.train_manifest)
    info = model_info(recipe, train_src.manifest)
    val_src = ShardSource.open(recipe.data.val_shards, recipe.data.val_manifest) if recipe.data.val_shards else None
    test_src = ShardSource.open(recipe.data.test_shards, recipe.data.test_manifest) if recipe.data.test_shards else None
    for name, src in (("val", val_src), ("test", test_src)):
        if src is not None:
            from .evaluation.predict import check_compatible

            check_compatible(info, src.manifest, f"data.{name}_shards")
    loader = EpochLoader(train_src, recipe.train.batch_size, world, rank, recipe.seed, recipe.data.shuffle,
                         recipe.data.shuffle_buffer, recipe.data.num_workers, recipe.data.verify_checksums)

    model = model_from_info(info)
    optimizer = build_optimizer(recipe, model.parameters())
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # the WebDataset loader is not prepared, so DeepSpeed learns the batch here
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
        ds_plugin.deepspeed_config.setdefault("zero_allow_untested_optimizer", True)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    resume = find_resume(recipe)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")

    hparams = {k: v for k, v in flatten(to_dict(recipe)).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("tensorboard", config=hparams)
    out_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    kill_at = int(os.environ.get("WSRA_TEST_SIGKILL_AT_STEP", "0"))  # test hook: die like a killed node
    debug_dir = os.environ.get("WSRA_DEBUG_DIR")  # test hook: record the sampler's choices per step
    accelerator.print(f"training on {world} process(es), device {accelerator.device}, global batch "
                      f"{world} x {recipe.train.batch_size}, {train_src.num_samples} training queries")

    per_epoch = loader.batches_per_epoch(0)
    total = per_epoch * recipe.train.epochs
    if recipe.train.max_steps:
        total = min(total, recipe.train.max_steps)
    history = state.history
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"),
                        disable=not (accelerator.is_main_process and recipe.train.progress))
    t_start, samples_at_log, t_log = time.time(), state.samples, time.time()
    samples_start = state.samples
    done = False
    with progress:
        task = progress.add_task("", total=total, completed=state.step, info="")
        model.train()
        while state.epoch < recipe.train.epochs and not done:
            for batch in loader.epoch(state.epoch, skip=state.batch_in_epoch):
                batch = batch.to(accelerator.device)
                g = Gatherer(batch.video.shape[0], accelerator.device)
                out = wsra_objective(model, batch, recipe.loss, g)
                accelerator.backward(out.loss * g.loss_scale)
                if debug_dir and accelerator.is_main_process and out.negatives is not None:
                    _dump_negatives(Path(debug_dir), state.step + 1, out, batch)
                log_now = (state.step + 1) % recipe.train.log_every == 0 or state.step == 0
                grad_norm = None
                if recipe.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                elif log_now:
                    grad_norm = _grad_norm(model)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                state.samples += g.n_global
                if log_now:
                    now = time.time()
                    # Shares summed over processes = the value one process with the whole batch computes.
                    names = list(out.terms)
                    vals = torch.stack([out.terms[k].detach() for k in names] + [out.loss.detach()]).float()
                    vals = accelerator.reduce(vals, reduction="sum") if world > 1 else vals
                    logs = {f"loss/{k}": float(v) for k, v in zip(names, vals[:-1])}
                    logs["loss/total"] = float(vals[-1])
                    logs["lr"] = optimizer.param_groups[0]["lr"]
                    if grad_norm is not None:
                        logs["grad_norm"] = float(grad_norm)
                    logs["samples_per_s"] = (state.samples - samples_at_log) / max(now - t_log, 1e-9)
                    samples_at_log, t_log = state.samples, now
                    accelerator.log(logs, step=state.step)
                    progress.update(task, info=f"epoch {state.epoch} loss {logs['loss/total']:.4f}")
                progress.update(task, completed=state.step)
                if recipe.train.checkpoint_every and state.step % recipe.train.checkpoint_every == 0:
                    checkpoint(accelerator, model, recipe, state, info)
                if kill_at and state.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if recipe.train.max_steps and state.step >= recipe.train.max_steps:
                    done = True
                    break
            if not done:
                state.epoch += 1
                state.batch_in_epoch = 0
                metrics = {}
                if val_src is not None:
                    metrics = evaluate_split(accelerator, model, val_src, recipe)
                    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
                history.append({"epoch": state.epoch, "step": state.step, "time_s": round(time.time() - t_start, 2),
                                **{f"val/{k}": v for k, v in metrics.items()}})
                if metrics:
                    accelerator.print(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
                checkpoint(accelerator, model, recipe, state, info)
    t_loop = time.time() - t_start
    final = {}
    if test_src is not None:
        final = evaluate_split(accelerator, model, test_src, recipe)
        accelerator.log({f"test/{k}": v for k, v in final.items()}, step=state.step)
    save_weights(accelerator, model, out_dir, info, recipe)
    if accelerator.is_main_process:
        (out_dir / "history.json").write_text(json.dumps({
            "epochs": history, "test": final, "steps": state.step, "time_s": round(time.time() - t_start, 2),
            "train_samples": state.samples - samples_start, "train_loop_s": round(t_loop, 3), "processes": world,
        }, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


def _dump_negatives(d: Path, step: int, out, batch) -> None:
    d.mkdir(parents=True, exist_ok=True)
    n = out.negatives
    (d / f"negatives-{step:06d}.json").write_text(json.dumps({
        "hard": n.hard.int().tolist(), "pseudo": n.pseudo.int().tolist(), "easy": n.easy.int().tolist(),
        "pseudo_positive": n.pseudo_positive.tolist()}))


def _grad_norm(model) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return math.sqrt(float(sum(sq))) if sq else 0.0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("RECIPE is a YAML file in recipes/; overrides are dotted key=value pairs, e.g.\n"
              "  train.max_steps=1 train.batch_size=8 optim.name=sgd data.shuffle=false seed=0 output_dir=runs/x\n\n"
              "Recipe keys and their defaults (docs/method.md explains the loss options):")
        for k, v in flatten(to_dict(Recipe())).items():
            print(f"  {k} = {v!r}")
        sys.exit(0 if argv else 2)
    recipe = load_recipe(argv[0], argv[1:])
    train(recipe)


if __name__ == "__main__":
    main()
