"""Recipes: YAML + dotted overrides -> a typed, validated configuration.

Keys are a contract (scripts outside this repo use them): data.train_shards, data.val_shards,
train.epochs, train.max_steps, train.batch_size (per process), optim.name, optim.lr, data.shuffle,
data.num_workers, model.dropout, seed, output_dir, ...
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .losses import LossConfig


@dataclass
class DataConfig:
    train_shards: str = ""  # folder, or WebDataset URL pattern (braces, pipe:) with its manifest
    val_shards: str = ""  # evaluated at each epoch end when given
    test_shards: str = ""  # evaluated at the end of training when given
    train_manifest: str = ""  # explicit manifest for remote patterns (default: beside the shards)
    val_manifest: str = ""
    test_manifest: str = ""
    shuffle: bool = True  # fresh shard order and sample shuffle every epoch (seeded)
    shuffle_buffer: int = 2000
    num_workers: int = 0
    verify_checksums: bool = True  # sha256 of every shard checked while it streams
    # remote shards (pipe:, http(s)://): a shard that delivers no bytes for this long fails the run, naming it
    read_timeout_s: float = 120.0
    # auto | true | false: hold the training split as tensors on the training device and gather batches there
    # by index (same batches, same order as streaming; wsra_dist/data/device_cache.py).  auto: on a GPU when the
    # manifest's size bound fits in device_cache_max_fraction of its memory; true: also on the CPU
    device_cache: str = "auto"
    device_cache_max_fraction: float = 0.25


@dataclass
class ModelConfig:
    hidden: int = 256
    depth: int = 1  # hidden layers of φ's MLP
    dropout: float = 0.0
    input_norm: str = "l2"  # none | l2 | layernorm
    query_chunk: int = 0
    recompute: bool = False
    fused_kernel: bool = True
    # depth 1: compile the pair MLP with torch.compile (fused loops; ~20 s once per process, needs a C++
    # compiler on CPU or triton on GPU; falls back to the eager kernel with a warning)
    compile: bool = False
    # depth 1: auto (fused Triton kernels on CUDA, `compile` when set; the chunked eager kernel on CPU) | triton |
    # eager (wsra_dist/kernels/pair_mlp.py)
    pair_kernel: str = "auto"
    attention_scale: float = 1.0  # Eq. 2 uses exp(φ) (scale 1)
    # DiDeMo ranking only (not training): rank a candidate by (logit φ(c, t) + μ x the lowest logit of its single
    # chunks) / (1 + μ), so a moment must show the query in every chunk it covers (0: φ alone, the paper).
    # WSRA.rank_logits; docs/method.md
    chunk_consistency: float = 0.0
    # ranking only: none | standardise (each window size's logits standardised by their mean and sd over the
    # training queries against every window of their own training videos; no timestamps) | contrast (snippet
    # benchmarks: mean snippet logit inside the window - contrast_weight x the mean outside it) | span (snippet
    # benchmarks: Σ over a window's snippets of (standardised logit - span_threshold); the best contiguous span joins
    # the windows).
    # wsra_dist/scale_calibration.py, docs/method.md (issue #26)
    scale_calibration: str = "none"
    contrast_weight: float = 16.0
    # span: θ in standard deviations of the query's snippet logits (a window's mass is Σ (z_t − θ) over its snippets)
    span_threshold: float = -0.3
    # span: the best span's edges averaged over 9 thresholds evenly spread over θ ± span_band (0: θ alone)
    span_band: float = 0.0
    # DiDeMo: project the 6 chunks once and pool the projections (false: project the 21 materialised candidates)
    project_chunks: bool = True


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    grad_clip: float = 0.0  # 0: off


@dataclass
class TrainConfig:
    epochs: int = 6
    max_steps: int = 0  # 0: no limit; otherwise stop after this many optimizer steps
    batch_size: int = 42  # per process
    device: str = "auto"  # auto | cpu | cuda (cuda fails early without a GPU)
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: only at epoch ends
    keep_checkpoints: int = 2
    process_group_timeout_s: int = 600  # a dead process makes the others fail after this, not hang
    progress: bool = True
    deterministic: bool = False
    # auto | true | false: replay the steady-state step (one batch shape) from a captured CUDA graph
    # (one process, no DeepSpeed or mixed precision; elsewhere eager; wsra_dist/step.py)
    cuda_graph: str = "auto"


@dataclass
class EvalConfig:
    batch_size: int = 64
    charades_filter: str = "clamp"
    nms: float = -1.0  # < 0: off
    strict_iou: bool = False


@dataclass
class SelfTrainingConfig:
    # Rounds of self-training after the weak run (wsra_dist/self_training.py; docs/method.md "Self-training"):
    # 0: off.  Each round labels the TRAINING queries with the previous run's top-1 moments and trains a student
    # from scratch on them (the weak losses + L_supervised); the last student is the run in output_dir.
    rounds: int = 0
    span_band: float = -1.0  # band of the teacher's span ranking used to label (< 0: the teacher's model.span_band)
    w_supervised: float = 1.0  # the students' loss.w_supervised (cross-entropy on the pseudo-labelled times)
    # the fraction of training queries whose pseudo times the student's L_supervised uses, the teacher's most
    # confident top-1 scores first (the rest train by the weak losses alone); 1: every query
    keep: float = 1.0
    # the students' model.hidden (φ's width); 0: the teacher's. A student fits labels, not the weak objective, so
    # a wider one can use them without the teacher's ranking problem getting wider too (docs/method.md)
    hidden: int = 0


@dataclass
class Recipe:
    name: str = "wsra"
    seed: int = 0
    output_dir: str = "runs/wsra"
    # "" | latest (the newest complete checkpoint; error if none) | auto (latest if there is one, else from
    # scratch: for launchers that restart crashed workers) | path to a checkpoint folder
    resume: str = ""
    # true: replace the earlier run in output_dir (its model, history, recipe, checkpoints, TensorBoard events);
    # without it (or resume=...) training into a folder that holds a run is refused (wsra_dist/run_folder.py)
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)

    def validate(self) -> None:
        """Every value checked before any work is done; a bad one raises ConfigError naming its key."""
        try:
            self.loss.validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _validate(self)


class ConfigError(ValueError):
    """A recipe value that cannot work; the message names the key (train.epochs, optim.lr, ...)."""


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate(r: "Recipe") -> None:
    def choice(key: str, value: Any, allowed: tuple) -> None:
        _check(value in allowed, key, value, "one of " + ", ".join(map(str, allowed)))

    def integer(key: str, value: Any, low: int, rule: str | None = None) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        _check(ok, key, value, rule or f"an integer >= {low}")

    def number(key: str, value: Any, low: float, high: float | None = None, low_open: bool = False,
               high_open: bool = True, rule: str = "") -> None:
        ok = _finite(value) and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not rule:
            lo = f"> {low:g}" if low_open else f">= {low:g}"
            rule = f"a number {lo}" + (f" and {'<' if high_open else '<='} {high:g}" if high is not None else "")
        _check(ok, key, value, rule)

    t, o, m, d, e, lc = r.train, r.optim, r.model, r.data, r.eval, r.loss
    integer("seed", r.seed, 0)
    _check(r.seed < 2**32, "seed", r.seed, "< 2**32")
    _check(bool(str(r.output_dir).strip()), "output_dir", r.output_dir, "a folder path (not empty)")
    # data
    integer("data.shuffle_buffer", d.shuffle_buffer, 0)
    integer("data.num_workers", d.num_workers, 0)
    choice("data.device_cache", d.device_cache, ("auto", "true", "false"))
    number("data.read_timeout_s", d.read_timeout_s, 0.0, low_open=True, rule="a number of seconds > 0")
    number("data.device_cache_max_fraction", d.device_cache_max_fraction, 0.0, 1.0, low_open=True, high_open=False)
    # model
    integer("model.hidden", m.hidden, 1)
    integer("model.depth", m.depth, 0)
    number("model.dropout", m.dropout, 0.0, 1.0)
    choice("model.input_norm", m.input_norm, ("none", "l2", "layernorm"))
    choice("model.pair_kernel", m.pair_kernel, ("auto", "triton", "eager"))
    integer("model.query_chunk", m.query_chunk, 0, "an integer >= 0 (0: all queries at once)")
    number("model.attention_scale", m.attention_scale, 0.0, low_open=True)
    number("model.chunk_consistency", m.chunk_consistency, 0.0, rule="a number >= 0 (0: rank by φ alone)")
    choice("model.scale_calibration", m.scale_calibration, ("none", "standardise", "contrast", "span"))
    number("model.contrast_weight", m.contrast_weight, 0.0, rule="a number >= 0 (λ of scale_calibration contrast)")
    _check(_finite(m.span_threshold), "model.span_threshold", m.span_threshold,
           "a finite number (θ of scale_calibration span, in standard deviations)")
    number("model.span_band", m.span_band, 0.0, rule="a number >= 0 (half-width of span ranking's band of θ, in "
                                                      "standard deviations; 0: θ alone)")
    # loss (choices and K are checked by LossConfig.validate)
    for k in ("w_video", "w_snippet", "w_batch", "w_cross", "w_supervised"):
        number(f"loss.{k}", getattr(lc, k), 0.0, rule="a number >= 0 (0 switches the term off)")
    if not any(getattr(lc, k) for k in ("w_video", "w_snippet", "w_batch", "w_cross", "w_supervised")):
        raise ConfigError("every loss weight is 0: set at least one of loss.w_video, loss.w_snippet, loss.w_batch, "
                          "loss.w_cross, loss.w_supervised above 0")
    for k in ("tau", "cross_tau"):
        number(f"loss.{k}", getattr(lc, k), 0.0, low_open=True)
    for k in ("margin", "cross_margin"):
        _check(_finite(getattr(lc, k)), f"loss.{k}", getattr(lc, k), "a finite number")
    # optimizer
    choice("optim.name", o.name, ("adam", "adamw", "sgd"))
    number("optim.lr", o.lr, 0.0, low_open=True)
    number("optim.beta1", o.beta1, 0.0, 1.0)
    number("optim.beta2", o.beta2, 0.0, 1.0)
    number("optim.weight_decay", o.weight_decay, 0.0)
    number("optim.momentum", o.momentum, 0.0)
    number("optim.grad_clip", o.grad_clip, 0.0, rule="a number >= 0 (0: off)")
    # training
    integer("train.epochs", t.epochs, 1, "an integer >= 1 (0 epochs would write an untrained model)")
    integer("train.max_steps", t.max_steps, 0, "an integer >= 0 (0: no limit)")
    integer("train.batch_size", t.batch_size, 1, "an integer >= 1 (queries per process)")
    choice("train.device", t.device, ("auto", "cpu", "cuda"))
    choice("train.cuda_graph", t.cuda_graph, ("auto", "true", "false"))
    integer("train.log_every", t.log_every, 1, "an integer >= 1 (steps)")
    integer("train.checkpoint_every", t.checkpoint_every, 0, "an integer >= 0 (steps; 0: only at epoch ends)")
    integer("train.keep_checkpoints", t.keep_checkpoints, 1, "an integer >= 1 (resume needs the last checkpoint)")
    integer("train.process_group_timeout_s", t.process_group_timeout_s, 1, "an integer >= 1 (seconds)")
    # self-training
    st = r.self_training
    integer("self_training.rounds", st.rounds, 0, "an integer >= 0 (0: off)")
    _check(_finite(st.span_band), "self_training.span_band", st.span_band,
           "a finite number (< 0: the teacher's own model.span_band)")
    number("self_training.w_supervised", st.w_supervised, 0.0, low_open=True)
    number("self_training.keep", st.keep, 0.0, 1.0, low_open=True, high_open=False)
    integer("self_training.hidden", st.hidden, 0, "an integer >= 0 (0: the teacher's model.hidden)")
    if st.rounds:
        if lc.w_supervised:  # the teacher would learn from the annotated times the method never reads
            raise ConfigError(f"loss.w_supervised={lc.w_supervised:g} with self_training.rounds={st.rounds}: the "
                              "teacher would be trained on annotated times; set loss.w_supervised=0 (the students' "
                              "weight is self_training.w_supervised)")
        if st.span_band >= 0 and m.scale_calibration != "span":
            raise ConfigError(f"self_training.span_band={st.span_band:g} is a parameter of the span ranking, but "
                              f"model.scale_calibration is {m.scale_calibration}; set it to -1 (the teacher's own "
                              "ranking) or use scale_calibration span")
        if r.resume not in ("", "auto", "latest"):
            raise ConfigError(f"resume={r.resume} with self_training.rounds={st.rounds}: a self-training run has one "
                              "checkpoint folder per phase; use resume=latest or resume=auto (each phase continues "
                              "where it stopped)")
    # evaluation
    integer("eval.batch_size", e.batch_size, 1)
    choice("eval.charades_filter", e.charades_filter, ("clamp", "strict"))
    _check(_finite(e.nms) and e.nms <= 1.0, "eval.nms", e.nms, "a number <= 1 (< 0: off)")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; float() reads it as people mean it
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads `device_cache: true` as a bool; the choice is the word
            return "true" if value else "false"
        return "" if value is None else str(value)
    return value


def _apply(obj: Any, data: dict, prefix: str = "", lines: dict[str, str] | None = None) -> None:
    """Set the recipe's fields from `data`; `lines` ({dotted key: "FILE: line N"}, from the recipe file) puts the
    file and line in front of each refusal."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        at = f"{lines[key]}: " if lines and key in lines else ""
        if k not in names:
            raise ConfigError(f"{at}unknown recipe key {key!r}; valid keys here: {', '.join(sorted(names))}")
        tp = hints[k]
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{at}{key}: expected a mapping of "
                                  f"{', '.join(f.name for f in dataclasses.fields(cur))}, got {v!r}")
            _apply(cur, v, key + ".", lines)
        else:
            try:
                setattr(obj, k, _coerce(v, tp, key))
            except ConfigError as e:
                raise ConfigError(f"{at}{e}") from None


def parse_overrides(items: list[str]) -> dict:
    """['train.max_steps=1', 'seed=0'] -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=1)")
        k, v = item.split("=", 1)
        node = out
        parts = k.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `seed=1 seed.x=2`: a value cannot also be a section
                raise ConfigError(f"override {item!r}: {p} is given a value and keys of its own")
        try:
            node[parts[-1]] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError as e:  # PyYAML's message is several lines long
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """The recipe file (if any) with `overrides` applied, validated.  Every refusal is one ConfigError line; one
    about the file (YAML syntax, a top level or section that is not a mapping, a key given twice, a bad key or
    value that came from the file) names the file and line (wsra_dist/recipe_yaml.py)."""
    from .recipe_yaml import flat_keys, locate, read_recipe_file

    r = Recipe()
    lines: dict[str, str] = {}
    if path:
        data, lines = read_recipe_file(path)
        data.pop("accelerate", None)
        _apply(r, data, lines=lines)
    extra = parse_overrides(overrides or [])
    _apply(r, extra)
    try:
        r.validate()
    except ValueError as e:
        raise ConfigError(locate(str(e), lines, flat_keys(extra))) from e
    return r


def to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(to_dict(r), sort_keys=False)


