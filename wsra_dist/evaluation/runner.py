"""`wsra-dist evaluate`: checkpoints on shards, or any method's prediction file, -> metrics and tables."""

from __future__ import annotations

import math

import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from ..data.records import DataError
from . import formats, scoring, tables
from .metrics import check_iou_tolerance
from .priors import Baselines, TrainingSet, baselines_for, training_from_annotations, training_from_run

PROTOCOLS = ("didemo", "charades", "activitynet")
MD_PREDICTIONS = "predictions_md.jsonl"  # moment_detr / lighthouse format, beside predictions.jsonl


def _write_outputs(out: Path, protocol: str, metrics: dict, reference: dict, n_queries: int, settings: dict,
                   run_name: str, feature: str, predictions: list[dict] | None = None,
                   truth: Sequence[dict] = (), baselines: Baselines | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    baselines = baselines or Baselines()
    rows = tables.rows_for(protocol, metrics, reference, run_name, feature, baselines.rows)
    md = tables.markdown(protocol, rows, tables.caption(protocol, n_queries, settings, baselines.note))

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)

    if predictions is not None:
        put("predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        put(MD_PREDICTIONS, _md_lines(protocol, predictions, truth))
    keys = scoring.KEYS[protocol]
    # Keys before "baselines" are a contract; the prior rows come after, in their own block.
    put("metrics.json", json.dumps({k: round(metrics[k], 4) for k in keys} | {"num_queries": n_queries,
                                   "protocol": protocol, "settings": settings} | baselines.json(), indent=1))
    put("table.md", md)
    put("table.csv", tables.csv_text(protocol, rows))
    return md


def _md_lines(protocol: str, predictions: list[dict], truth: Sequence[dict]) -> str:
    """The predictions as moment_detr / lighthouse JSONL lines (formats.to_md), with each query's sentence and
    video from the ground-truth records `predict` read from the shards' meta.json (no second pass over them)."""
    from . import formats

    queries = {t["query_id"]: (t.get("video", ""), t.get("query", "")) for t in truth}
    id_key = formats.protocol(protocol).id_key
    lines = []
    for p in predictions:
        video, sentence = queries.get(p[id_key], (p.get("video", ""), ""))
        lines.append(json.dumps(formats.to_md(p, protocol, query=sentence, vid=video)) + "\n")
    return "".join(lines)


def _dist():
    """(world, rank, gather) under `accelerate launch`, else (1, 0, identity)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        import torch

        st = PartialState(cpu=not torch.cuda.is_available())
        return st.num_processes, st.process_index, gather_object, st
    return 1, 0, (lambda x: x), None


def check_ranking(protocol: str, chunk_consistency: float | None, scale_calibration: str | None,
                  contrast_weight: float | None, span_threshold: float | None = None,
                  span_band: float | None = None) -> float | None:
    """The ranking overrides of `evaluate` (--chunk-consistency, --scale-calibration, --contrast-weight,
    --span-threshold, --span-band), checked in one line each; returns the checked chunk consistency."""
    from ..model import check_chunk_consistency

    if chunk_consistency is not None:
        try:
            chunk_consistency = check_chunk_consistency(chunk_consistency, "--chunk-consistency")
        except ValueError as e:
            raise DataError(str(e)) from None
    if scale_calibration is not None or contrast_weight is not None:
        from ..scale_calibration import check_mode

        try:
            if scale_calibration is not None:
                check_mode(scale_calibration, "--scale-calibration")
            if contrast_weight is not None and not (math.isfinite(contrast_weight) and contrast_weight >= 0):
                raise ValueError(f"--contrast-weight must be a finite number >= 0, got {contrast_weight}")
        except ValueError as e:
            raise DataError(str(e)) from None
    if span_threshold is not None and not math.isfinite(span_threshold):
        raise DataError(f"--span-threshold must be a finite number, got {span_threshold}")
    if span_band is not None and not (math.isfinite(span_band) and span_band >= 0):
        raise DataError(f"--span-band must be a finite number >= 0, got {span_band}")
    for flag, v, mode in (("--contrast-weight", contrast_weight, "contrast"), ("--span-threshold", span_threshold, "span"),
                          ("--span-band", span_band, "span")):
        if v is not None and protocol == "didemo":  # before anything is loaded or computed
            raise DataError(f"{flag} is a parameter of the {mode} ranking, which ranks windows over snippets "
                            "(Charades-STA, ActivityNet); DiDeMo's candidates have --chunk-consistency")
        if v is not None and scale_calibration is not None and scale_calibration != mode:
            raise DataError(f"{flag} is a parameter of the {mode} ranking, not of --scale-calibration "
                            f"{scale_calibration}")
    if scale_calibration in ("contrast", "span") and protocol == "didemo":
        raise DataError(f"--scale-calibration {scale_calibration} ranks windows over snippets (Charades-STA, "
                        "ActivityNet); DiDeMo's candidates have --chunk-consistency")
    if chunk_consistency and protocol != "didemo":
        raise DataError("--chunk-consistency ranks DiDeMo's chunk candidates; it has no meaning for --protocol "
                        f"{protocol}")
    return chunk_consistency


def evaluate_checkpoints(
    checkpoints: Sequence[str], shards: Sequence[str], protocol: str, out: str | Path,
    fusion_weights: Sequence[float] | None = None, batch_size: int = 64, strict: bool = False,
    nms: float | None = None, device: str | None = None, run_name: str | None = None,
    clip_predictions: bool = False, iou_tolerance: float = 0.0,
    train_annotations: str | Path | None = None, train_durations: str | Path | None = None,
    chunk_consistency: float | None = None, scale_calibration: str | None = None,
    contrast_weight: float | None = None, span_threshold: float | None = None, span_band: float | None = None,
) -> tuple[dict, str | None]:
    """Score one checkpoint (or several, late-fused with weights) on their shards.  `chunk_consistency` (DiDeMo)
    replaces each checkpoint's own model.chunk_consistency ranking weight (WSRA.rank_logits); None keeps theirs.
    `scale_calibration` likewise replaces model.scale_calibration (evaluation/calibration.py; None keeps theirs).
    The predictions pass the same checks as a prediction file (scoring.score_didemo / score_charades).  The prior rows are learnt on
    `train_annotations` (the official training file) when given, else on the truth in the first run's
    data.train_shards (its recipe.yaml) that can be read; without either the table says how to add them."""
    import torch

    from ..data.loader import ShardSource
    from .predict import check_compatible, load_run, predict
    from .calibration import ranking_settings

    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_iou_tolerance(iou_tolerance)
    _check_train_file(train_annotations, train_durations)
    chunk_consistency = check_ranking(protocol, chunk_consistency, scale_calibration, contrast_weight, span_threshold,
                                      span_band)
    if len(checkpoints) != len(shards):
        raise DataError(f"give one --shards per --checkpoint (late fusion pairs them): {len(checkpoints)} vs {len(shards)}")
    weights = list(fusion_weights or [1.0 / len(checkpoints)] * len(checkpoints))
    if len(weights) != len(checkpoints):
        raise DataError(f"--fusion-weights needs {len(checkpoints)} values, got {len(weights)}")
    world, rank, gather, state = _dist()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if state is not None:
        dev = state.device
    fused: dict = {}
    truth_all: list[dict] = []
    reader: dict = {}
    id_key = "annotation_id" if protocol == "didemo" else "query_id"
    used_mu, used_cal, used_param = [], [], []
    for ck, sh, w in zip(checkpoints, shards, weights):
        model, info = load_run(ck, dev)
        if chunk_consistency is not None:
            model.chunk_consistency = chunk_consistency
        if any(v is not None for v in (chunk_consistency, scale_calibration, contrast_weight, span_threshold, span_band)):
            from .calibration import attach  # the statistics of the ranking used

            try:
                attach(model, ck, dev, mode=scale_calibration, contrast_weight=contrast_weight,
                       span_threshold=span_threshold, span_band=span_band)
            except ValueError as e:
                raise DataError(str(e)) from None
        for flag, v, mode in (("--contrast-weight", contrast_weight, "contrast"), ("--span-threshold", span_threshold, "span"),
                              ("--span-band", span_band, "span")):
            if v is not None and model.scale_calibration != mode:
                raise DataError(f"{flag} is a parameter of the {mode} ranking, but {ck} ranks by "
                                f"{model.scale_calibration}: add --scale-calibration {mode}")
        if len(checkpoints) > 1 and model.scale_calibration == "span":
            raise DataError(f"{ck} ranks by span, which adds each query's own best span to the windows; late fusion "
                            "adds the checkpoints' scores of the same moments, so spans would not fuse: give "
                            "--scale-calibration contrast or none to fuse")
        used_mu.append(model.chunk_consistency)
        used_cal.append(model.scale_calibration)
        used_param.append(ranking_settings(model))
        src = ShardSource.open(sh)
        reader = src.manifest.get("reader", {})
        if src.manifest.get("benchmark") != protocol:
            raise DataError(f"{sh}: shards are {src.manifest.get('benchmark')!r}, not --protocol {protocol}")
        check_compatible(info, src.manifest, sh)
        preds, truth = predict(model, src, protocol, batch_size, world, rank, dev)
        preds, truth = gather(preds), gather(truth)
        if not truth_all:
            seen = set()
            truth_all = [t for t in truth if not (t["query_id"] in seen or seen.add(t["query_id"]))]
        seen_ids: set = set()
        for p in preds:
            if p[id_key] in seen_ids:  # gathered from several processes: keep one prediction per id
                continue
            seen_ids.add(p[id_key])
            entry = fused.setdefault(p[id_key], {"p": p, "s": {}})
            for m, s in zip(p["moments"], p["scores"]):
                entry["s"][tuple(m)] = entry["s"].get(tuple(m), 0.0) + w * s
    predictions = []
    for e in fused.values():
        ranked = sorted(e["s"].items(), key=lambda kv: -kv[1])
        p = {k: v for k, v in e["p"].items() if k not in ("moments", "scores")}
        p["moments"] = [list(m) for m, _ in ranked]
        p["scores"] = [s for _, s in ranked]
        predictions.append(p)
    predictions.sort(key=lambda p: p[id_key])
    truth_all.sort(key=lambda t: t["query_id"])
    rule = reader.get("charades_filter" if protocol == "charades" else "activitynet_filter", "clamp")

    def training() -> tuple[TrainingSet | None, str]:
        if train_annotations:
            return training_from_annotations(protocol, train_annotations, train_durations, rule), ""
        whys = []
        for ck in checkpoints:
            train, why = training_from_run(ck, protocol)
            if train is not None:
                return train, ""
            whys.append(why)
        return None, whys[0] if whys else ""

    metrics, md = _finish(protocol, predictions, truth_all, out, strict, nms, rank, clip_predictions, iou_tolerance,
                          run_name=run_name or " + ".join(Path(c).name for c in checkpoints),
                          feature=" & ".join(_feature_name(s) for s in shards), write_predictions=True,
                          settings_extra={"checkpoints": list(checkpoints), "shards": list(shards),
                                          "fusion_weights": weights, "scale_calibration": used_cal,
                                          "ranking_parameters": used_param,
                                          **({"chunk_consistency": used_mu} if protocol == "didemo" else {}),
                                          **({"charades_filter": reader.get("charades_filter", "clamp")}
                                             if protocol == "charades" else {}),
                                          **({"activitynet_filter": reader.get("activitynet_filter", "clamp")}
                                             if protocol == "activitynet" else {})},
                          training=training)
    if md is not None:  # main process: OUT/report.html (imported here: report.py is the top floor, above evaluation/)
        from ..report import write_report

        write_report(out, protocol, md, predictions, truth_all, list(checkpoints), list(shards), dev,
                     chunk_consistency=used_mu[0] if protocol == "didemo" else None,
                     ranking={"mode": scale_calibration, "contrast_weight": contrast_weight,
                              "span_threshold": span_threshold, "span_band": span_band})
    return metrics, md


def _feature_name(shards: str) -> str:
    from ..data.shards import load_manifest, manifest_path_for

    try:
        m = load_manifest(manifest_path_for(shards))
        feats = [s for s in m.get("sources", []) if s["role"] == "features"]
        return "+".join(Path(s["path"]).stem for s in feats) or "-"
    except Exception:
        return "-"


def _check_train_file(train_annotations, train_durations) -> None:
    """Refuse a missing training file before any scoring (checkpoints may take long to predict)."""
    for flag, p in (("--train-annotations", train_annotations), ("--train-durations", train_durations)):
        if p and not Path(p).is_file():
            raise DataError(f"{p}: {flag} file not found")
    if train_durations and not train_annotations:
        raise DataError("--train-durations needs --train-annotations (the training file the durations belong to)")


def _finish(protocol, predictions, truth, out, strict, nms, rank, clip_predictions, iou_tolerance, run_name, feature,
            write_predictions, settings_extra, where=None,
            training: Callable[[], tuple[TrainingSet | None, str]] | None = None) -> tuple[dict, str | None]:
    """Score, then (main process) write the outputs.  `training` returns the training annotations for the prior
    rows, or (None, why): called here so only the main process reads them."""
    if protocol == "didemo":
        metrics = scoring.score_didemo(predictions, truth, where=where)
        settings = {"strict": strict, "nms": nms, **settings_extra}
    else:
        metrics = scoring.score_charades(predictions, truth, strict=strict, nms=nms, clip_predictions=clip_predictions,
                                         iou_tolerance=iou_tolerance, where=where, protocol=protocol)
        settings = {"strict": strict, "nms": nms, "iou_tolerance": iou_tolerance, "clip_predictions": clip_predictions,
                    **settings_extra}
    if rank != 0:
        return metrics, None
    reference = scoring.reference_rows(protocol, truth, strict=strict, iou_tolerance=iou_tolerance)
    train, why = training() if training is not None else (None, "")
    baselines = baselines_for(protocol, train, why, truth, strict=strict, nms=nms, iou_tolerance=iou_tolerance)
    md = _write_outputs(Path(out), protocol, metrics, reference, len(truth), settings, run_name, feature,
                        predictions if write_predictions else None, truth, baselines)
    return metrics, md


def evaluate_predictions(
    predictions: str | Path, annotations: str | Path, protocol: str, out: str | Path, durations: str | None = None,
    charades_filter: str = "clamp", strict: bool = False, nms: float | None = None, clip_predictions: bool = False,
    iou_tolerance: float = 0.0, activitynet_filter: str = "clamp",
    train_annotations: str | Path | None = None, train_durations: str | Path | None = None,
) -> tuple[dict, str | None]:
    """Score any method's JSONL predictions against the official annotation file.  Malformed predictions are
    refused with the file and line (scoring.read_predictions_located); Charades-STA / ActivityNet
    `clip_predictions` orders and clips moments into [0, duration] instead of refusing them.  ActivityNet
    Captions: `annotations` is the split's JSON (val_2.json for the test), ids are its running query index.
    `train_annotations` (the protocol's official training file; Charades-STA also `train_durations`, by default
    Charades_v1_train.csv beside it) adds the prior baseline rows, read with the same defect rule."""
    from ..data import activitynet, charades, didemo

    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_iou_tolerance(iou_tolerance)
    _check_train_file(train_annotations, train_durations)
    preds, where = scoring.read_predictions_located(predictions, protocol, clip_predictions)
    dropped: dict[int, str] = {}  # query_id -> why the defect rule dropped the query
    if protocol == "didemo":
        recs = didemo.read_annotations(annotations)
        truth = [{"query_id": r.query_id, "video": r.video, "times": r.times} for r in recs]
        extra = {}
    elif protocol == "activitynet":
        recs, stats = activitynet.read_annotations(annotations, activitynet_filter, dropped)
        truth = [{"query_id": r.query_id, "video": r.video, "times": r.times, "duration": r.duration} for r in recs]
        extra = {"activitynet_filter": activitynet_filter, "filter_stats": stats}
    else:
        if not durations:
            raise DataError("--durations Charades_v1_test.csv is needed for the charades protocol")
        recs, stats = charades.read_annotations(annotations, charades.read_durations(durations), charades_filter,
                                                durations_file=str(durations), dropped=dropped)
        truth = [{"query_id": r.query_id, "video": r.video, "times": r.times, "duration": r.duration} for r in recs]
        extra = {"charades_filter": charades_filter, "filter_stats": stats}
    rule = charades_filter if protocol == "charades" else activitynet_filter
    flag = f"--{protocol}-filter {rule}"
    preds, skipped = skip_filtered(preds, dropped, protocol, flag)
    if skipped:
        extra["skipped_predictions"] = skipped

    def training() -> tuple[TrainingSet | None, str]:
        if not train_annotations:
            return None, "no --train-annotations"
        return training_from_annotations(protocol, train_annotations, train_durations, rule), ""

    result = _finish(protocol, preds, truth, out, strict, nms, 0, clip_predictions, iou_tolerance,
                     run_name=Path(predictions).stem, feature="-", write_predictions=False,
                     settings_extra={"predictions": str(predictions), "annotations": str(annotations), **extra},
                     where=where, training=training)
    if skipped:  # after scoring: a refusal stays the one line of the error path
        from ..errors import print_warning

        print_warning(skipped_warning(skipped, annotations, where))
    return result


# Why a defect rule drops a query (the stats keys of data.charades / data.activitynet), in words.
DROP_REASONS = {"dropped_start_ge_end": "start >= end", "dropped_past_end": "end past the video's length",
                "dropped_before_start": "start before 0"}


def skip_filtered(preds: list[dict], dropped: dict[int, str], protocol: str, flag: str) -> tuple[list[dict], dict]:
    """(the predictions of queries the defect rule kept, what was skipped or {}).

    A full prediction file (every line of the annotation file) names queries the rule removed: those are
    counted and skipped, not called unknown; ids the annotation file does not hold at all stay in the list,
    so the scorer still refuses them as unknown.  The skipped dict: count, flag, reasons, a few ids."""
    if not dropped:
        return preds, {}
    id_key = formats.protocol(protocol).id_key
    gone = [p[id_key] for p in preds if p[id_key] in dropped]
    if not gone:
        return preds, {}
    reasons = dict(Counter(DROP_REASONS[dropped[q]] for q in gone))
    kept = [p for p in preds if p[id_key] not in dropped]
    return kept, {"count": len(gone), "filter": flag, "reasons": reasons, "ids": gone[:5]}


def skipped_warning(skipped: dict, annotations: str | Path, where: dict) -> str:
    """The one warning line for skip_filtered's result, naming the filter and a few lines of the file."""
    why = ", ".join(f"{n} {r}" for r, n in skipped["reasons"].items())
    shown = ", ".join(f"query_id {q}" + (f" ({where[q]})" if q in where else "") for q in skipped["ids"][:3])
    return (f"{skipped['count']} predictions are for queries that {skipped['filter']} drops from {annotations} "
            f"({why}); they are skipped, not scored (e.g. {shown})")
