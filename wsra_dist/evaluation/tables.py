"""Benchmark tables in the paper's layout: this run beside the paper's rows (markdown and CSV)."""

from __future__ import annotations

import csv
import io

from .scoring import KEYS

# WSRA paper, Table 2 (DiDeMo test) and Table 3 (Charades-STA test), as printed.
PAPER_DIDEMO = [
    ("Upper bound (paper, as printed; mIoU should read 96.05)", "-", (74.75, 100.0, 69.05)),
    ("Chance (paper, one random draw)", "-", (3.75, 22.50, 22.64)),
    ("TGA [30] (weak)", "Flow&RGB", (12.19, 39.74, 24.92)),
    ("WSRA (paper)", "RGB", (14.20, 43.67, 25.22)),
    ("WSRA (paper)", "Flow", (17.88, 50.04, 29.90)),
    ("WSRA (paper)", "Flow&RGB", (17.52, 52.11, 28.87)),
]
# Order of CHARADES_KEYS: R@1 .3 .5 .7, R@5 .3 .5 .7, mIoU
PAPER_CHARADES = [
    ("TGA [30] (weak)", "I3D", (32.14, 19.94, 8.84, 89.56, 65.52, 33.51, None)),
    ("WSRA (paper)", "I3D", (50.13, 31.20, 11.01, 86.75, 70.50, 39.02, 31.00)),
]
# ActivityNet Captions (val_2): WSRA never reported it.  Order of ACTIVITYNET_KEYS: R@1 .1 .3 .5, R@5 .1 .3 .5, mIoU.
PAPER_ACTIVITYNET = [
    ("CPL (CVPR 2022, its README) (weak)", "C3D", (79.86, 53.67, 31.24, 87.24, 63.05, 43.13, None)),
]
PAPER_ROWS = {"didemo": PAPER_DIDEMO, "charades": PAPER_CHARADES, "activitynet": PAPER_ACTIVITYNET}


def rows_for(protocol: str, metrics: dict, reference: dict, run_name: str, feature: str,
             priors: dict | None = None) -> list[tuple]:
    """Chance of these queries, the prior baselines learnt on the training annotations (priors.py; a metric a row
    lacks shows as '-'), the upper bound of these queries, the paper's rows, then this run."""
    keys = KEYS[protocol]

    def exact(k: str) -> tuple:
        return (f"{k} (exact, these queries)", "-", tuple(reference[k].get(x) for x in keys))

    rows = [exact("Chance")]
    rows += [(name, "-", tuple(vals.get(x) for x in keys)) for name, vals in (priors or {}).items()]
    rows += [exact("Upper bound")]
    rows += PAPER_ROWS[protocol]
    rows.append((f"**{run_name}** (this run)", feature, tuple(metrics.get(x) for x in keys)))
    return rows


def caption(protocol: str, n_queries: int, settings: dict, note: str = "") -> str:
    """The table's one-line caption; `note` (e.g. why the prior rows are missing) is appended."""
    text = _caption(protocol, n_queries, settings)
    return f"{text} {note}" if note else text


def _ranking(settings: dict) -> str:
    """" Ranking: ..." for checkpoints ranked by a scale calibration (settings of evaluate_checkpoints), else ""."""
    cal, params = settings.get("scale_calibration") or [], settings.get("ranking_parameters") or []
    said: list[str] = []
    for mode, p in zip(cal, params if len(params) == len(cal) else [{}] * len(cal)):
        if mode == "span":
            band = float(p.get("span_band", 0.0) or 0.0)
            theta = f"θ {p.get('span_threshold', float('nan')):g}" + (f" ± {band:g}, edges averaged" if band else "")
            text = (f"span ({theta}): each query's best span of standardised "
                    "snippet logits first (not one of the fixed windows; the upper bound covers those only), then "
                    "the windows by their mass")
        elif mode == "contrast":
            text = f"contrast (λ {p.get('contrast_weight', float('nan')):g}): mean snippet logit inside minus λ x outside"
        elif mode == "standardise":
            text = "standardise: each window size's logits standardised by the training queries' statistics"
        else:
            continue
        if text not in said:
            said.append(text)
    return f" Ranking: {'; '.join(said)}." if said else ""


def _caption(protocol: str, n_queries: int, settings: dict) -> str:
    return _protocol_caption(protocol, n_queries, settings) + _ranking(settings)


def _protocol_caption(protocol: str, n_queries: int, settings: dict) -> str:
    if protocol == "didemo":
        return (f"DiDeMo protocol (LocalizingMoments eval.py): {n_queries} queries; 21 candidates; rank = mean of the "
                f"3 best annotator ranks, IoU = mean of the 3 best annotator IoUs of the top-1 (inclusive chunks); "
                f"R@1, R@5, mIoU in %.")
    if protocol == "activitynet":
        return (f"ActivityNet Captions: {n_queries} queries ({settings.get('activitynet_filter', 'clamp')} rule); "
                f"proportional windows 20/40/80/100% of the length, stride a quarter of the window, window "
                f"feature = mean of its snippets; IoU {'>' if settings.get('strict') else '>='} m; NMS "
                f"{settings.get('nms') if settings.get('nms') is not None else 'off'}; values in %.")
    return (f"Charades-STA, WSRA protocol: {n_queries} queries ({settings.get('charades_filter', 'clamp')} rule); "
            f"proportional windows 20/30/40/50% of the length, 80% overlap, window feature = mean of its snippets; "
            f"IoU {'>' if settings.get('strict') else '>='} m; NMS {settings.get('nms') if settings.get('nms') is not None else 'off'}; "
            f"values in %.")


def markdown(protocol: str, rows: list[tuple], cap: str) -> str:
    keys = KEYS[protocol]
    head = "| method | feature | " + " | ".join(keys) + " |"
    sep = "|---|---|" + "---:|" * len(keys)
    lines = [f"Table: {cap}", "", head, sep]
    for name, feat, vals in rows:
        lines.append(f"| {name} | {feat} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def csv_text(protocol: str, rows: list[tuple]) -> str:
    keys = KEYS[protocol]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "feature", *keys])
    for name, feat, vals in rows:
        w.writerow([name.replace("**", ""), feat, *["" if v is None else f"{v:.4f}" for v in vals]])
    return buf.getvalue()
