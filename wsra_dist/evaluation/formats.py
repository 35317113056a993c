"""Prediction lines: this toolkit's native JSONL <-> moment_detr / lighthouse JSONL, per protocol.

Native lines rank moments in the protocol's own units under its own id key::

    DiDeMo        {"annotation_id": 7, "moments": [[s, e], ...]}       inclusive chunk indices 0..5
    Charades-STA  {"query_id": 12, "moments": [[start, end], ...]}     seconds
    ActivityNet   {"query_id": 12, "video": "v_...", "moments": [[start, end], ...]}   seconds

moment_detr / lighthouse lines rank windows in seconds, best first (the score is carried along, the
list order is what counts)::

    {"qid": 7, "query": "...", "vid": "...", "pred_relevant_windows": [[start, end, score], ...]}

A protocol is one `Protocol` entry (its native id key and moment <-> window mapping): ActivityNet Captions
(`query_id` = the running index over the split's videos and sentences) is Charades-STA's mapping again.
Everything here is pure: no files are read; callers add the file and line to the DataErrors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from ..data.records import DataError
from ..geometry import DIDEMO_CANDIDATES

NATIVE, MOMENT_DETR = "native", "moment_detr"
MD_ID, MD_WINDOWS, MD_QUERY, MD_VIDEO = "qid", "pred_relevant_windows", "query", "vid"
CHUNK_SECONDS = 5.0
GRID_TOLERANCE = 1e-6  # seconds: float noise of tools that computed 5 * chunk in float32 or via division


@dataclass(frozen=True)
class Protocol:
    name: str
    id_key: str  # the native line's id key; moment_detr's `qid` maps onto it
    to_window: Callable[[Sequence], tuple[float, float]]  # native moment -> (start, end) in seconds
    from_window: Callable[[float, float], list]  # (start, end) in seconds -> native moment; ValueError if none


def _didemo_to_window(m: Sequence) -> tuple[float, float]:
    # chunk k covers [5k, 5(k+1)) seconds, and DiDeMo's pairs are inclusive
    return CHUNK_SECONDS * int(m[0]), CHUNK_SECONDS * (int(m[1]) + 1)


def _on_grid(t: float) -> int | None:
    k = round(t / CHUNK_SECONDS) if math.isfinite(t) else None
    return k if k is not None and abs(t - CHUNK_SECONDS * k) <= GRID_TOLERANCE else None


def _didemo_from_window(start: float, end: float) -> list[int]:
    s, e1 = _on_grid(start), _on_grid(end)
    if s is None or e1 is None:
        raise ValueError("not on DiDeMo's 5-second grid (a candidate (s, e) is the window [5s, 5(e+1)] seconds)")
    if (s, e1 - 1) not in _CANDIDATES:
        raise ValueError(f"chunks ({s}, {e1 - 1}) are not one of DiDeMo's 21 candidates (0 <= s <= e <= 5)")
    return [s, e1 - 1]


def _seconds_to_window(m: Sequence) -> tuple[float, float]:
    return float(m[0]), float(m[1])


def _seconds_from_window(start: float, end: float) -> list[float]:
    return [start, end]  # range and order are checked by the protocol's scorer, as for native lines


_CANDIDATES = set(DIDEMO_CANDIDATES)
PROTOCOLS: dict[str, Protocol] = {
    "didemo": Protocol("didemo", "annotation_id", _didemo_to_window, _didemo_from_window),
    "charades": Protocol("charades", "query_id", _seconds_to_window, _seconds_from_window),
    # seconds like Charades-STA; qid = query_id, the running index over the split's videos and sentences
    "activitynet": Protocol("activitynet", "query_id", _seconds_to_window, _seconds_from_window),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise DataError(f"no prediction format mapping for protocol {name!r} (known: {sorted(PROTOCOLS)})")
    return PROTOCOLS[name]


def format_name(fmt: str, proto: str) -> str:
    """How a format is named in messages: its name and identifying keys."""
    if fmt == MOMENT_DETR:
        return f"moment_detr ({MD_ID!r}, {MD_WINDOWS!r})"
    return f"native ({protocol(proto).id_key!r}, 'moments')"


def detect(obj: object, proto: str) -> str:
    """NATIVE or MOMENT_DETR, by the line's keys; DataError when it has neither or keys of both."""
    if not isinstance(obj, dict):
        raise DataError(f"not a JSON object; a line needs keys {format_name(NATIVE, proto)} or "
                        f"{format_name(MOMENT_DETR, proto)}")
    md = [k for k in (MD_ID, MD_WINDOWS) if k in obj]
    native = [k for k in (protocol(proto).id_key, "moments") if k in obj]
    if md and native:
        raise DataError(f"holds keys of both formats ({', '.join(map(repr, native + md))}); a line is either "
                        f"{format_name(NATIVE, proto)} or {format_name(MOMENT_DETR, proto)}")
    if md:
        return MOMENT_DETR
    if native:
        return NATIVE
    raise DataError(f"needs keys {format_name(NATIVE, proto)} or {format_name(MOMENT_DETR, proto)}")


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_md_shape(obj: dict) -> None:
    for k in (MD_ID, MD_WINDOWS):
        if k not in obj:
            raise DataError(f"moment_detr line needs keys {MD_ID!r} and {MD_WINDOWS!r}; {k!r} is missing")
    if not isinstance(obj[MD_ID], int) or isinstance(obj[MD_ID], bool):
        raise DataError(f"{MD_ID} must be an integer, got {obj[MD_ID]!r}")
    w = obj[MD_WINDOWS]
    if not isinstance(w, list) or not w or not all(isinstance(x, list) and len(x) == 3 and all(map(_is_number, x))
                                                   for x in w):
        raise DataError(f"{MD_WINDOWS!r} must be a non-empty list of [start, end, score] numbers (seconds)")
    for k in (MD_VIDEO, MD_QUERY):
        if k in obj and not isinstance(obj[k], str):
            raise DataError(f"{k!r} must be a string, got {obj[k]!r}")


def from_md(obj: dict, proto: str) -> tuple[dict, str | None]:
    """A moment_detr line -> (native prediction dict, problem or None).

    Malformed lines (missing key, non-integer qid, windows that are not [start, end, score] numbers) raise
    DataError; windows the protocol cannot map (DiDeMo: off the 5-second grid or not a candidate) are
    returned as the problem, to be reported with the other invalid lines.  The native dict keeps the
    window order, the scores, and `vid` / `query` as 'video' / 'query' when given."""
    _check_md_shape(obj)
    p = protocol(proto)
    moments, bad = [], []
    for k, (start, end, _) in enumerate(obj[MD_WINDOWS]):
        try:
            moments.append(p.from_window(float(start), float(end)))
        except ValueError as e:
            bad.append(f"window {k + 1} {[start, end]!r}: {e}")
    native = {p.id_key: obj[MD_ID], "moments": moments if not bad else [],
              "scores": [w[2] for w in obj[MD_WINDOWS]]}
    if obj.get(MD_VIDEO):
        native["video"] = obj[MD_VIDEO]
    if obj.get(MD_QUERY):
        native["query"] = obj[MD_QUERY]
    why = None
    if bad:
        why = f"{len(bad)} window(s) cannot be mapped to {proto} moments: " + "; ".join(bad[:3])
    return native, why


def rank_scores(n: int) -> list[float]:
    """Decreasing scores 1, (n-1)/n, ..., 1/n for a ranking that carries no scores of its own."""
    return [1.0 - k / n for k in range(n)]


def _usable(scores: object, n: int) -> bool:
    # consumers of this format (moment_detr's mAP) may re-sort by score, so only best-first finite scores keep
    # the ranking; anything else is replaced by rank_scores
    return (isinstance(scores, (list, tuple)) and len(scores) == n and all(_is_number(s) and math.isfinite(s)
                                                                           for s in scores)
            and all(a >= b for a, b in zip(scores, scores[1:])))


def scored_windows(windows: Sequence[Sequence[float]], scores: Sequence[float] | None = None) -> list[list[float]]:
    """[[start, end, score], ...] in the given (best-first) order: `scores` when they are finite and
    non-increasing, else rank_scores."""
    n = len(windows)
    sc = list(scores) if scores is not None else None
    sc = sc if _usable(sc, n) else rank_scores(n)
    return [[float(w[0]), float(w[1]), float(s)] for w, s in zip(windows, sc)]


def to_md(pred: dict, proto: str, query: str | None = None, vid: str | None = None) -> dict:
    """A native prediction dict -> a moment_detr line (dict).  `query` / `vid` default to the prediction's
    own 'query' / 'video' (empty when it has none)."""
    p = protocol(proto)
    windows = [p.to_window(m) for m in pred["moments"]]
    return {MD_ID: pred[p.id_key], MD_QUERY: query if query is not None else pred.get("query", ""),
            MD_VIDEO: vid if vid is not None else pred.get("video", ""),
            MD_WINDOWS: scored_windows(windows, pred.get("scores"))}
