"""The paper's ablations on any recipe (planted DiDeMo by default): Table 1 (loss terms), Figure 6 (K) and a
model sweep, each setting over several seeds (mean ± sd), saying which differences exceed the spread."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from .config import load_recipe

# Table 1: L_video, L_snippet, L_batch on/off (literal objective: the cross-video variant is off).
LOSS_STUDY = [
    ("L_video", {"loss.w_video": 0.1, "loss.w_snippet": 0, "loss.w_batch": 0}),
    ("L_snippet", {"loss.w_video": 0, "loss.w_snippet": 1, "loss.w_batch": 0}),
    ("L_video + L_snippet", {"loss.w_video": 0.1, "loss.w_snippet": 1, "loss.w_batch": 0}),
    ("L_video + L_snippet + L_batch", {"loss.w_video": 0.1, "loss.w_snippet": 1, "loss.w_batch": 0.1}),
]


def ensure_planted(recipe_path: Path, overrides: list[str], root: Path) -> list[str]:
    """If the recipe's shards do not exist and it is a planted recipe, write them (synth + shard) under root."""
    r = load_recipe(recipe_path, overrides)
    if Path(r.data.train_shards, "manifest.json").is_file() or not r.name.startswith("planted_"):
        return overrides
    from .data.pack import shard_activitynet, shard_charades, shard_didemo
    from .data.synthetic import synth

    profile = next((p for p in ("didemo", "activitynet") if p in r.name), "charades")
    data = root / "data"
    synth(profile, data, None, r.seed)
    splits = {}
    if profile == "didemo":
        for s in ("train", "val"):
            shard_didemo(data / f"{s}_data.json", [str(data / "average_global_flow.h5")], root / "shards" / s, 500)
            splits[s] = root / "shards" / s
    elif profile == "activitynet":  # the usual split: val_1 validates
        for s in ("train", "val_1"):
            shard_activitynet(data / f"{s}.json", data / "sub_activitynet_v1-3.c3d.hdf5", root / "shards" / s, 500)
        splits = {"train": root / "shards" / "train", "val": root / "shards" / "val_1"}
    else:
        for s in ("train", "test"):
            shard_charades(data / f"charades_sta_{s}.txt", data / f"Charades_v1_{s}.csv", data / "features",
                           root / "shards" / s, 500)
        splits = {"train": root / "shards" / "train", "val": root / "shards" / "test"}
    return [f"data.train_shards={splits['train']}", f"data.val_shards={splits['val']}", *overrides]


# --study model: one factor at a time around the recipe (φ's width, depth, input normalisation; the
# cross-video variant's weight and temperature).  Names are the table's rows.
MODEL_STUDY = [
    ("hidden=512", {"model.hidden": 512}),
    ("hidden=1024", {"model.hidden": 1024}),
    ("depth=2", {"model.depth": 2}),
    ("input_norm=l2", {"model.input_norm": "l2"}),
    ("input_norm=layernorm", {"model.input_norm": "layernorm"}),
    ("input_norm=none", {"model.input_norm": "none"}),
    ("w_cross=0.5", {"loss.w_cross": 0.5}),
    ("w_cross=2", {"loss.w_cross": 2}),
    ("cross_tau=2", {"loss.cross_tau": 2}),
    ("cross_tau=10", {"loss.cross_tau": 10}),
]
STUDIES = ("losses", "k", "model")


def _run(recipe_path: Path, overrides: list[str], out: Path) -> dict:
    from .train import train

    r = load_recipe(recipe_path, overrides)
    # Score on the validation split at the end, as Table 1 and Figure 6 do.
    r.data.test_shards, r.data.val_shards = r.data.val_shards, ""
    r.output_dir = str(out)
    r.overwrite = True  # an ablation re-runs its cells from scratch
    r.train.progress = False
    train(r)
    return json.loads((out / "history.json").read_text())["test"]


def _seeded(recipe_path: Path, overrides: list[str], out: Path, seeds: int) -> dict:
    """One setting over `seeds` seeds (recipe seed + i: data order and initialisation): mean, sd, the runs."""
    base = load_recipe(recipe_path, overrides).seed
    runs = [_run(recipe_path, overrides + [f"seed={base + i}"], out / f"seed{base + i}") for i in range(seeds)]
    row: dict = {}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        row[k] = statistics.fmean(vals)
        row[f"{k} sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    row["seeds"] = [base + i for i in range(seeds)]
    row["runs"] = runs
    return row


def _settings(study: str, recipe_path: Path, overrides: list[str], k_top, k_last) -> list[tuple[dict, list[str]]]:
    """(the row's label fields, its extra overrides) for every setting of a study."""
    if study == "losses":
        rows = [({"losses": name}, [f"{k}={v}" for k, v in ov.items()] + ["loss.w_cross=0"]) for name, ov in LOSS_STUDY]
        base = load_recipe(recipe_path, overrides)
        if base.loss.w_cross:
            rows.append(({"losses": f"recipe as given (with cross-video variant, w_cross={base.loss.w_cross:g})"}, []))
        return rows
    if study == "k":
        return [({"k_top": kt, "k_last": kl}, [f"loss.k_top={kt}", f"loss.k_last={kl}"]) for kt in k_top for kl in k_last]
    base = load_recipe(recipe_path, overrides)

    def same_as_base(ov: dict) -> bool:  # e.g. input_norm=none on a recipe that has it: a duplicate row
        return all(getattr(getattr(base, k.split(".")[0]), k.split(".")[1]) == v for k, v in ov.items())

    return [({"setting": "recipe as given"}, [])] + [
        ({"setting": name}, [f"{k}={v}" for k, v in ov.items()]) for name, ov in MODEL_STUDY if not same_as_base(ov)]


def _label(row: dict) -> str:
    return row.get("losses") or row.get("setting") or f"k{row['k_top']}_{row['k_last']}"


def exceeds_spread(a: dict, b: dict, key: str) -> bool:
    """Is the difference of two rows' means beyond the run-to-run spread?  Rule: |Δ| > 2 standard errors
    of the difference, sqrt(sd_a²/n_a + sd_b²/n_b) (needs >= 2 seeds each)."""
    na, nb = len(a["seeds"]), len(b["seeds"])
    if na < 2 or nb < 2:
        return False
    se = math.sqrt(a[f"{key} sd"] ** 2 / na + b[f"{key} sd"] ** 2 / nb)
    return abs(a[key] - b[key]) > 2 * se


def primary_metric(row: dict) -> str:
    """The figure's metric: DiDeMo R@1; Charades-STA R@1 at IoU 0.7 (Figure 6); ActivityNet R@1 at IoU 0.5."""
    return "R@1" if "R@1" in row else next(k for k in ("R@1,IoU=0.7", "R@1,IoU=0.5") if k in row)


def _table(study: str, results: list[dict], seeds: int) -> list[str]:
    keys = [k for k in results[0]["runs"][0]]
    label_cols = ["K_top", "K_last"] if study == "k" else ["losses" if study == "losses" else "setting"]
    key = primary_metric(results[0])
    best = max(results, key=lambda r: r[key])
    head = "| " + " | ".join(label_cols) + " | " + " | ".join(keys) + f" | {key} vs best |"
    lines = [head, "|" + "---|" * len(label_cols) + "---:|" * len(keys) + "---|"]
    for r in results:
        labels = [str(r["k_top"]), str(r["k_last"])] if study == "k" else [_label(r)]
        cells = [f"{r[k]:.2f} ± {r[k + ' sd']:.2f}" if seeds > 1 else f"{r[k]:.2f}" for k in keys]
        if r is best:
            verdict = "best"
        elif seeds < 2:
            verdict = "(1 seed: spread unknown)"
        else:
            verdict = (f"{r[key] - best[key]:+.2f}, beyond the spread" if exceeds_spread(r, best, key)
                       else f"{r[key] - best[key]:+.2f}, within the spread")
        lines.append("| " + " | ".join(labels + cells) + f" | {verdict} |")
    return lines


def run_ablation(recipe_path: Path, study: str, out: Path, overrides: list[str],
                 k_top: tuple[int, ...] = (1, 2, 3, 4), k_last: tuple[int, ...] = (0, 2, 4), seeds: int = 3) -> str:
    """Train every setting of `study` over `seeds` seeds; write results.json, table.md and a plot with error bars."""
    if study not in STUDIES:
        raise ValueError(f"--study must be one of {', '.join(STUDIES)}, got {study!r}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    overrides = ensure_planted(Path(recipe_path), overrides, out)
    results = []
    for fields, extra in _settings(study, Path(recipe_path), overrides, k_top, k_last):
        name = _label(fields).replace(" + ", "+").replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        results.append({**fields, **_seeded(recipe_path, overrides + extra, out / "runs" / name, seeds)})
    lines = _table(study, results, seeds) + _prior_lines(recipe_path, overrides, results, study)
    if study == "k":
        _plot_k(results, out / "k_study.png")
    else:
        _plot_bars(results, out / f"{study}_study.png", study)
    rule = ("mean ± sd over seeds " + ", ".join(map(str, results[0]["seeds"])) + "; \"beyond the spread\": |Δ| > 2 "
            "standard errors of the difference") if seeds > 1 else "one seed: differences cannot be told from noise"
    md = f"Ablation `{study}` on {recipe_path} (validation split; {rule})\n\n" + "\n".join(lines) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tmp = out / ".table.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "table.md")
    return md


def _prior_lines(recipe_path: Path, overrides: list[str], results: list[dict], study: str) -> list[str]:
    """Table rows of the prior baselines (learnt on the training shards' annotations, scored on the validation
    queries the runs are scored on): what a method must beat without looking at the video."""
    from .data.records import DataError
    from .data.shards import load_manifest, manifest_path_for
    from .evaluation.priors import prior_rows, training_from_shards

    r = load_recipe(recipe_path, overrides)
    try:
        protocol = load_manifest(r.data.train_manifest or manifest_path_for(r.data.train_shards)).get("benchmark")
        train = training_from_shards(r.data.train_shards, protocol, r.data.train_manifest)
        val = training_from_shards(r.data.val_shards, protocol, r.data.val_manifest)
        rows = prior_rows(protocol, train, val.queries)
    except (DataError, OSError, ValueError, KeyError) as e:  # the study's table stands without them; say why
        return ["", f"(prior baselines left out: {type(e).__name__}: {e})"]
    keys = list(results[0]["runs"][0])
    pad = ["", ""] if study == "k" else [""]
    return [f"| {name} |" + " |" * (len(pad) - 1) + " " + " | ".join(
        "-" if vals.get(k) is None else f"{vals[k]:.2f}" for k in keys) + " | baseline (no video) |"
        for name, vals in rows.items()]


def _y_range(lo: float, hi: float, min_span: float = 10.0) -> tuple[float, float]:
    """A y-range at least `min_span` points tall, so that a 0.5-point difference does not look like a cliff."""
    mid, span = (lo + hi) / 2, max(hi - lo, min_span) * 1.15
    return max(0.0, mid - span / 2), min(100.0, max(mid + span / 2, span))


def _plot_k(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    key = primary_metric(results[0])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kl in sorted({r["k_last"] for r in results}):
        rs = sorted((r for r in results if r["k_last"] == kl), key=lambda r: r["k_top"])
        ax.errorbar([r["k_top"] for r in rs], [r[key] for r in rs], yerr=[r[f"{key} sd"] for r in rs], marker="o",
                    capsize=3, label=f"K_last = {kl}")
    lo = min(r[key] - r[f"{key} sd"] for r in results)
    hi = max(r[key] + r[f"{key} sd"] for r in results)
    ax.set_ylim(*_y_range(lo, hi))
    ax.set_xticks(sorted({r["k_top"] for r in results}))
    ax.set_xlabel("K_top")
    ax.set_ylabel(f"{key} (%), mean ± sd over {len(results[0]['seeds'])} seed(s)")
    ax.set_title("Top/last-K sampling (Figure 6 protocol)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_bars(results: list[dict], path: Path, study: str) -> None:
    from matplotlib.figure import Figure

    key = primary_metric(results[0])
    labels = [_label(r) for r in results]
    fig = Figure(figsize=(7, 0.45 * len(results) + 1.4))
    ax = fig.subplots()
    y = list(range(len(results)))[::-1]
    # points, not bars: bars on a range that does not start at 0 would exaggerate the differences
    ax.errorbar([r[key] for r in results], y, xerr=[r[f"{key} sd"] for r in results], fmt="o", color="#2b6a99",
                capsize=3)
    ax.grid(axis="x", alpha=0.3)
    ax.set_yticks(y, labels)
    lo = min(r[key] - r[f"{key} sd"] for r in results)
    hi = max(r[key] + r[f"{key} sd"] for r in results)
    ax.set_xlim(*_y_range(lo, hi))
    ax.set_xlabel(f"{key} (%), mean ± sd over {len(results[0]['seeds'])} seed(s)")
    ax.set_title(f"Ablation: {study}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
