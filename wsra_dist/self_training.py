"""Self-training inside `train` (recipe key `self_training.rounds`; docs/method.md "Self-training").

    accelerate launch -m wsra_dist.train recipes/activitynet_best.yaml      # self_training.rounds: 1

runs in one command what `wsra-dist pseudo-label` and a second training run by hand:

1. the teacher: the recipe with self-training off, into OUTPUT_DIR/self_training/teacher;
2. its pseudo-labels: every TRAINING query's times replaced by the teacher's top-1 moment (its ranking, with the
   span band `self_training.span_band`), written by rank 0 into OUTPUT_DIR/self_training/pseudo-labels-1 while
   the other ranks wait (evaluation/pseudo_labels.py: no annotated time is read or kept; with
   `self_training.keep` < 1 only the teacher's most confident fraction trains L_supervised);
3. the student: the same recipe trained from scratch on those shards with loss.w_supervised =
   `self_training.w_supervised` (and model.hidden = `self_training.hidden` when > 0), into OUTPUT_DIR itself, so
   `evaluate --checkpoint OUTPUT_DIR` is the student.

With rounds > 1 each student teaches the next (self_training/round-R).  resume=latest|auto skips the finished
phases and continues the one that stopped (labels are written again only when their teacher changed);
overwrite=true replaces each phase as it starts.  Several nodes need OUTPUT_DIR on a file system they share: the
students read the labels rank 0 wrote (as a resume reads rank 0's checkpoints).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import peers
from .config import ConfigError, Recipe, SelfTrainingConfig, dump_recipe, load_recipe
from .data.loader import ShardSource
from .data.records import DataError
from .data.shards import MANIFEST, load_manifest, sha256_file
from .model import SHAPE_KEYS, WEIGHTS_FILE
from .run_folder import PHASES_DIR
from .stop_signals import Stopped

SUMMARY_FILE = "summary.json"  # OUTPUT_DIR/self_training/: each phase's folder and test metrics, each label set


@dataclass
class Phase:
    name: str  # "teacher", "student 1", ...
    recipe: Recipe  # the phase's own recipe (self-training off; a student's training shards are its labels)
    labels: Path | None = None  # the pseudo-labelled shards this phase trains on (None: the teacher)
    teacher: Path | None = None  # the run folder whose answers those labels are


def plan(recipe: Recipe) -> list[Phase]:
    """The phases of `recipe` (self_training.rounds >= 1), teacher first; the last trains into output_dir."""
    out, rounds = Path(recipe.output_dir), recipe.self_training.rounds
    phases: list[Phase] = []
    for r in range(rounds + 1):
        p = copy.deepcopy(recipe)
        p.self_training = SelfTrainingConfig()
        p.output_dir = str(out / PHASES_DIR / "teacher" if r == 0 else out if r == rounds else
                           out / PHASES_DIR / f"round-{r}")
        phase = Phase("teacher" if r == 0 else f"student {r}", p)
        if r:
            phase.labels = out / PHASES_DIR / f"pseudo-labels-{r}"
            phase.teacher = Path(phases[-1].recipe.output_dir)
            p.data.train_shards, p.data.train_manifest = str(phase.labels), ""
            p.loss.w_supervised = recipe.self_training.w_supervised
            p.model.hidden = recipe.self_training.hidden or p.model.hidden
        phases.append(phase)
    return phases


def check_labelable(recipe: Recipe) -> None:
    """Refuse before the teacher trains what pseudo_label would refuse after it (minutes or hours later)."""
    src = ShardSource.open(recipe.data.train_shards, recipe.data.train_manifest)
    bench = src.manifest.get("benchmark")
    if bench not in ("charades", "activitynet"):
        raise ConfigError(f"self_training.rounds={recipe.self_training.rounds}: data.train_shards="
                          f"{recipe.data.train_shards} holds {bench!r} shards; self-training labels snippet "
                          "benchmarks (Charades-STA, ActivityNet): set self_training.rounds=0")
    if src.manifest.get("pseudo_labels"):
        raise ConfigError(f"self_training.rounds={recipe.self_training.rounds}: data.train_shards="
                          f"{recipe.data.train_shards} is already pseudo-labelled; give the original training shards")


def _agree(accelerator, flag: bool) -> bool:
    """Rank 0's answer for every process (decisions read from files rank 0 wrote)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([int(flag)], device=accelerator.device)
    with peers.waiting("a self-training phase decision (broadcast)"):
        torch.distributed.broadcast(t, 0)
    return bool(int(t))


def finished(run_dir: str | Path) -> bool:
    return all((Path(run_dir) / n).is_file() for n in (WEIGHTS_FILE, "history.json"))


def labels_current(labels: Path, teacher: Path, source: str, span_band: float, keep: float = 1.0) -> bool:
    """Do `labels` hold `teacher`'s (same weights, same source shards, same band, same kept fraction) answers?"""
    if not (labels / MANIFEST).is_file() or not (teacher / WEIGHTS_FILE).is_file():
        return False
    try:
        pl = load_manifest(labels).get("pseudo_labels") or {}
    except DataError:
        return False
    same_band = span_band < 0 or pl.get("ranking", {}).get("span_band") == float(span_band)
    return (pl.get("weights_sha256") == sha256_file(teacher / WEIGHTS_FILE) and same_band
            and float(pl.get("keep", 1.0)) == float(keep)
            and pl.get("source_shards") == str(Path(source).resolve()))


def _check_kept_shape(phase: Phase) -> None:
    """A finished phase is kept only if its model has the shape this recipe plans (self_training.hidden changed:
    refuse rather than evaluate a student of the other width as if it were this recipe's)."""
    saved = Path(phase.recipe.output_dir) / "recipe.yaml"
    if not saved.is_file():
        return
    old = load_recipe(saved).model
    diffs = [f"model.{k} {getattr(old, k)!r} there, {getattr(phase.recipe.model, k)!r} here" for k in SHAPE_KEYS
             if getattr(old, k) != getattr(phase.recipe.model, k)]
    if diffs:
        raise ConfigError(f"resume: the finished {phase.name} in {phase.recipe.output_dir} has another model shape ("
                          + "; ".join(diffs) + "); replace it with overwrite=true or train into a new output_dir")


def _write_labels(recipe: Recipe, accelerator, stop, phase: Phase) -> None:
    """Rank 0 writes `phase.labels` from `phase.teacher`; the others wait (peers.await_rank0), then all meet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation.pseudo_labels import pseudo_label

    where = f"writing the pseudo-labels of {phase.name} into {phase.labels}"
    key = f"{PHASES_DIR}/{phase.labels.name}"
    band = recipe.self_training.span_band
    note = f" while {where}"
    again = "resume with resume=latest (the finished phases are kept; these labels are written again)"
    if not accelerator.is_main_process:
        said = peers.await_rank0(key, where)
        if said.startswith("stopped "):
            raise Stopped(int(said.split()[1]), 0, note, again)
        if said != "ok":
            raise DataError(f"{where}: failed on rank 0 (its message says why)")
    else:
        progress = Progress(TextColumn(f"[bold]pseudo-labels ({phase.name})"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), disable=not recipe.train.progress)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)
            if stop is not None and stop.signum:
                raise Stopped(stop.signum, 0, note, again)

        said = "failed"
        try:
            with progress:
                task = progress.add_task("", total=None)
                pseudo_label(phase.teacher, recipe.data.train_shards, phase.labels, str(accelerator.device), tick,
                             span_band=band if band >= 0 else None, manifest=recipe.data.train_manifest,
                             keep=recipe.self_training.keep)
            said = "ok"
        except Stopped as e:
            said = f"stopped {e.signum}"
            raise
        finally:
            if accelerator.num_processes > 1:
                peers.publish(key, said)
        accelerator.print(f"self-training: {phase.labels} holds the {phase.teacher.name} run's top-1 moments of "
                          "every training query")
    with peers.waiting("the barrier after the pseudo-labels"):
        accelerator.wait_for_everyone()


def run_rounds(recipe: Recipe, accelerator, stop, train_one: Callable[..., Path]) -> Path:
    """Every phase of `recipe` in order (train_one: train._train); returns output_dir (the last student)."""
    check_labelable(recipe)
    phases = plan(recipe)
    resumed = bool(recipe.resume)
    relabelled = False
    for i, ph in enumerate(phases):
        last = i == len(phases) - 1
        if ph.labels is not None:
            current = resumed and labels_current(ph.labels, ph.teacher, recipe.data.train_shards,
                                                 recipe.self_training.span_band, recipe.self_training.keep)
            relabelled = not _agree(accelerator, current)
            if relabelled:
                _write_labels(recipe, accelerator, stop, ph)
        if resumed and not relabelled and _agree(accelerator, finished(ph.recipe.output_dir)):
            _check_kept_shape(ph)
            accelerator.print(f"self-training: the {ph.name} in {ph.recipe.output_dir} is finished; kept")
            if last:
                accelerator.end_training()
            continue
        # a student whose labels were written now starts over (its earlier files learnt other labels)
        ph.recipe.overwrite = recipe.overwrite or (relabelled and ph.labels is not None)
        ph.recipe.resume = "" if ph.recipe.overwrite or not resumed else recipe.resume if i == 0 else "auto"
        accelerator.print(f"self-training: training the {ph.name} into {ph.recipe.output_dir}")
        train_one(ph.recipe, accelerator, stop, phase=ph.name, final=last, pipeline=recipe.self_training)
    if accelerator.is_main_process:
        _write_summary(recipe, phases)
    return Path(recipe.output_dir)


def _write_summary(recipe: Recipe, phases: list[Phase]) -> None:
    """OUTPUT_DIR/self_training/{recipe.yaml, summary.json}: the recipe as given, each phase's test metrics."""
    base = Path(recipe.output_dir) / PHASES_DIR
    rows = []
    for ph in phases:
        hist = json.loads((Path(ph.recipe.output_dir) / "history.json").read_text())
        row = {"phase": ph.name, "run": ph.recipe.output_dir, "test": hist.get("test", {})}
        if ph.labels is not None:
            row["labels"] = str(ph.labels)
            row["labelled_by"] = load_manifest(ph.labels).get("pseudo_labels", {})
        rows.append(row)
    (base / "recipe.yaml").write_text(dump_recipe(recipe))
    (base / SUMMARY_FILE).write_text(json.dumps({"phases": rows}, indent=1))
    for row in rows:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in list(row["test"].items())[:4])
        print(f"self-training: {row['phase']}: test {shown or '(no test split)'}")
