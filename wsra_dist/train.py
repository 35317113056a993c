"""accelerate-driven WSRA training: shards -> batches -> model -> gather -> losses -> step.

    accelerate launch [--config_file accelerate_config.yaml] -m wsra_dist.train RECIPE.yaml [key=value ...]

Each process reads its own shards; text features and pooled video features are gathered across
processes with gradient, so the losses see the global batch, and the local loss share is scaled by
the world size so that averaged gradients equal those of one process holding the whole batch.

Batches the top/last-K sampler cannot use never stop a run:

* the short last batch of an epoch is folded into the batch before it when the global batch it leaves
  has fewer than K_top + K_last + 2 queries (decided from the manifest counts, the same way on every
  process; `data.loader` explains the rule);
* a global batch with enough queries but too few *other-video* queries for some query (a few videos
  with many queries each) trains without the sampler-based terms (L_snippet, L_batch, the cross term
  with hard negatives) for that step; the decision is a function of the gathered video ids, so every
  process takes it together.  With no other term weighted, the batch is skipped (no optimizer step).

With `self_training.rounds: R` (recipes/activitynet_best.yaml) one command trains a teacher, writes its top-1
moments as the training queries' times and trains a student on them, R times; the last student is the run in
output_dir, the phases before it are under output_dir/self_training/ (wsra_dist/self_training.py).

Checkpoints never unpickle code: the position in training is `train_state.json`, the weights are
safetensors, and the optimizer and RNG states accelerate writes are read with
`torch.load(weights_only=True)` (numpy's RNG arrays allowlisted) by `load_checkpoint`, never by
`accelerator.load_state`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, Recipe, SelfTrainingConfig, dump_recipe, flatten, load_recipe, to_dict
from .data.loader import EpochLoader, ShardSource
from .data.records import DataError
from .distributed import Gatherer
from . import checkpoints as ckpts
from . import peers
from .lifetime import die_with_parent, launched_worker
from .evaluation.predict import model_from_info, predict
from .model import RUN_CONFIG_FILE as INFO_FILE, SHAPE_KEYS, WEIGHTS_FILE as MODEL_FILE
from .run_folder import PHASES_DIR, RunLock, check_reuse, clear_previous_run, previous_run, set_aside_failed_start
from .stop_signals import STALL_S, StopDuringRead, Stopped, StopSignals

CKPT_DIR = "checkpoints"
STATE_FILE = "train_state.json"  # TrainState, written by rank 0 into every checkpoint folder (JSON: no pickle)
STATE_FORMAT = "wsra-dist-train-state/1"


class TrainState:
    """Position in training, saved as JSON in each checkpoint so a resume continues mid-epoch."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.samples = 0
        self.history: list[dict] = []  # one row per finished epoch (validation metrics, times)
        self.world = 1  # processes and per-process batch of the run that wrote the state
        self.batch_size = 0

    def to_json(self) -> dict:
        return {"format": STATE_FORMAT, "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples, "world": self.world, "batch_size": self.batch_size, "history": self.history}

    def load_json(self, d: object, where: str) -> None:
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise ConfigError(f"{where}: not a training state written by this tool (format {STATE_FORMAT})")
        for k in ("step", "epoch", "batch_in_epoch", "samples", "world", "batch_size"):
            v = d.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{where}: {k!r} must be an integer >= 0, got {v!r}")
        if not isinstance(d.get("history", []), list) or not all(isinstance(r, dict) for r in d.get("history", [])):
            raise ConfigError(f"{where}: 'history' must be a list of objects")
        self.step, self.epoch, self.batch_in_epoch, self.samples = d["step"], d["epoch"], d["batch_in_epoch"], d["samples"]
        self.world, self.batch_size, self.history = d["world"], d["batch_size"], list(d.get("history", []))


def make_accelerator(recipe: Recipe):
    has_gpu = torch.cuda.is_available()
    if recipe.train.device == "cuda" and not has_gpu:
        raise ConfigError("train.device=cuda: no GPU is visible on this machine (torch.cuda.is_available() is False); "
                          "set train.device=auto or cpu")  # a setting, not an internal error
    use_cpu = recipe.train.device == "cpu" or not has_gpu
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_cpu:  # said, not guessed: DeepSpeed's guess warns "unable to detect" a GPU on every rank.  Plain runs
        # import DeepSpeed too (accelerate's unwrap_model, at every checkpoint) when it is installed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.process_group_timeout_s),
                                backend="gloo" if (use_cpu and deepspeed) else None)
    kwargs = dict(log_with="tensorboard",
                  project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=recipe.output_dir),
                  kwargs_handlers=[pg])
    # Under torchrun / accelerate launch with the c10d rendezvous, the group is created here, in a store
    # namespace of this launcher round: the agent's store keeps the previous round's gloo/NCCL addresses and a
    # restarted worker would connect to a dead one (peers.init_process_group). Elsewhere accelerate creates it.
    peers.init_process_group("gloo" if use_cpu else "nccl", recipe.train.process_group_timeout_s)
    # DeepSpeed on CPU needs the gloo group (not cpu=True), otherwise every rank thinks it is alone.
    return Accelerator(cpu=use_cpu and not deepspeed, **kwargs)


def build_optimizer(recipe: Recipe, params, capturable: bool = False):
    """`capturable`: Adam/AdamW keep their step counter on the device, so a CUDA graph can hold their step."""
    o = recipe.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                capturable=capturable)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                 capturable=capturable)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def model_info(recipe: Recipe, manifest: dict) -> dict:
    from .evaluation.predict import layout_of

    return {"dims": {"video": manifest["dims"]["video"], "text": manifest["dims"]["text"]},
            "layout": layout_of(manifest),
            "benchmark": manifest.get("benchmark"), "text": manifest.get("text", {}), "reader": manifest.get("reader", {}),
            "model": to_dict(recipe)["model"], "recipe_name": recipe.name,
            "extractor": manifest.get("extractor")}  # `wsra-dist features` provenance: ground --video re-extracts with it


def _atomic_dir(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_weights(accelerator, model, out_dir: Path, info: dict, recipe: Recipe) -> None:
    """model.safetensors (format version in its metadata) + wsra_model.json + recipe.yaml into out_dir (main
    process, files replaced atomically): `WSRA.from_pretrained(out_dir)` loads it."""
    from .model import save_safetensors

    state = accelerator.get_state_dict(model)  # gathers ZeRO shards on every rank
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_dir / MODEL_FILE)
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
    accelerator.save_state(str(tmp), safe_serialization=True)  # nothing registered: no custom pickles
    save_weights(accelerator, model, tmp, info, recipe)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json(), indent=1))
    accelerator.wait_for_everyone()
    # Every rank reports the bytes it wrote; rank 0 checks it sees them and writes the manifest last.
    from accelerate.utils import gather_object

    mine = ckpts.describe_files(tmp, accelerator.process_index)
    per_rank = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    if accelerator.is_main_process:
        ckpts.write_manifest(tmp, accelerator.num_processes, state.step, per_rank)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint folder without the .tmp name is always complete
        for old in _rotated(root, state.step, recipe.train.keep_checkpoints):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _rotated(root: Path, step: int, keep: int) -> list[Path]:
    """Checkpoints to delete after writing `step`: the oldest of those at or before it beyond `keep`, ordered by
    their step numbers; a checkpoint past `step` (another timeline of this folder) is never touched here."""
    done = []
    for p in root.glob("step-*"):
        tail = p.name[len("step-"):]
        if p.is_dir() and tail.isdigit() and int(tail) <= step:
            done.append((int(tail), p))
    done.sort()
    return [p for _, p in done[: max(0, len(done) - keep)]]


def find_resume(recipe: Recipe, warn=None) -> Path | None:
    """The checkpoint `resume=` names: latest / auto take the newest *complete* one (checkpoints.py)."""
    if not recipe.resume:
        return None
    if recipe.resume not in ("latest", "auto"):
        p = Path(recipe.resume)
        if not p.is_dir():
            raise ConfigError(f"resume={recipe.resume}: no such checkpoint folder")
        bad = ckpts.problems(p)
        if bad:
            raise ConfigError(f"resume={recipe.resume}: not a complete checkpoint ({'; '.join(bad[:4])})")
        return p
    root = Path(recipe.output_dir) / CKPT_DIR
    found = ckpts.latest_complete(root, warn)
    if found is None and recipe.resume == "latest" and any(root.glob("step-*")):
        raise ConfigError(f"resume=latest: no complete checkpoint in {root} (see the warnings; resume=auto would "
                          "start from scratch)")
    return found


# ----------------------------------------------------------------------------------- safe resume
# Everything read from a checkpoint folder is data: JSON, YAML (safe_load), safetensors, or a torch
# file loaded with weights_only=True (tensors, numbers, strings and containers; plus the globals below).
def _numpy_rng_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        out.append(np.dtypes.UInt32DType)
    return out


def _deepspeed_globals() -> list:
    """Plain-data classes DeepSpeed pickles into its ZeRO optimizer files (no code runs on load)."""
    out = []
    for mod, names in (("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                       ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                       ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler"))):
        try:
            m = __import__(mod, fromlist=list(names))
        except Exception:  # noqa: BLE001 - an optional dependency
            continue
        out += [getattr(m, n) for n in names if hasattr(m, n)]
    return out


def safe_torch_load(path: Path, where: str, map_location="cpu", extra_globals: list | None = None):
    """torch.load(weights_only=True): a pickle that would build any other object is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: {path.name} is missing from the checkpoint folder {path.parent}")
    try:
        with torch.serialization.safe_globals(list(extra_globals or [])):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        text = str(e).strip()
        if "WeightsUnpickler error:" in text:  # keep the reason, not torch's advice to allowlist it
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        detail = (text.splitlines() or [type(e).__name__])[0].split(". Please use", 1)[0]
        raise ConfigError(f"{where}: {path} cannot be loaded safely (only tensors and plain data are accepted, "
                          f"nothing that could run code): {detail}") from None


def _read_json(path: Path, where: str) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: {path} is not readable JSON: {e}") from None


def _checkpoint_info(path: Path, where: str) -> dict:
    """The checkpoint's model description: wsra_model.json, else the model section of its recipe.yaml."""
    import yaml

    if (path / INFO_FILE).is_file():
        info = _read_json(path / INFO_FILE, where)
        if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
            raise ConfigError(f"{where}: {path / INFO_FILE} has no 'model' section")
        return info
    if (path / "recipe.yaml").is_file():
        try:
            r = yaml.safe_load((path / "recipe.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{where}: {path / 'recipe.yaml'} is not readable YAML: {e}") from None
        if isinstance(r, dict) and isinstance(r.get("model"), dict):
            return {"model": r["model"]}
    return {"model": {}}


def check_resume_compatible(path: Path, info: dict, model: torch.nn.Module, where: str) -> None:
    """Raise ConfigError naming the recipe keys whose values differ from the checkpoint's model."""
    from safetensors import safe_open

    ck = _checkpoint_info(path, where)
    diffs = []
    for k in SHAPE_KEYS:
        if k in ck["model"] and ck["model"][k] != info["model"][k]:
            diffs.append(f"model.{k} is {info['model'][k]!r} here, {ck['model'][k]!r} in the checkpoint")
    dims = ck.get("dims") if isinstance(ck.get("dims"), dict) else {}
    for k in ("video", "text"):
        old = dims.get(k)
        if old is not None and old != info["dims"][k]:
            diffs.append(f"the {k} feature dim of data.train_shards is {info['dims'][k]} here, {old} in the checkpoint")
    old_text = ck.get("text") if isinstance(ck.get("text"), dict) else {}
    new_text = info.get("text") or {}
    for k in ("model", "pooling"):
        if old_text.get(k) and new_text.get(k) and old_text[k] != new_text[k]:
            diffs.append(f"the text features of data.train_shards come from {k} {new_text[k]!r} here, "
                         f"{old_text[k]!r} in the checkpoint")
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise ConfigError(f"{where}: {MODEL_FILE} is missing from the checkpoint folder {path}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - not a safetensors file
        raise ConfigError(f"{where}: {weights} is not a readable safetensors file: {e}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved != want and not diffs:
        odd = sorted(set(saved) ^ set(want)) + sorted(k for k in set(saved) & set(want) if saved[k] != want[k])
        diffs.append("parameters differ: " + ", ".join(
            f"{k} {saved.get(k, 'absent')} in the checkpoint, {want.get(k, 'absent')} here" for k in odd[:4]))
    if diffs:
        raise ConfigError(f"{where}: the checkpoint holds another model shape: " + "; ".join(diffs)
                          + ". Resume with the checkpoint's values, or train into a new output_dir.")


def read_train_state(path: Path, where: str) -> TrainState:
    state = TrainState()
    f = path / STATE_FILE
    if not f.is_file():
        old = " (an older checkpoint: its custom_checkpoint_0.pkl is a pickle and is not loaded)" if any(
            path.glob("custom_checkpoint_*.pkl")) else ""
        raise ConfigError(f"{where}: {STATE_FILE} is missing from the checkpoint folder {path}{old}")
    state.load_json(_read_json(f, where), str(f))
    return state


def _restore_rng(accelerator, path: Path, where: str, required: bool) -> None:
    f = path / f"random_states_{accelerator.process_index}.pkl"
    if not f.is_file() and not required:
        accelerator.print(f"{where}: no {f.name} (the checkpoint was written by fewer processes): this process "
                          "keeps the seeded random state")
        return
    states = safe_torch_load(f, where, "cpu", _numpy_rng_globals())
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as e:  # noqa: BLE001 - wrong keys or types
        raise ConfigError(f"{where}: {f} is not a random-state file of this tool: {type(e).__name__}: {e}") from None
    if isinstance(states, dict) and isinstance(states.get("step"), int):
        accelerator.step = states["step"]


def load_checkpoint(accelerator, model, optimizer, path: Path, where: str, world_changed: bool) -> None:
    """Model, optimizer and RNG states of `path`, never unpickling code (replaces accelerator.load_state).

    Files read: model.safetensors (safetensors), optimizer.bin (weights_only), random_states_<rank>.pkl
    (weights_only + numpy's array globals); with DeepSpeed its engine reads pytorch_model/, through a
    weights_only loader.  Anything else in the folder (custom_checkpoint_*.pkl, ...) is never opened.
    """
    from safetensors.torch import load_file

    ds = getattr(accelerator.state, "deepspeed_plugin", None) is not None
    if ds:
        engine = model.checkpoint_engine
        extra = _deepspeed_globals()
        engine.load = lambda p, map_location=None: safe_torch_load(Path(p), where, map_location or "cpu", extra)
        try:
            loaded, _ = model.load_checkpoint(str(path), "pytorch_model")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{where}: DeepSpeed could not load {path / 'pytorch_model'}: {e}") from None
        finally:
            del engine.load  # back to the class's method
        if loaded is None:
            raise ConfigError(f"{where}: no DeepSpeed state (pytorch_model/) in {path}")
    else:
        weights = path / MODEL_FILE
        try:
            tensors = load_file(str(weights), device="cpu")
            accelerator.unwrap_model(model).load_state_dict(tensors)
        except Exception as e:  # noqa: BLE001 - checked by check_resume_compatible; a corrupt file lands here
            raise ConfigError(f"{where}: cannot load {weights}: {e}") from None
        opt = safe_torch_load(path / "optimizer.bin", where, "cpu")
        try:
            optimizer.load_state_dict(opt)
        except Exception as e:  # noqa: BLE001 - another optimizer's state (optim.name changed), or junk
            raise ConfigError(f"{where}: {path / 'optimizer.bin'} does not fit this optimizer (optim.name="
                              f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__.lower()}): {e}") from None
    _restore_rng(accelerator, path, where, required=not world_changed)


def evaluate_split(accelerator, model, source: ShardSource, recipe: Recipe) -> dict:
    """Distributed evaluation through the evaluator: predictions per process, gathered, scored on all."""
    from accelerate.utils import gather_object

    from .evaluation.scoring import score_charades, score_didemo

    protocol = source.manifest["benchmark"]
    net = accelerator.unwrap_model(model)
    preds, truth = predict(net, source, protocol, recipe.eval.batch_size, accelerator.num_processes,
                           accelerator.process_index, accelerator.device, recipe.data.verify_checksums)
    if accelerator.num_processes > 1:
        with peers.waiting("the evaluation gather"):
            preds, truth = gather_object(preds), gather_object(truth)
    if protocol == "didemo":
        return score_didemo(preds, truth)
    return score_charades(preds, truth, strict=recipe.eval.strict_iou, nms=recipe.eval.nms if recipe.eval.nms >= 0 else None,
                          protocol=protocol)  # charades or activitynet: their IoU thresholds


def uses_sampler(lc) -> bool:
    return bool(lc.w_snippet or lc.w_batch or (lc.w_cross and lc.cross_negatives == "hard"))


def min_global_batch(lc) -> int:
    """Queries one global batch needs for top/last-K sampling (1 when no term uses the sampler)."""
    if not uses_sampler(lc):
        return 1
    k_top = max(lc.k_top - 1, 0) if lc.self_in_top_k else lc.k_top
    return k_top + lc.k_last + 2  # + the query itself + at least one hard negative


def check_batch_size(recipe: Recipe, world: int) -> None:
    lc = recipe.loss
    need = min_global_batch(lc)
    if world * recipe.train.batch_size < need:
        raise ConfigError(f"global batch {world} x {recipe.train.batch_size} = {world * recipe.train.batch_size} is too small "
                          f"for K_top={lc.k_top} + K_last={lc.k_last}: needs at least {need} queries "
                          "(raise train.batch_size or lower loss.k_top/loss.k_last)")


def without_sampler(lc):
    """The loss config for a batch the sampler cannot serve: sampler-based terms off; None if nothing is left."""
    reduced = dataclasses.replace(lc, w_snippet=0.0, w_batch=0.0,
                                  w_cross=0.0 if lc.cross_negatives == "hard" else lc.w_cross)
    return reduced if (reduced.w_video or reduced.w_cross or reduced.w_supervised) else None


def sampler_shortfall(video_ids: torch.Tensor, lc) -> str:
    """'' when every query of the global batch keeps >= 1 hard negative, else why not (same on every process)."""
    n = video_ids.shape[0]
    same = video_ids[:, None] == video_ids[None, :]
    n_cand = n - same.sum(1)
    k_top = max(lc.k_top - 1, 0) if lc.self_in_top_k else lc.k_top
    worst = int(n_cand.min()) if n else 0
    if n and worst - k_top - lc.k_last >= 1:
        return ""
    return (f"{n} queries of {len(torch.unique(video_ids))} videos: a query has only {worst} queries of other "
            f"videos, K_top={lc.k_top} + K_last={lc.k_last} leave it no hard negative")


def train(recipe: Recipe) -> Path:
    """Train `recipe` in this process (one rank of `accelerate launch`); returns the run folder.

    Raises `stop_signals.Stopped` after a SIGTERM/SIGINT once the stop checkpoint is written."""
    recipe.validate()  # also for recipes built in Python, not only load_recipe()
    accelerator = make_accelerator(recipe)
    peers.start(recipe.train.process_group_timeout_s)  # names and ends a lost peer (wsra_dist/peers.py)
    lock = None
    try:
        lock = _own_output_dir(recipe, accelerator)
        with StopSignals() as stop:
            if recipe.self_training.rounds:  # teacher -> pseudo-labels -> student phases, each a _train
                from .self_training import run_rounds

                return run_rounds(recipe, accelerator, stop, _train)
            return _train(recipe, accelerator, stop)
    finally:
        if lock is not None:
            lock.release()
        peers.stop(forget=False)  # no thread left for the interpreter's shutdown; explain() still works


def _own_output_dir(recipe: Recipe, accelerator):
    """Rank 0 locks output_dir and checks it holds no earlier run (unless resumed or overwritten); every
    process learns the outcome (one broadcast), so none goes on alone.  Returns rank 0's lock."""
    lock, err = None, None
    if accelerator.is_main_process:
        lock = RunLock(recipe.output_dir, warn=accelerator.print)
        try:
            lock.acquire()
            check_reuse(recipe.output_dir, recipe.resume, recipe.overwrite)
        except ConfigError as e:
            lock.release()
            lock, err = None, e
    if accelerator.num_processes > 1:
        flag = torch.tensor([0 if err else 1], device=accelerator.device)
        torch.distributed.broadcast(flag, 0)
        if not int(flag) and err is None:
            raise ConfigError(f"output_dir {recipe.output_dir}: refused by rank 0 (its message says why)")
    if err is not None:
        raise err
    return lock


@dataclass
class _Run:
    """What the phases of one training run share (built by _open_data, _make_loader, _make_model)."""

    recipe: Recipe
    accelerator: object
    world: int
    rank: int
    need: int  # queries a global batch needs for top/last-K sampling
    train_src: ShardSource
    val_src: ShardSource | None
    test_src: ShardSource | None
    info: dict
    loader: object = None
    plans: dict = field(default_factory=dict)
    total: int = 0  # optimizer steps the run can reach
    model: object = None
    optimizer: object = None
    step_fn: object = None
    state: TrainState = field(default_factory=TrainState)
    out_dir: Path = Path(".")
    kill_at: int = 0  # test hooks (environment): die like a killed node, log the sampler and the samples
    term_at: int = 0
    debug_dir: str | None = None
    sample_log: object = None
    phase: str | None = None  # a phase of a self-training run (its name), None for a run of its own
    pipeline: object = None  # that run's SelfTrainingConfig (a phase's own recipe has self-training off)
    final: bool = True  # the process's last training: ends the trackers, the peer watch and the process group
    # time and throughput: evaluation and checkpoints are not training time
    t_start: float = 0.0
    t_log: float = 0.0
    t_paused: float = 0.0
    t_excluded: float = 0.0
    t_loop: float = 0.0
    samples_at_log: int = 0
    samples_start: int = 0
    ep_sums: dict = field(default_factory=dict)  # loss terms summed over the epoch's steps, on the device
    ep_steps: int = 0
    stop: object = None  # StopSignals: the signal that asked the run to stop (0: none)
    fetching: bool = False  # waiting for the next training batch between steps (a stop there can checkpoint)
    last_checkpoint_step: int = -1

    def plan_of(self, e: int):
        if e not in self.plans:
            self.plans[e] = self.loader.plan(e)
        return self.plans[e]


def _train(recipe: Recipe, accelerator, stop: StopSignals | None = None, phase: str | None = None,
           final: bool = True, pipeline: SelfTrainingConfig | None = None) -> Path:
    """One training into recipe.output_dir (the folder is already owned); `phase`/`final`/`pipeline`: a phase of
    a self-training run, whether it is the process's last, and that run's self_training settings."""
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run = _open_data(recipe, accelerator)
    run.stop, run.phase, run.final, run.pipeline = stop, phase, final, pipeline
    try:
        return _train_run(run)
    except StopDuringRead as e:  # a signal while shard data did not come: the step cannot finish
        raise _stopped_in_read(run, e) from None


def _train_run(run: _Run) -> Path:
    recipe, accelerator = run.recipe, run.accelerator
    _make_loader(run)
    if recipe.overwrite:  # every check has passed: only now is the earlier run removed
        # a self-training phase in output_dir itself keeps the phases before it (self_training/)
        found = [n for n in previous_run(recipe.output_dir) if run.phase is None or n != f"{PHASES_DIR}/"]
        if accelerator.is_main_process and found:
            clear_previous_run(recipe.output_dir, phases=run.phase is None)
            why = "overwrite=true" if run.phase is None else f"self-training, {run.phase}"
            accelerator.print(f"{why}: removed the earlier run in {recipe.output_dir} ({', '.join(found)})")
        accelerator.wait_for_everyone()
    else:  # a start that failed before its first checkpoint: its files are kept, out of this run's way
        if accelerator.is_main_process and (aside := set_aside_failed_start(recipe.output_dir)):
            accelerator.print(f"warning: output_dir {recipe.output_dir}: an earlier start there failed before its "
                              f"first checkpoint (no model, no checkpoint); its files "
                              f"({', '.join(sorted(p.name for p in aside.iterdir()))}) were moved to {aside}")
        accelerator.wait_for_everyone()
    _make_model(run)
    _start_outputs(run)
    _train_epochs(run)
    return _finish(run)


def _open_data(recipe: Recipe, accelerator) -> _Run:
    """Shards, manifests and every check that needs no model: a run that cannot work fails here."""
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batch_size(recipe, world)
    train_src = ShardSource.open(recipe.data.train_shards, recipe.data.train_manifest)
    info = model_info(recipe, train_src.manifest)
    if recipe.model.chunk_consistency and info["layout"] is None:  # silently ignored otherwise
        raise ConfigError(f"model.chunk_consistency ranks DiDeMo's chunk candidates, but {recipe.data.train_shards} holds "
                          f"{train_src.manifest.get('benchmark')!r} shards: set it to 0")
    if recipe.model.scale_calibration in ("contrast", "span") and info["layout"] is not None:  # unusable checkpoint
        raise ConfigError(f"model.scale_calibration {recipe.model.scale_calibration} ranks windows over snippets "
                          f"(Charades-STA, ActivityNet), but {recipe.data.train_shards} holds DiDeMo's chunks: use none "
                          "or standardise (DiDeMo's candidates have model.chunk_consistency)")
    val_src = ShardSource.open(recipe.data.val_shards, recipe.data.val_manifest) if recipe.data.val_shards else None
    test_src = ShardSource.open(recipe.data.test_shards, recipe.data.test_manifest) if recipe.data.test_shards else None
    for name, src in (("train", train_src), ("val", val_src), ("test", test_src)):
        if src is not None:  # a shard deleted or truncated after sharding: fail now, not when reached
            src.check_files(f"data.{name}_shards")
            src.read_timeout_s = recipe.data.read_timeout_s
    for name, src in (("val", val_src), ("test", test_src)):
        if src is not None:
            from .evaluation.predict import check_compatible

            check_compatible(info, src.manifest, f"data.{name}_shards")
    if recipe.model.pair_kernel == "triton":  # found at the first step otherwise, after the run folder is written
        from .kernels import triton_pair_mlp_available
        from .model import pair_kernel_unavailable

        if not triton_pair_mlp_available(accelerator.device):
            raise ConfigError(pair_kernel_unavailable(accelerator.device))
    need = min_global_batch(recipe.loss)
    if need > 1 and isinstance(train_src.manifest.get("num_videos"), int) and train_src.manifest["num_videos"] < 2:
        raise DataError(f"data.train_shards={recipe.data.train_shards}: all queries are of "
                        f"{train_src.manifest['num_videos']} video; top/last-K sampling needs queries of other videos")
    return _Run(recipe, accelerator, world, rank, need, train_src, val_src, test_src, info)


def _make_loader(run: _Run) -> None:
    """The streaming loader, or the same batches gathered from a device-resident copy (data.device_cache)."""
    from .data.device_cache import CachedEpochLoader, SplitCache, use_cache

    r, d = run.recipe, run.recipe.data
    args = (r.train.batch_size, run.world, run.rank, r.seed, d.shuffle, d.shuffle_buffer, d.num_workers,
            d.verify_checksums)
    device = run.accelerator.device
    cached, why = use_cache(d.device_cache, run.train_src, device, d.device_cache_max_fraction)
    if cached:
        cache = SplitCache(run.train_src, device, d.verify_checksums)
        run.loader = CachedEpochLoader(run.train_src, cache, *args, min_global_batch=run.need)
        run.accelerator.print(f"data.device_cache: the {cache.num_queries} training queries are held on {device}, "
                              f"{cache.nbytes / 2**20:.1f} MiB ({why})")
    else:
        run.loader = EpochLoader(run.train_src, *args, min_global_batch=run.need)
        if d.device_cache != "auto" or device.type == "cuda":
            run.accelerator.print(f"data.device_cache: the training shards are streamed ({why})")
    for e in range(r.train.epochs):  # batch plans of every epoch the run can reach: one that cannot work fails now
        run.total += run.plan_of(e).batches
        if r.train.max_steps and run.total >= r.train.max_steps:
            break
    if r.train.max_steps:
        run.total = min(run.total, r.train.max_steps)


def _make_model(run: _Run) -> None:
    """Model, optimizer (resumed when asked), the accelerate wrappers and the step function."""
    from .step import graph_blockers, make_step

    recipe, accelerator, world = run.recipe, run.accelerator, run.world
    model = model_from_info(run.info)
    resume = find_resume(recipe, warn=lambda t: accelerator.print(f"warning: {t}"))
    if resume is None and recipe.resume == "auto":
        earlier = [n for n in (MODEL_FILE, "history.json") if (Path(recipe.output_dir) / n).exists()]
        accelerator.print("resume=auto: no complete checkpoint yet, starting from scratch" + (
            f" (this replaces the earlier run's {', '.join(earlier)} in {recipe.output_dir})" if earlier else ""))
    resumed = None
    if resume is not None:  # everything checked before any state is loaded
        where = f"resume={resume}"
        check_resume_compatible(resume, run.info, model, where)
        resumed = read_train_state(resume, where)
        moved = (resumed.world, resumed.batch_size) != (world, recipe.train.batch_size)
        if resumed.batch_in_epoch and moved:
            raise ConfigError(f"{where}: the checkpoint stopped mid-epoch with {resumed.world} process(es) x "
                              f"train.batch_size={resumed.batch_size}; resume with the same number of processes and "
                              "train.batch_size (or from a checkpoint at an epoch end)")
    blockers = graph_blockers(recipe, accelerator, world)
    optimizer = build_optimizer(recipe, model.parameters(), capturable=not blockers and accelerator.device.type == "cuda")
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # the WebDataset loader is not prepared, so DeepSpeed learns the batch here
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
        ds_plugin.deepspeed_config.setdefault("zero_allow_untested_optimizer", True)
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    if resume is not None:
        # Not accelerator.load_state: it would unpickle custom_checkpoint_*.pkl (arbitrary code).
        load_checkpoint(accelerator, run.model, run.optimizer, resume, f"resume={resume}", resumed.world != world)
        run.state = resumed
        accelerator.print(f"resumed from {resume} at step {run.state.step} (epoch {run.state.epoch}, "
                          f"batch {run.state.batch_in_epoch})")
    run.state.world, run.state.batch_size = world, recipe.train.batch_size
    run.step_fn, how = make_step(run.model, run.optimizer, accelerator, recipe, blockers)
    if recipe.train.cuda_graph == "true" and blockers:  # asked for and impossible here: one line, once
        accelerator.print(f"warning: train.cuda_graph=true cannot be served here ({', '.join(blockers)}); "
                          "the step runs eagerly")
    elif accelerator.device.type == "cuda" or run.step_fn.graphed:
        accelerator.print(f"train.cuda_graph: {how}")


def _start_outputs(run: _Run) -> None:
    """TensorBoard, the run folder's recipe, the test hooks; the start-up line."""
    recipe, accelerator = run.recipe, run.accelerator
    # No config here: accelerate would write it with add_hparams into a second, timestamped run with no
    # metric columns.  write_hparams() puts hparams + final metrics into this run's own folder at the end.
    pc = accelerator.project_configuration  # this run's folder (a self-training phase is one run of several)
    pc.project_dir = pc.logging_dir = recipe.output_dir
    accelerator.trackers = []  # init_trackers appends: the phase before has finished its own
    accelerator.init_trackers("tensorboard")
    run.out_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    kill_at = int(os.environ.get("WSRA_TEST_SIGKILL_AT_STEP", "0"))  # test hook: die like a killed node
    run.debug_dir = os.environ.get("WSRA_DEBUG_DIR")  # test hook: record the sampler's choices per step
    kill_rank = os.environ.get("WSRA_TEST_SIGKILL_RANK")  # test hook: only this rank dies at kill_at
    if kill_at and (kill_rank not in (None, str(run.rank)) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))):
        kill_at = 0  # (and never again after the launcher restarted the workers)
    run.kill_at = kill_at
    term_rank = os.environ.get("WSRA_TEST_SIGTERM_RANK")  # test hook: SIGTERM to itself after this step
    if term_rank in (None, str(run.rank)):
        run.term_at = int(os.environ.get("WSRA_TEST_SIGTERM_AT_STEP", "0"))
    if os.environ.get("WSRA_SAMPLE_LOG"):  # test hook: the query ids of every step, per rank (exactly-once)
        Path(os.environ["WSRA_SAMPLE_LOG"]).mkdir(parents=True, exist_ok=True)
        run.sample_log = open(Path(os.environ["WSRA_SAMPLE_LOG"]) / f"samples-rank{run.rank}.jsonl", "a", buffering=1)
    accelerator.print(f"training on {run.world} process(es), device {accelerator.device}, global batch "
                      f"{run.world} x {recipe.train.batch_size}, {run.train_src.num_samples} training queries")


def _train_epochs(run: _Run) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    recipe, state = run.recipe, run.state
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"),
                        disable=not (run.accelerator.is_main_process and recipe.train.progress))
    run.t_start = run.t_log = time.time()
    run.samples_at_log = run.samples_start = state.samples
    with progress:
        task = progress.add_task("", total=run.total, completed=state.step, info="")
        run.model.train()
        while state.epoch < recipe.train.epochs:
            if _train_epoch(run, progress, task):
                break  # train.max_steps reached
            _end_epoch(run)
            _stop_if_asked(run)
    run.t_loop = time.time() - run.t_start


def _train_epoch(run: _Run, progress, task) -> bool:
    """This epoch's remaining batches; True when train.max_steps is reached."""
    recipe, state, accelerator = run.recipe, run.state, run.accelerator
    plan = run.plan_of(state.epoch)
    if plan.folded and state.batch_in_epoch < plan.batches:
        accelerator.print(f"epoch {state.epoch + 1}: the last {plan.folded} queries are folded into batch "
                          f"{plan.batches} (a global batch needs at least {run.need} for top/last-K sampling)")
    seen, skipped = plan.batches - state.batch_in_epoch, 0  # batches of this epoch run here / skipped
    run.fetching = True  # waiting for the next batch, between steps: a stop there can checkpoint the state
    for batch in run.loader.epoch(state.epoch, skip=state.batch_in_epoch):
        run.fetching = False
        if not _train_step(run, batch, progress, task):
            skipped += 1
            run.fetching = True
            continue
        if recipe.train.checkpoint_every and state.step % recipe.train.checkpoint_every == 0:
            _checkpoint_now(run)
        if run.kill_at and state.step == run.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if run.term_at and state.step == run.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        _stop_if_asked(run)
        if recipe.train.max_steps and state.step >= recipe.train.max_steps:
            return True
        run.fetching = True
    run.fetching = False
    if seen > 0 and skipped == seen:
        raise DataError(f"data.train_shards={recipe.data.train_shards}: no global batch of epoch {state.epoch + 1} "
                        "has enough queries of other videos for top/last-K sampling, and no other loss term is "
                        "weighted: nothing was trained (raise train.batch_size, lower loss.k_top/loss.k_last, "
                        "or shuffle the data so batches mix videos)")
    return False


def _checkpoint_now(run: _Run) -> None:
    t0 = time.time()
    with peers.waiting("a checkpoint (barriers, state gather)", run.state.step):
        checkpoint(run.accelerator, run.model, run.recipe, run.state, run.info)
    run.last_checkpoint_step = run.state.step
    run.t_paused += time.time() - t0
    run.t_excluded += time.time() - t0


def _stop_if_asked(run: _Run) -> None:
    """After a step or an epoch end: on SIGTERM/SIGINT (any process's) write a checkpoint and raise Stopped.
    With several processes the flag is max-all-reduced, so every process stops after the same step."""
    sig = run.stop.signum if run.stop is not None else 0
    if run.world > 1:
        with peers.waiting("the stop-signal all-reduce", run.state.step):  # a lost peer is named here too
            flag = torch.tensor([sig], device=run.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            sig = int(flag)
    if not sig:
        return
    if run.last_checkpoint_step != run.state.step:
        _checkpoint_now(run)
    stopped = Stopped(sig, run.state.step)
    run.accelerator.print(str(stopped))
    run.accelerator.end_training()
    raise stopped


def _stopped_in_read(run: _Run, e: StopDuringRead) -> Stopped:
    """SIGTERM/SIGINT while shard data does not come (stop_signals.data_wait): checkpoint the last completed step
    where that is possible, end the loader's workers and their commands, and say where the run stands."""
    state, accelerator = run.state, run.accelerator
    note = f" while waiting for shard data from {e.what} " + (
        f"(none came within {STALL_S:g} s of the signal)" if e.stalled else "(the signal stopped its source too)")
    if isinstance(run.loader, EpochLoader):
        run.loader.abandon()  # workers blocked in the stalled read; their pipe: commands end with them
    can_save = run.world == 1 and run.fetching and run.model is not None and state.step > 0
    if can_save and run.last_checkpoint_step != state.step:
        _checkpoint_now(run)  # between steps: the state is whole, resume=latest continues exactly here
    resume = "resume with resume=latest"
    if run.last_checkpoint_step != state.step:
        last = ckpts.latest_complete(Path(run.recipe.output_dir) / CKPT_DIR)
        why = ("several processes cannot write one while this one waits" if run.world > 1 and state.step else
               "no step was completed" if not state.step else "the wait was not between training steps")
        note += f"; no checkpoint of step {state.step} was written ({why})"
        resume = f"resume with resume=latest (from {last.name})" if last else "no checkpoint to resume from"
    stopped = Stopped(e.signum, state.step, note, resume)
    (accelerator.print if run.world == 1 else print)(str(stopped))  # with several, the rank that stopped says so
    for tracker in accelerator.trackers:  # TensorBoard's last events; not end_training: with several processes
        tracker.finish()  # it would destroy the process group, a collective the stalled peer never joins
    return stopped


def _host_video_ids(run: _Run, batch, g: Gatherer) -> torch.Tensor:
    """The global batch's video ids on the host, without reading a device tensor where the loader knows them."""
    if batch.host_video_id is not None:  # the cached loader: every process's batch, from its plan
        return batch.host_video_id
    if batch.video_id.device.type == "cpu" and run.world == 1:  # streaming, before the copy to the device
        return batch.video_id
    return g.const(batch.video_id.to(run.accelerator.device)).cpu()  # streaming, several processes: gathered


def _train_step(run: _Run, batch, progress, task) -> bool:
    """One optimizer step on `batch` (False: the batch was skipped, see the module doc)."""
    recipe, state, accelerator = run.recipe, run.state, run.accelerator
    peers.begin("the training step (feature all-gather, gradient all-reduce)", state.step + 1)
    g = Gatherer(batch.video.shape[0], accelerator.device)
    loss_cfg = recipe.loss
    if run.need > 1:  # too few other-video queries for the sampler: decided alike on every process, on the host
        why = sampler_shortfall(_host_video_ids(run, batch, g), recipe.loss)
        if why:
            loss_cfg = without_sampler(recipe.loss)
            left = "the batch is skipped (no optimizer step)" if loss_cfg is None else (
                "L_snippet/L_batch" + ("/L_cross" if recipe.loss.w_cross and recipe.loss.cross_negatives
                                       == "hard" else "") + " left out of this step")
            accelerator.print(f"warning: epoch {state.epoch + 1} batch {state.batch_in_epoch + 1}: {why}; {left}")
            if loss_cfg is None:
                state.batch_in_epoch += 1
                peers.end()
                return False
    batch = batch.to(accelerator.device)
    log_now = (state.step + 1) % recipe.train.log_every == 0 or state.step == 0
    out = run.step_fn(batch, loss_cfg, g, want_norm=log_now)
    for k, v in [*out.terms.items(), ("total", out.loss)]:
        v = v.detach().float()  # a replayed graph rewrites its outputs: the first term is copied
        run.ep_sums[k] = run.ep_sums[k] + v if k in run.ep_sums else v.clone()
    run.ep_steps += 1
    if run.debug_dir and accelerator.is_main_process and out.negatives is not None:
        _dump_negatives(Path(run.debug_dir), state.step + 1, out, batch)
    if run.sample_log is not None:
        run.sample_log.write(json.dumps({"step": state.step + 1, "epoch": state.epoch,
                                         "ids": [m["query_id"] for m in batch.meta]}) + "\n")
    state.step += 1
    state.batch_in_epoch += 1
    state.samples += g.n_global
    if log_now:
        _log_step(run, out, progress, task)
    peers.end()
    progress.update(task, completed=state.step)
    return True


def _log_step(run: _Run, out, progress, task) -> None:
    """The only place a step's values are read on the host (every train.log_every steps)."""
    accelerator, state = run.accelerator, run.state
    now = time.time()
    # Shares summed over processes = the value one process with the whole batch computes.
    names = list(out.terms)
    vals = torch.stack([out.terms[k].detach() for k in names] + [out.loss.detach()]).float()
    vals = accelerator.reduce(vals, reduction="sum") if run.world > 1 else vals
    vals = vals.tolist()
    logs = {f"loss/{k}": v for k, v in zip(names, vals[:-1])}
    logs["loss/total"] = vals[-1]
    logs["lr"] = run.optimizer.param_groups[0]["lr"]
    if out.grad_norm is not None:
        logs["grad_norm"] = float(out.grad_norm)
    logs["samples_per_s"] = (state.samples - run.samples_at_log) / max(now - run.t_log - run.t_paused, 1e-9)
    run.samples_at_log, run.t_log, run.t_paused = state.samples, now, 0.0
    accelerator.log(logs, step=state.step)
    progress.update(task, info=f"epoch {state.epoch} loss {logs['loss/total']:.4f}")


def _end_epoch(run: _Run) -> None:
    """Epoch losses, validation, history row, the end-of-epoch checkpoint."""
    recipe, state, accelerator = run.recipe, run.state, run.accelerator
    t0 = time.time()
    state.epoch += 1
    state.batch_in_epoch = 0
    with peers.waiting("the epoch's loss all-reduce", state.step):
        losses = epoch_losses(accelerator, run.ep_sums, run.ep_steps, run.world)
    run.ep_sums, run.ep_steps = {}, 0
    metrics = {}
    if run.val_src is not None:
        metrics = evaluate_split(accelerator, run.model, run.val_src, recipe)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
        peers.at("after validation", state.step)
    state.history.append({"epoch": state.epoch, "step": state.step, "time_s": round(time.time() - run.t_start, 2),
                          **{f"val/{k}": v for k, v in metrics.items()}, **losses})
    if metrics:
        accelerator.print(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    with peers.waiting("the end-of-epoch checkpoint (barriers, state gather)", state.step):
        checkpoint(accelerator, run.model, recipe, state, run.info)
    run.last_checkpoint_step = state.step
    run.t_paused += time.time() - t0
    run.t_excluded += time.time() - t0


def _finish(run: _Run) -> Path:
    """Test split, final weights, history.json, the HParams row."""
    recipe, state, accelerator = run.recipe, run.state, run.accelerator
    final = {}
    if run.test_src is not None:
        final = evaluate_split(accelerator, run.model, run.test_src, recipe)
        accelerator.log({f"test/{k}": v for k, v in final.items()}, step=state.step)
    with peers.waiting("the final weights gather", state.step):
        save_weights(accelerator, run.model, run.out_dir, run.info, recipe)
    if accelerator.is_main_process:
        (run.out_dir / "history.json").write_text(json.dumps({
            "epochs": state.history, "test": final, "steps": state.step, "time_s": round(time.time() - run.t_start, 2),
            "train_samples": state.samples - run.samples_start, "train_loop_s": round(run.t_loop, 3),
            "train_s": round(run.t_loop - run.t_excluded, 3), "processes": run.world,
            "graph_replays": getattr(run.step_fn, "replays", 0),
        }, indent=1))
        write_hparams(accelerator, recipe, state.history, final, state.step, run.phase, run.pipeline)
    with peers.waiting("the final barrier", state.step):
        accelerator.wait_for_everyone()
    if run.final:
        peers.stop()
        accelerator.end_training()
    else:  # a phase before another: its TensorBoard files end, the process group and the peer watch stay
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.free_memory()  # accelerate's references to this phase's model and optimizer
    return run.out_dir


def epoch_losses(accelerator, sums: dict, steps: int, world: int) -> dict[str, float]:
    """Mean over the epoch's steps of each loss term of the global batch (shares summed over processes)."""
    if not steps:
        return {}
    names = sorted(sums)  # the same terms on every process (the loss config is decided alike everywhere)
    vals = torch.stack([torch.as_tensor(sums[k]) for k in names]).to(accelerator.device)
    vals = accelerator.reduce(vals, reduction="sum") if world > 1 else vals
    return {f"loss/{k}": float(v) / steps for k, v in zip(names, vals)}


def hparam_metrics(history: list[dict], final: dict) -> dict[str, float]:
    """The HParams tab's metric columns: last and best validation value of each metric, and the test split."""
    out: dict[str, float] = {}
    val = [e for e in history if any(k.startswith("val/") for k in e)]
    if val:
        for k in (k for k in val[-1] if k.startswith("val/")):
            out[f"hparams/final_{k}"] = float(val[-1][k])
            out[f"hparams/best_{k}"] = max(float(e[k]) for e in val if k in e)  # every metric: higher is better
    out.update({f"hparams/test/{k}": float(v) for k, v in final.items()})
    return out


def write_hparams(accelerator, recipe: Recipe, history: list[dict], final: dict, step: int,
                  phase: str | None = None, pipeline: SelfTrainingConfig | None = None) -> None:
    """Hyper-parameters and metric columns into the run's own TensorBoard folder (one HParams row per run).
    A self-training phase's row shows the pipeline's self_training.* (its own recipe has them off) and its phase."""
    from torch.utils.tensorboard.summary import hparams

    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    d = to_dict(recipe)
    if pipeline is not None:
        d["self_training"] = {**dataclasses.asdict(pipeline), "phase": phase}
    hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(d).items() if v is not None}
    metrics = hparam_metrics(history, final)
    for summary in hparams(hp, metrics):
        writer.file_writer.add_summary(summary)
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)
    writer.flush()


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
    from .errors import errors_exit

    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["WSRA_DEBUG"] = "1"
    if launched_worker():  # a worker of torchrun / accelerate launch ends with its launcher, never orphaned
        die_with_parent()
    with errors_exit():  # one line, exit 2, printed once across processes (wsra_dist/errors.py)
        try:
            train(load_recipe(argv[0], argv[1:]))
        except Stopped as e:  # the line is printed; 128 + the signal, as a shell reports a signalled job
            sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
