"""Figures: grounding (the paper's Figure 7), learning curves and the K sweep.

Everything draws on a bare `matplotlib.figure.Figure` (Agg canvas, no pyplot): no global backend state
is changed, so these are safe to call from a CLI, a test or the report builder.  matplotlib is imported
inside the functions, so `import wsra_dist.figures` stays cheap.

A grounding result is the dict `Grounder.ground` returns: "query", "moments"/"scores" (top-k, seconds),
"phi" (φ per snippet or DiDeMo chunk), "alpha" (referring attention α over the same), "snippet_times"
(T, 2) seconds, and "candidate_moments"/"candidate_scores" (every candidate the model ranks, in
candidate order: DiDeMo's 21 chunk pairs, or the proportional windows).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

Span = tuple[float, float]

# One palette for every figure (colour-blind safe: Okabe-Ito).
PHI = "#0b4f8a"
RANK = ("#d55e00", "#e69f00", "#f0c36d", "#f5d9a6", "#f8e8cc")
TRUTH = "#009e73"
GRID = "#e3e3e3"
ALPHA_CMAP = "Purples"
MAP_CMAP = "YlGnBu"
FORMATS = (".png", ".pdf", ".svg")

_RC = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "xtick.labelsize": 8, "ytick.labelsize": 8,
       "legend.fontsize": 8, "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42,
       "svg.fonttype": "path", "axes.edgecolor": "#555555", "xtick.color": "#333333", "ytick.color": "#333333"}


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    # constrained layout keeps titles, labels and the legend outside the data without hand-tuned offsets
    return Figure(figsize=(width, height), layout="constrained")


def _truth_list(t) -> list[Span]:
    """None, one (start, end) span, or several (DiDeMo annotators) -> distinct spans."""
    if t is None:
        return []
    if len(t) == 2 and np.isscalar(t[0]):
        t = [t]
    out: list[Span] = []
    for s, e in t:
        if (float(s), float(e)) not in out:
            out.append((float(s), float(e)))
    return out


def _is_didemo(r: dict, benchmark: str | None) -> bool:
    if benchmark is not None:
        return benchmark == "didemo"
    return len(r.get("candidate_scores", [])) == 21 and len(r.get("phi", [])) == 6


def _phi_limits(results: Sequence[dict], headroom: float) -> tuple[float, float]:
    """One tight y-range for all queries of a figure, so their φ curves compare at a glance
    (`headroom`: a fraction of the range kept free above, for printed values)."""
    vals = np.concatenate([_timeline(r)[1] for r in results])
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(0.08 * (hi - lo), 0.002)
    return lo - pad, hi + pad + headroom * (hi - lo)


def _timeline(r: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times (T, 2), φ, α) of the snippets/chunks that lie inside the video: a 25 s DiDeMo video's 6th
    chunk has zero length (it is still ranked, so the candidate map keeps it)."""
    t = np.asarray(r["snippet_times"], dtype=float)
    keep = t[:, 1] > t[:, 0]
    keep = keep if keep.any() else np.ones(len(t), dtype=bool)
    return t[keep], np.asarray(r["phi"], dtype=float)[keep], np.asarray(r["alpha"], dtype=float)[keep]


def _decimals(vals, lo: int = 2, hi: int = 4) -> int:
    """Fewest decimals (lo..hi) that keep distinct values distinct: trained φ are often 0.50x apart."""
    vals = [float(v) for v in vals]
    for d in range(lo, hi + 1):
        if len({f"{v:.{d}f}" for v in vals}) == len(set(vals)):
            return d
    return hi


def _draw_phi(ax, r: dict, ylim: tuple[float, float], didemo: bool, truths: list[Span]) -> None:
    t, phi, _ = _timeline(r)
    s, e = r["moments"][0]
    ax.axvspan(s, e, color=RANK[0], alpha=0.12, lw=0, zorder=0)
    for ts, te in truths:  # ground truth: hatched, behind the data
        ax.axvspan(ts, te, facecolor="none", hatch="////", edgecolor=TRUTH, alpha=0.35, lw=0, zorder=0)
    if didemo:  # 6 chunks: discrete bars, values printed (they differ in the 2nd-3rd decimal)
        d = _decimals(phi, 3, 4)
        ax.bar(t.mean(1), phi - ylim[0], bottom=ylim[0], width=(t[:, 1] - t[:, 0]) * 0.8, color=PHI, alpha=0.9,
               zorder=2)
        for x, v in zip(t.mean(1), phi):
            ax.text(x, v, f"{v:.{d}f}", ha="center", va="bottom", fontsize=7, color="#333333", zorder=3)
    else:
        edges = np.append(t[:, 0], t[-1, 1])  # a step line: no fill, which would tint the shaded moments
        ax.stairs(phi, edges, baseline=None, color=PHI, lw=1.5, zorder=2)
    ax.set_ylim(*ylim)
    ax.set_xlim(t[0, 0], t[-1, 1])
    ax.set_ylabel("φ per chunk" if didemo else "φ per snippet")
    ax.yaxis.set_major_locator(_locator(3))
    ax.grid(axis="y", color=GRID, lw=0.6, zorder=-1)
    ax.tick_params(axis="x", labelbottom=False, length=0)


def _locator(n: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


def _draw_alpha(ax, cax, r: dict) -> None:
    """α as a heat strip, coloured over each query's own range (printed beside it): α is often nearly uniform."""
    t, _, a = _timeline(r)
    lo, hi = float(a.min()), float(a.max())
    edges = np.append(t[:, 0], t[-1, 1])
    ax.pcolormesh(edges, [0, 1], a[None, :], cmap=ALPHA_CMAP, vmin=lo, vmax=hi if hi > lo else lo + 1e-9,
                         shading="flat", rasterized=True)
    ax.set_yticks([0.5], ["α"])
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_xlim(edges[0], edges[-1])
    cax.set_axis_off()
    d = max(0, 2 - int(np.floor(np.log10(max(abs(hi), 1e-12)))))  # 3 significant digits of the max ...
    while d < 8 and f"{lo:.{d}f}" == f"{hi:.{d}f}" and lo != hi:  # ... or more, until min and max differ
        d += 1
    cax.text(0.0, 0.5, f"{lo:.{d}f}–{hi:.{d}f}", transform=cax.transAxes, ha="left", va="center", fontsize=6.5,
             color="#444444")


def _draw_moments(ax, r: dict, truths: list[Span], top_k: int) -> None:
    """The top-k moments as bars labelled with their scores, one row each (they overlap in time), and truth."""
    t = _timeline(r)[0]
    moments, scores = r["moments"][:top_k], r["scores"][:top_k]
    d = _decimals(scores, 3, 5)
    n = len(moments) + (1 if truths else 0)
    span = t[-1, 1] - t[0, 0]
    for i, ((s, e), sc) in enumerate(zip(moments, scores)):
        y = n - 1 - i
        ax.barh(y, e - s, left=s, height=0.74, color=RANK[min(i, len(RANK) - 1)], lw=0)
        label = f"{sc:.{d}f}"
        if (e - s) > 0.13 * span:
            ax.text((s + e) / 2, y, label, ha="center", va="center", fontsize=7.2,
                    color="white" if i == 0 else "#222222")
        elif e < t[-1, 1] - 0.12 * span:
            ax.text(e + 0.008 * span, y, label, ha="left", va="center", fontsize=7.2, color="#222222")
        else:
            ax.text(s - 0.008 * span, y, label, ha="right", va="center", fontsize=7.2, color="#222222")
    for s, e in truths:
        ax.barh(0, e - s, left=s, height=0.74, facecolor="white", hatch="////", edgecolor=TRUTH, lw=0.8)
    labels = [f"#{i + 1}" for i in range(len(moments))] + (["truth"] if truths else [])
    ax.set_yticks(range(n)[::-1], labels)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(t[0, 0], t[-1, 1])
    ax.set_xlabel("time (s)")
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0, labelsize=7.2)


def _draw_candidate_map(ax, r: dict, vlim: tuple[float, float], truths_chunks: list[tuple[int, int]]) -> None:
    """DiDeMo's 21 candidate scores as a 6 x 6 upper triangle: row = start chunk, column = end chunk."""
    from matplotlib.patches import Rectangle

    from .geometry import DIDEMO_CANDIDATES

    grid = np.full((6, 6), np.nan)
    for (s, e), v in zip(DIDEMO_CANDIDATES, r["candidate_scores"]):
        grid[s, e] = v
    ax.imshow(grid, cmap=MAP_CMAP, vmin=vlim[0], vmax=vlim[1], origin="upper")
    d = _decimals(r["candidate_scores"], 2, 3)
    mid = vlim[0] + 0.6 * (vlim[1] - vlim[0])
    for s in range(6):
        for e in range(s, 6):
            ax.text(e, s, f"{grid[s, e]:.{d}f}"[1:] if d == 3 else f"{grid[s, e]:.{d}f}", ha="center", va="center",
                    fontsize=6.2, color="white" if grid[s, e] > mid else "#222222")
    for s, e in truths_chunks:
        ax.add_patch(Rectangle((e - 0.5, s - 0.5), 1, 1, fill=False, ec=TRUTH, lw=0, hatch="////", alpha=0.8))
        ax.add_patch(Rectangle((e - 0.46, s - 0.46), 0.92, 0.92, fill=False, ec=TRUTH, lw=1.2))
    ts, te = divmod(int(np.nanargmax(grid)), 6)
    ax.add_patch(Rectangle((te - 0.5, ts - 0.5), 1, 1, fill=False, ec=RANK[0], lw=2.2))
    ax.set_xticks(range(6))
    ax.set_yticks(range(6))
    ax.set_xlabel("end chunk", labelpad=1)
    ax.set_ylabel("start chunk", labelpad=1)
    ax.tick_params(length=0, pad=1.5, labelsize=7)
    for sp in ax.spines.values():
        sp.set_visible(False)
    mu = float(r.get("chunk_consistency") or 0.0)  # ranked by φ alone, or by the chunk-consistency rule
    ax.set_title("φ of the 21 candidates" if not mu else f"ranking score (μ {mu:g})",
                 fontsize=7.5, pad=3)


def _chunk_pairs(spans: list[Span]) -> list[tuple[int, int]]:
    """Seconds spans on the 5 s DiDeMo grid -> inclusive chunk pairs (for the candidate map)."""
    out = []
    for s, e in spans:
        a, b = int(round(s / 5.0)), int(np.ceil(e / 5.0 - 1e-6)) - 1
        if 0 <= a <= b <= 5:
            out.append((a, b))
    return out


def _legend(fig, didemo: bool, has_truth: bool, top_k: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    phi = "φ: the scores moments are ranked from"
    handles = [Patch(color=PHI, alpha=0.9, label=phi) if didemo else Line2D([], [], color=PHI, lw=1.5, label=phi),
               Patch(facecolor="#6a51a3", label="α: referring attention (own range)"),
               Patch(color=RANK[0], label="rank-1 moment")]
    if top_k > 1:
        handles.append(Patch(color=RANK[1], label=f"ranks 2-{top_k}" if top_k > 2 else "rank 2"))
    if has_truth:
        handles.append(Patch(facecolor="white", hatch="////", edgecolor=TRUTH, label="ground truth"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), frameon=False, handlelength=1.3,
               columnspacing=1.1, fontsize=7.3)


def grounding_figure(results: Sequence[dict], truths: Sequence | None = None, benchmark: str | None = None,
                     top_k: int = 3, width: float = 7.2, titles: bool = True, legend: bool = True):
    """The grounding figure for one video's queries -> a matplotlib Figure.

    Per query: φ per snippet (one y-range shared by all queries), α as a heat strip under it, the top-k
    moments as bars labelled with their scores, the ground truth hatched; for DiDeMo also the 21-candidate
    score map (start chunk x end chunk).  `truths`: per query None, (start, end) or a list of spans (s)."""
    import matplotlib

    if not results:
        raise ValueError("no grounding results to draw")
    with matplotlib.rc_context(_RC):
        return _grounding_figure(list(results), list(truths or []), benchmark, max(1, int(top_k)), width, titles,
                                 legend)


def _grounding_figure(results, truths, benchmark, top_k, width, titles, legend):
    didemo = _is_didemo(results[0], benchmark)
    spans = [_truth_list(truths[i]) if i < len(truths) else [] for i in range(len(results))]
    has_truth = any(spans)
    k = min(top_k, min(len(r["moments"]) for r in results))
    ylim = _phi_limits(results, 0.22 if didemo else 0.0)
    rows = k + (1 if has_truth else 0)
    heights = [1.0 if didemo else 0.9, 0.2, 0.17 * rows + 0.05]
    per_query = sum(heights) + 0.45 + (0.3 if titles else 0.0)
    fig = _new_figure(width, (0.35 if legend else 0.05) + per_query * len(results))
    cand = np.concatenate([np.asarray(r.get("candidate_scores", r["phi"]), dtype=float) for r in results])
    vlim = (float(cand.min()), max(float(cand.max()), float(cand.min()) + 1e-6))
    subs = np.atleast_1d(fig.subfigures(len(results), 1, hspace=0.0))
    for sub, r, tr in zip(subs, results, spans):
        cols = [1.0, 0.085] + ([0.36] if didemo else [])
        gs = sub.add_gridspec(3, len(cols), height_ratios=heights, width_ratios=cols, hspace=0.06, wspace=0.02)
        ax_phi, ax_a, ax_m = (sub.add_subplot(gs[j, 0]) for j in range(3))
        _draw_phi(ax_phi, r, ylim, didemo, tr)
        _draw_alpha(ax_a, sub.add_subplot(gs[1, 1]), r)
        _draw_moments(ax_m, r, tr, k)
        ax_m.sharex(ax_phi)
        if didemo and "candidate_scores" in r:
            _draw_candidate_map(sub.add_subplot(gs[:, 2]), r, vlim, _chunk_pairs(tr))
        if titles:
            sub.suptitle(_wrap(r["query"], max(40, int(width * 12))), x=0.01, ha="left", fontsize=9.5, fontweight="bold", color="#111111",
                         parse_math=False)  # a query is text: "$5 and $10" is not mathtext
    if legend:
        _legend(fig, didemo, has_truth, k)
    return fig


def _wrap(text: str, width: int) -> str:
    """At most two lines: a long query would push the panels apart."""
    lines = textwrap.wrap(text, width) or [""]
    return "\n".join(lines[:2]) + (" …" if len(lines) > 2 else "")


def save_figure(fig, path: str | Path, dpi: int = 150) -> None:
    """Write PNG, PDF or SVG by the file extension, atomically (a partial file never has the final name)."""
    path = Path(path)
    fmt = path.suffix.lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: give a .png, .pdf or .svg file name")
    tmp = path.with_name(f".{path.stem}.tmp{fmt}")
    fig.savefig(tmp, format=fmt[1:], dpi=dpi, facecolor="white")
    tmp.replace(path)


def figure_bytes(fig, fmt: str = "png", dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_grounding(results: Sequence[dict], path: str | Path, truths: Sequence | None = None,
                   benchmark: str | None = None, top_k: int | None = None) -> None:
    """`wsra-dist ground --plot FILE`: the grounding figure as PNG, PDF or SVG (by the extension); by
    default as many moments as were asked for (--top-k), at most 5."""
    k = top_k or min(5, min(len(r["moments"]) for r in results))
    save_figure(grounding_figure(results, truths, benchmark, k), path)


# ------------------------------------------------------------------------------------ training curves
def validation_figure(epochs: Sequence[dict], width: float = 9.0):
    """Validation metrics (history.json's "val/..." keys, in %) per epoch -> Figure, or None without any."""
    import matplotlib

    keys = sorted({k for e in epochs for k in e if k.startswith("val/")}, key=_metric_order)
    if not keys:
        return None
    with matplotlib.rc_context(_RC):
        fig = _new_figure(width, 2.9)
        ax = fig.add_subplot()
        for i, k in enumerate(keys):
            pts = [(e["epoch"], e[k]) for e in epochs if isinstance(e.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.6, label=k[4:], color=_SERIES[i % len(_SERIES)])
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation metric (%)")
        ax.xaxis.set_major_locator(_locator(8))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(color=GRID, lw=0.6)
        fig.legend(loc="outside right upper", frameon=False)
        return fig


def loss_figure(series: dict[str, tuple[Sequence[int], Sequence[float]]], epoch_steps: Sequence[int] = (),
                width: float = 9.0, xlabel: str = "step"):
    """One small panel per loss term (their scales differ by orders of magnitude) against the step (or
    epoch); dotted lines at `epoch_steps`.  `series`: term -> (x, values)."""
    import matplotlib

    names = sorted(series, key=lambda n: (n == "total", n))
    if not names:
        return None
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(width, 1.75 * rows + 0.2)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, name in zip(axes, names):
            steps, vals = series[name]
            for st in epoch_steps:
                ax.axvline(st, color="#bbbbbb", lw=0.7, ls=":", zorder=0)
            ax.plot(steps, vals, lw=1.3, color=PHI if name != "total" else "#222222", marker="o" if len(steps) <= 20
                    else None, ms=3)
            ax.set_title(f"L_{name}" if name != "total" else "total loss", loc="left", fontsize=8.5)
            ax.grid(axis="y", color=GRID, lw=0.6)
            ax.yaxis.set_major_locator(_locator(4))
            ax.ticklabel_format(axis="y", useOffset=False)  # plain values: an offset label collides with the title
        for ax in axes[len(names):]:
            ax.set_axis_off()
        for ax in axes[: len(names)]:
            ax.set_xlabel(xlabel, fontsize=7.5)
            ax.xaxis.set_major_locator(_locator(6))
            ax.xaxis.get_major_locator().set_params(integer=True)
        return fig


def k_sweep_figure(rows: Sequence[dict], highlight: tuple[int, int] | None = None, width: float = 6.0):
    """`wsra-dist ablate --study k` results: R@1 against K_top, one line per K_last; this run's K ringed."""
    import matplotlib

    key = "R@1" if "R@1" in rows[0] else next(k for k in ("R@1,IoU=0.7", "R@1,IoU=0.5") if k in rows[0])
    with matplotlib.rc_context(_RC):
        fig = _new_figure(width, 3.0)
        ax = fig.add_subplot()
        for i, kl in enumerate(sorted({r["k_last"] for r in rows})):
            rs = sorted((r for r in rows if r["k_last"] == kl), key=lambda r: r["k_top"])
            ax.plot([r["k_top"] for r in rs], [r[key] for r in rs], marker="o", ms=4, lw=1.6,
                    color=_SERIES[i % len(_SERIES)], label=f"K_last = {kl}")
        hit = [r for r in rows if highlight and (r["k_top"], r["k_last"]) == tuple(highlight)]
        if hit:
            ax.plot(hit[0]["k_top"], hit[0][key], marker="o", ms=12, mfc="none", mec="#111111", mew=1.4, ls="",
                    label="this run's K")
        ax.set_xticks(sorted({r["k_top"] for r in rows}))
        ax.set_xlabel("K_top")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(color=GRID, lw=0.6)
        fig.legend(loc="outside right upper", frameon=False)
        return fig


_SERIES = ("#0b4f8a", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#555555")


def _metric_order(key: str) -> tuple:
    """R@1 before R@5 before mIoU, IoU thresholds ascending."""
    k = key[4:] if key.startswith("val/") else key
    return (k.startswith("mIoU"), k)
