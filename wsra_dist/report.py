"""`report.html`: one self-contained page per `wsra-dist evaluate --checkpoint` (the file name is a contract).

The page holds the benchmark table (table.md, as tables.py wrote it), the run's learning curves
(history.json's per-epoch validation metrics and, where train.py records them there, per-epoch loss
terms; otherwise the loss terms per logged step from the run's TensorBoard event files), the K sweep
when an `ablate --study k` result sits beside the run, and a gallery of example queries (best, typical
and worst by the top-1 IoU) drawn by figures.py.

Self-contained: images are base64 PNG data: URIs, the CSS is inline, a Content-Security-Policy forbids
every other source, and every data string passes through html.escape.  A section that cannot be built
(no history.json, no event files, a figure failing) becomes a note; the page is always written.

This is the top floor: it imports evaluation/ and figures; nothing below imports it at module level
(runner.py calls it from inside evaluate_checkpoints).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPORT_FILE = "report.html"
TOP_K = 3  # moments drawn per gallery query


def write_report(out: str | Path, protocol: str, table_md: str, predictions: Sequence[dict], truth: Sequence[dict],
                 checkpoints: Sequence[str], shards: Sequence[str], device=None, per_group: int = 3,
                 chunk_consistency: float | None = None, ranking: dict | None = None) -> Path:
    """Build OUT/report.html (written atomically) and return its path.  `chunk_consistency`: the DiDeMo ranking
    weight the predictions were ranked with (the figures rank the same way; None: the checkpoint's own);
    `ranking`: evaluate's scale-calibration overrides (mode, contrast_weight, span_threshold, span_band), applied likewise."""
    out = Path(out)
    notes: list[str] = []
    run = Path(checkpoints[0])
    sections = [
        ("table", "Benchmark", _guard(lambda: _table_section(table_md), "the table", notes)),
        ("curves", "Learning curves", _guard(lambda: _curves_section(run, notes), "the learning curves", notes)),
    ]
    ksweep = _guard(lambda: _k_sweep_section(run, notes), "the K sweep", notes)
    if ksweep:
        sections.append(("ksweep", "K sweep", ksweep))
    sections.append(("gallery", "Example queries", _guard(
        lambda: _gallery_section(protocol, predictions, truth, checkpoints, shards, device, per_group, notes,
                                 chunk_consistency, ranking),
        "the gallery", notes)))
    page = _page(protocol, len(truth), checkpoints, shards, sections, notes)
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / REPORT_FILE)
    return out / REPORT_FILE


def _guard(build: Callable[[], str], what: str, notes: list[str]) -> str:
    """A failing section becomes a note on the page (and one line on stderr): the page is a by-product
    of an evaluation whose metrics are already written, so it must not fail the command."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any failure of one section
        msg = f"{what} could not be built: {type(e).__name__}: {e}"
        print(f"report.html: {msg}", file=sys.stderr)
        notes.append(msg)
        return f'<p class="note">{escape(msg)}</p>'


# ------------------------------------------------------------------------------------------ page
CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e2e5eb; --accent:#0b4f8a; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 48px; }
header h1 { font-size:26px; margin:0 0 4px; letter-spacing:-0.01em; }
.meta { color:var(--muted); font-size:13.5px; margin:0 0 10px; word-break:break-all; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-weight:600; font-size:14px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 24px 20px;
          margin:22px 0; }
h2 { font-size:19px; margin:0 0 12px; }
h3 { font-size:15px; margin:18px 0 6px; color:var(--muted); font-weight:600; }
table { border-collapse:collapse; width:100%; font-size:14px; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; }
th { background:#f0f2f5; font-weight:600; }
td.num, th.num { text-align:right; }
tr.this td { background:#fff4e5; font-weight:600; }
.caption { color:var(--muted); font-size:13px; margin:10px 0 0; }
img { max-width:100%; height:auto; display:block; }
.note { color:#7a4b00; background:#fff8e6; border-left:3px solid #e69f00; padding:6px 10px; font-size:13.5px;
        margin:8px 0; }
.grid { display:grid; grid-template-columns:1fr; gap:14px; }
figure.card { margin:0; border:1px solid var(--line); border-radius:8px; padding:14px 16px; background:#fff;
              display:grid; grid-template-columns:minmax(220px, 1fr) minmax(0, 800px); gap:18px; align-items:start; }
@media (max-width: 1100px) { figure.card { grid-template-columns:1fr; } }
.sentence { font-weight:600; font-size:16px; margin:8px 0 10px; overflow-wrap:anywhere; }
dl.facts { margin:0; display:grid; grid-template-columns:auto 1fr; gap:2px 10px; font-size:13px; }
dl.facts dt { color:var(--muted); } dl.facts dd { margin:0; overflow-wrap:anywhere; }
.iou { font-size:28px; font-weight:700; line-height:1.1; margin-top:10px; }
.iou small { font-size:12px; font-weight:400; color:var(--muted); display:block; }
.legend { display:flex; flex-wrap:wrap; gap:6px 18px; font-size:13px; margin:10px 0 14px; }
.legend span { display:inline-flex; align-items:center; gap:6px; }
.sw { width:22px; height:12px; display:inline-block; border-radius:2px; }
.sw.hatch { background:repeating-linear-gradient(135deg, #009e73 0 2px, #fff 2px 5px); border:1px solid #009e73; }
ul.notes { margin:6px 0 0; padding-left:18px; }
.tag { display:inline-block; font-size:11px; font-weight:700; letter-spacing:.04em; text-transform:uppercase;
       border-radius:4px; padding:1px 7px; margin-right:6px; color:#fff; vertical-align:1px; }
.tag.best { background:#009e73; } .tag.typical { background:#0b4f8a; } .tag.worst { background:#d55e00; }
footer { color:var(--muted); font-size:12.5px; }
"""


def _page(protocol: str, n_queries: int, checkpoints: Sequence[str], shards: Sequence[str],
          sections: list[tuple[str, str, str]], notes: list[str]) -> str:
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs = ", ".join(escape(str(c)) for c in checkpoints)
    meta = (f"protocol <b>{escape(protocol)}</b> · {n_queries} queries · checkpoint {runs} · shards "
            + ", ".join(escape(str(s)) for s in shards) + f" · {escape(when)}")
    nav = "".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{escape(title)}</h2>{html}</section>' for sid, title, html in sections)
    listed = "".join(f"<li>{escape(n)}</li>" for n in notes)
    foot = ("<footer><p>Written by <code>wsra-dist evaluate</code>; self-contained (no external files).</p>"
            + (f"<p>Notes:</p><ul class=\"notes\">{listed}</ul>" if notes else "") + "</footer>")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>WSRA evaluation: {escape(Path(str(checkpoints[0])).name)}</title><style>{CSS}</style></head>"
            f"<body><main><header><h1>WSRA evaluation report</h1><p class=\"meta\">{meta}</p><nav>{nav}</nav>"
            f"</header>{body}{foot}</main></body></html>\n")


def _img(fig, alt: str, dpi: int = 110) -> str:
    from .figures import figure_bytes

    data = base64.b64encode(figure_bytes(fig, "png", dpi)).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


# ----------------------------------------------------------------------------------------- table
def parse_table(md: str) -> tuple[str, list[str], list[list[str]]]:
    """table.md (tables.markdown) -> (caption, header cells, rows of cells).  A method name holding '|'
    is rejoined: the feature and metric columns are counted from the right."""
    caption, lines = "", []
    for line in md.splitlines():
        if line.startswith("Table: "):
            caption = line[len("Table: "):]
        elif line.startswith("|"):
            lines.append(line.strip()[1:-1])
    header = [c.strip() for c in lines[0].split("|")]
    n = len(header)
    rows = []
    for line in lines[2:]:
        cells = line.split("|")
        if len(cells) > n:
            cells = ["|".join(cells[: len(cells) - n + 1])] + cells[len(cells) - n + 1:]
        rows.append([c.strip() for c in cells])
    return caption, header, rows


def _cell(text: str) -> str:
    """Escape, then turn tables.py's **bold** markers into <strong> (on the escaped text: nothing injected)."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(text))


def _table_section(md: str) -> str:
    caption, header, rows = parse_table(md)
    head = "".join(f'<th class="{"num" if i > 1 else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for cells in rows:
        cls = ' class="this"' if "(this run)" in cells[0] else ""
        tds = "".join(f'<td class="{"num" if i > 1 else ""}">{_cell(c)}</td>' for i, c in enumerate(cells))
        body.append(f"<tr{cls}>{tds}</tr>")
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f'<p class="caption">{escape(caption)}</p>')


# -------------------------------------------------------------------------------- learning curves
def read_history(run: Path) -> dict | None:
    """The run's history.json (train.py: per epoch "epoch", "step", "time_s" and "val/<metric>"), or None
    when it is missing or unreadable."""
    try:
        h = json.loads((run / "history.json").read_text())
    except (OSError, ValueError):
        return None
    return h if isinstance(h, dict) else None


def read_loss_scalars(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Loss terms per logged step from the run's TensorBoard event files ("loss/<term>" scalars, written
    every train.log_every steps); files of a resumed run are merged, the later value of a step winning."""
    files = sorted(run.glob("**/events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("loss/"):
                for ev in acc.Scalars(tag):
                    merged.setdefault(tag[5:], {})[int(ev.step)] = float(ev.value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in merged.items()}


def _curves_section(run: Path, notes: list[str]) -> str:
    from .figures import loss_figure, validation_figure

    parts = []
    hist = read_history(run)
    epochs = [e for e in (hist or {}).get("epochs", []) if isinstance(e, dict)]
    if hist is None:
        parts.append(_note(f"{run}: no history.json, or not readable JSON (training did not finish, or the folder "
                           "holds only weights): no per-epoch record to draw.", notes))
    else:
        fig = validation_figure(epochs)
        if fig is None:
            parts.append(_note("history.json holds no validation metrics (the run had no data.val_shards).", notes))
        else:
            parts.append("<h3>Validation metrics per epoch (history.json)</h3>"
                         + _img(fig, "validation metrics per epoch"))
    per_epoch = {k[5:]: ([e["epoch"] for e in epochs if k in e], [e[k] for e in epochs if k in e])
                 for k in sorted({k for e in epochs for k in e if k.startswith("loss/")})}
    if per_epoch:  # train.py's own record (mean of each term over the epoch's steps): no event reader needed
        parts.append("<h3>Loss terms per epoch (history.json: mean over the epoch's steps)</h3>"
                     + _img(loss_figure(per_epoch, xlabel="epoch"), "loss terms per epoch"))
        return "".join(parts)
    try:
        losses = read_loss_scalars(run)
    except ImportError as e:  # tensorboard is a dependency, but the validation curves need no event reader
        losses = {}
        notes.append(f"cannot read TensorBoard event files ({e})")
    if losses:
        steps = [int(e["step"]) for e in epochs if isinstance(e.get("step"), int)]
        parts.append("<h3>Loss terms per logged step (TensorBoard event files; dotted: epoch ends)</h3>"
                     + _img(loss_figure(losses, steps), "loss terms per step"))
    else:
        parts.append(_note(f"{run}: no loss terms: history.json records none per epoch and there are no TensorBoard "
                           "event files with loss/* scalars.", notes))
    return "".join(parts)


def _note(text: str, notes: list[str]) -> str:
    notes.append(text)
    return f'<p class="note">{escape(text)}</p>'


# ------------------------------------------------------------------------------------------ K sweep
def find_k_sweep(run: Path) -> tuple[Path, list[dict]] | None:
    """An `ablate --study k` results.json that covers this run: in the run folder, or two levels up (ablate
    writes OUT/results.json and its runs as OUT/runs/k{K_top}_{K_last}/seed{S})."""
    for f in (run / "results.json", run.parent.parent / "results.json", run.parent.parent.parent / "results.json"):
        try:
            rows = json.loads(f.read_text()) if f.is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(rows, list) and rows and all(isinstance(r, dict) and "k_top" in r and "k_last" in r
                                                   for r in rows):
            return f, rows
    return None


def _k_sweep_section(run: Path, notes: list[str]) -> str:
    found = find_k_sweep(run)
    if found is None:
        notes.append("no K sweep beside this run (`wsra-dist ablate --study k` writes one); section left out.")
        return ""
    from .figures import k_sweep_figure

    path, rows = found
    return (_img(k_sweep_figure(rows, _run_k(run)), "R@1 against K_top per K_last")
            + f'<p class="caption">From {escape(str(path))} (validation split).</p>')


def _run_k(run: Path) -> tuple[int, int] | None:
    import yaml

    try:
        loss = (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("loss", {})
        return int(loss["k_top"]), int(loss["k_last"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


# ------------------------------------------------------------------------------------------ gallery
@dataclass
class Example:
    query_id: int
    iou: float
    score: float  # the top-1 score
    top1: list  # the evaluated top-1 moment (chunk pair or seconds)
    group: str = ""


def top1_ious(protocol: str, predictions: Sequence[dict], truth: Sequence[dict]) -> list[Example]:
    """The top-1 IoU of every query, as the protocol scores it (DiDeMo: mean of the 3 best annotator IoUs)."""
    from .evaluation.metrics import as_chunk_pair, didemo_query, interval_iou

    key = "annotation_id" if protocol == "didemo" else "query_id"
    by_id = {p[key]: p for p in predictions}
    out = []
    for t in truth:
        p = by_id.get(t["query_id"])
        if p is None or not p["moments"]:
            continue
        if protocol == "didemo":
            iou = didemo_query([as_chunk_pair(m) for m in p["moments"]], t["times"])[1]
        else:
            iou = float(interval_iou(np.asarray(p["moments"][0]), np.asarray(t["times"][0])))
        out.append(Example(t["query_id"], float(iou), float(p["scores"][0]), list(p["moments"][0])))
    return out


def pick_examples(rows: Sequence[Example], per_group: int = 3) -> list[Example]:
    """Best (highest IoU, then most confident), typical (nearest the median IoU) and worst (lowest IoU,
    then most confident: the instructive failures), each query at most once."""
    if not rows:
        return []
    med = float(np.median([r.iou for r in rows]))
    orders = {"best": sorted(rows, key=lambda r: (-r.iou, -r.score, r.query_id)),
              "typical": sorted(rows, key=lambda r: (abs(r.iou - med), r.query_id)),
              "worst": sorted(rows, key=lambda r: (r.iou, -r.score, r.query_id))}
    chosen: dict[int, Example] = {}
    for group in ("best", "worst", "typical"):  # typical last: it takes what best/worst left
        n = 0
        for r in orders[group]:
            if n == per_group:
                break
            if r.query_id not in chosen:
                chosen[r.query_id] = Example(r.query_id, r.iou, r.score, r.top1, group)
                n += 1
    rank = {"best": 0, "typical": 1, "worst": 2}
    return sorted(chosen.values(), key=lambda e: (rank[e.group], -e.iou, e.query_id))


class _ShardText:
    """The Grounder's text encoder for sentences whose features the shards already hold: the exact
    vectors the evaluation scored, and no text model to load."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, sentences: list[str]) -> np.ndarray:
        return np.stack([self.vectors[s] for s in sentences]).astype(np.float32)


def shard_queries(shards: str, query_ids: set) -> dict:
    """query_id -> (video features, text features, meta) for the wanted queries; stops once all are found."""
    from .data.loader import ShardSource, expand_queries
    from .data.shards import iter_shard

    src = ShardSource.open(shards)
    found: dict = {}
    for url in src.urls:
        for q in expand_queries(iter_shard(url, src.manifest, None)):
            if q["meta"]["query_id"] in query_ids:
                found[q["meta"]["query_id"]] = (np.asarray(q["video"]), np.asarray(q["text"]), q["meta"])
        if len(found) == len(query_ids):
            break
    return found


def ground_examples(checkpoint: str, shards: str, examples: Sequence[Example], device=None,
                    chunk_consistency: float | None = None, ranking: dict | None = None) -> dict:
    """query_id -> (Grounder result with φ, α and candidate scores; truth spans in seconds; meta).
    `chunk_consistency`: the DiDeMo ranking weight evaluate used (None: the checkpoint's own); `ranking`: the
    scale-calibration overrides evaluate used (keys mode, contrast_weight, span_threshold, span_band; None: the checkpoint's)."""
    from .ground import load_model

    g = load_model(checkpoint, str(device) if device is not None else None)
    if chunk_consistency is not None:
        g.model.chunk_consistency = float(chunk_consistency)
    if ranking and any(v is not None for v in ranking.values()):
        from .evaluation.calibration import attach

        attach(g.model, checkpoint, g.device, **ranking)
    found = shard_queries(shards, {e.query_id for e in examples})
    g._encoder = _ShardText({m["sentence"].strip(): txt for _, txt, m in found.values()})
    out = {}
    didemo = g.info.get("benchmark") == "didemo"
    for qid, (video, _, meta) in found.items():  # shards store each video unpadded: no mask needed
        try:
            res = g.ground(video, [meta["sentence"]], float(meta["duration"]), TOP_K)[0]
        except ValueError as e:  # DataError (e.g. an empty sentence): that card becomes a note
            out[qid] = str(e)
            continue
        out[qid] = (res, truth_seconds(meta, didemo), meta)
    return out


def truth_seconds(meta: dict, didemo: bool) -> list[tuple[float, float]]:
    """Ground truth in seconds: DiDeMo's annotator chunk pairs on the 5 s grid, Charades-STA's span."""
    if didemo:
        dur = float(meta["duration"])
        return [(5.0 * s, min(5.0 * (e + 1), dur)) for s, e in meta["times"]]
    return [(float(s), float(e)) for s, e in meta["times"][:1]]


def _gallery_section(protocol: str, predictions: Sequence[dict], truth: Sequence[dict], checkpoints: Sequence[str],
                     shards: Sequence[str], device, per_group: int, notes: list[str],
                     chunk_consistency: float | None = None, ranking: dict | None = None) -> str:
    from .figures import grounding_figure

    picked = pick_examples(top1_ious(protocol, predictions, truth), per_group)
    if not picked:
        return _note("no scored queries to show.", notes)
    drawn = ground_examples(checkpoints[0], shards[0], picked, device, chunk_consistency, ranking)
    intro = (f"{len(picked)} of the {len(truth)} queries: the best, typical (nearest the median) and worst by the "
             "IoU of the evaluated top-1 moment with the ground truth. Each figure shows φ per "
             + ("chunk" if protocol == "didemo" else "snippet")
             + " (one y-range per figure), α as a strip under it (coloured over its own range, printed on the "
             "right), the top-3 moments as bars labelled with their scores and the ground truth hatched"
             + ("; on the right the " + ("φ" if not chunk_consistency else
                                          f"ranking score (chunk consistency μ {chunk_consistency:g})")
                + " of all 21 candidates, start chunk × end chunk, rank-1 framed in orange"
                if protocol == "didemo" else "") + ".")
    if len(checkpoints) > 1:
        intro += (f" Late fusion of {len(checkpoints)} checkpoints: the IoU is the fused ranking's, the figures "
                  f"show {checkpoints[0]}.")
    cards = []
    for ex in picked:
        if not isinstance(drawn.get(ex.query_id), tuple):
            why = drawn.get(ex.query_id, f"not found in {shards[0]}")
            cards.append(_note(f"query {ex.query_id} ({ex.group}): {why}", notes))
            continue
        res, spans, meta = drawn[ex.query_id]
        fig = grounding_figure([res], [spans], protocol, TOP_K, titles=False, legend=False)
        cards.append(_card(ex, res, spans, meta, protocol, _img(fig, f"grounding of: {meta['sentence']}")))
    return f'<p class="caption">{escape(intro)}</p>{LEGEND}<div class="grid">{"".join(cards)}</div>'


LEGEND = ('<div class="legend"><span><i class="sw" style="background:#0b4f8a"></i>φ: the scores moments '
          'are ranked from</span><span><i class="sw" style="background:linear-gradient(90deg,#f2f0f7,#3f007d)"></i>α: '
          'referring attention</span><span><i class="sw" style="background:#d55e00"></i>rank-1 moment</span>'
          '<span><i class="sw" style="background:#e69f00"></i>ranks 2-3</span><span><i class="sw hatch"></i>ground '
          'truth</span></div>')


def _card(ex: Example, res: dict, spans, meta: dict, protocol: str, img: str) -> str:
    if protocol == "didemo":
        s, e = ex.top1
        end = min(5 * (e + 1), float(meta["duration"]))
        top1 = (f"chunk {s}" if s == e else f"chunks {s}–{e}") + f" ({5 * s}–{end:g} s)"
        gt = ", ".join(sorted({f"{a:g}–{b:g} s" for a, b in spans}))
    else:
        top1 = f"{ex.top1[0]:.1f}–{ex.top1[1]:.1f} s"
        gt = ", ".join(f"{a:.1f}–{b:.1f} s" for a, b in spans)
    facts = [("top-1", top1), ("score", f"{ex.score:.4f}"), ("truth", gt), ("video", str(meta["video"])),
             ("query", str(ex.query_id))]
    if not np.allclose(res["moments"][0], _evaluated_seconds(ex, meta, protocol), atol=0.01):  # a near tie
        facts.append(("note", "the figure's rank-1 differs from the evaluated one (a near tie)"))
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)
    what = "mean of the 3 best annotators" if protocol == "didemo" else "with the annotated span"
    return (f'<figure class="card"><figcaption><span class="tag {escape(ex.group)}">{escape(ex.group)}</span>'
            f'<div class="sentence">{escape(meta["sentence"])}</div><dl class="facts">{dl}</dl>'
            f'<div class="iou">{ex.iou:.2f}<small>top-1 IoU ({escape(what)})</small></div></figcaption>{img}</figure>')


def _evaluated_seconds(ex: Example, meta: dict, protocol: str) -> tuple[float, float]:
    """The evaluated top-1 in seconds (the Grounder reports DiDeMo moments in seconds too)."""
    if protocol == "didemo":
        s, e = ex.top1
        return 5.0 * s, min(5.0 * (e + 1), float(meta["duration"]))
    return float(ex.top1[0]), float(ex.top1[1])
