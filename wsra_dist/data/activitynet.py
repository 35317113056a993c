"""ActivityNet Captions: the release JSON `{video: {duration, timestamps, sentences}}` and the official C3D
features `sub_activitynet_v1-3.c3d.hdf5` (one group per video holding `c3d_features` (T, 500)).

Snippet k of a video covers [k, k+1) * duration / T, as for Charades-STA: the rows of the C3D release are
one per 8 frames, and T * 8 / fps differs from the duration by a fraction of a second, so the snippets
are spread uniformly over the annotated duration (what CPL and the other weakly-supervised codes do).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path

import numpy as np

from .charades import SnippetFeatures
from .records import DataError, QueryRecord
from .textio import read_text

FILTERS = ("clamp", "strict")
FEATURE_DATASET = "c3d_features"


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _load(path: Path) -> dict:
    text = read_text(path, "annotations")
    top: list = []  # the pairs of the last object closed: the top-level one (json.loads keeps a key's last value)

    def keep_pairs(pairs: list) -> dict:
        top[:] = [pairs]
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=keep_pairs)  # a dict keeps the file's order: query ids follow it
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected one JSON object {{video: {{duration, timestamps, sentences}}}}, "
                        f"got a {type(data).__name__}")
    _refuse_conflicting_videos(path, text, top[0])
    return data


def _refuse_conflicting_videos(path: Path, text: str, pairs: list) -> None:
    """A video listed twice with different entries: refused naming both places (JSON would keep the last one
    silently); the same entry twice is accepted."""
    first: dict = {}
    for vid, entry in pairs:
        if vid in first and first[vid] != entry:
            where = " and ".join(_key_places(text, vid)[:2]) or "two places"
            raise DataError(f"{path}: {where}: video {vid!r} is listed twice with different entries; keep one")
        first.setdefault(vid, entry)


def _key_places(text: str, key: str) -> list[str]:
    """'line L, column C' of each place `key` appears as an object key (the release files are one line long)."""
    out = []
    for m in re.finditer(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text):
        start = m.start()
        line, column = text.count("\n", 0, start) + 1, start - text.rfind("\n", 0, start)
        out.append(f"line {line}, column {column}")
    return out


def _check_video(path: Path, vid: str, entry: object) -> tuple[float, list, list]:
    """(duration, timestamps, sentences) of one video entry, or DataError naming the file and video."""
    if not isinstance(entry, dict) or not {"duration", "timestamps", "sentences"} <= set(entry):
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{path}: video {vid!r}: needs keys 'duration', 'timestamps', 'sentences', got {keys}")
    d, ts, ss = entry["duration"], entry["timestamps"], entry["sentences"]
    if not (_is_number(d) and math.isfinite(d) and d > 0):  # NaN would reach the shards and the loss
        raise DataError(f"{path}: video {vid!r}: duration {d!r} is not a positive number of seconds")
    if not isinstance(ts, list) or not isinstance(ss, list):
        raise DataError(f"{path}: video {vid!r}: 'timestamps' and 'sentences' must be lists")
    if len(ts) != len(ss):
        raise DataError(f"{path}: video {vid!r}: {len(ts)} timestamps but {len(ss)} sentences")
    return float(d), ts, ss


def read_annotations(path: str | Path, rule: str = "clamp",
                     dropped: dict[int, str] | None = None) -> tuple[list[QueryRecord], dict[str, int]]:
    """Parse one split's JSON and apply the defect rule.

    clamp (default): times clipped into [0, duration] (the real files have ends past the duration:
    261 / 134 / 111 in train / val_1 / val_2), then start >= end dropped (4 in train).
    strict: only 0 <= start < end <= duration is kept.
    query_id is the running index over the videos in file order and their sentences in order, assigned
    before the rule drops anything, so a query keeps its id under both rules (and prediction files of
    either rule name the same queries).  record.extra['sentence'] is the sentence's index in its video.
    Sentences keep their text; the leading space of the release is stripped (as the text encoder would).
    `dropped`, when given, is filled with {query_id: the stats key of why the rule dropped it}.
    """
    if rule not in FILTERS:
        raise DataError(f"activitynet filter must be one of {FILTERS}, got {rule!r}")
    path = Path(path)
    data = _load(path)
    out: list[QueryRecord] = []
    stats = {"videos": 0, "sentences": 0, "clamped": 0, "dropped_start_ge_end": 0, "dropped_past_end": 0,
             "dropped_before_start": 0}
    qid = -1
    for vid, entry in data.items():
        duration, ts, ss = _check_video(path, vid, entry)
        stats["videos"] += 1
        for k, (t, sentence) in enumerate(zip(ts, ss)):
            qid += 1
            stats["sentences"] += 1
            where = f"{path}: video {vid!r} sentence {k}"
            if not isinstance(t, list) or len(t) != 2 or not all(map(_is_number, t)):
                raise DataError(f"{where}: timestamp {t!r} is not a [start, end] pair of numbers")
            s, e = float(t[0]), float(t[1])
            if not (math.isfinite(s) and math.isfinite(e)):
                raise DataError(f"{where}: timestamp {t!r} is not finite")
            if not isinstance(sentence, str) or not sentence.strip():
                raise DataError(f"{where}: empty or non-text sentence {sentence!r}")
            if rule == "clamp" and (e > duration or s < 0):
                stats["clamped"] += 1
            s, e, why = _defect(rule, s, e, duration)
            if why is not None:
                stats[why] += 1
                if dropped is not None:
                    dropped[qid] = why
                continue
            out.append(QueryRecord(query_id=qid, video=vid, sentence=sentence.strip(), times=[[s, e]],
                                   duration=duration, extra={"sentence": k}))
    stats["kept"] = len(out)
    return out, stats


def _defect(rule: str, s: float, e: float, duration: float) -> tuple[float, float, str | None]:
    """(start, end after the rule, None or the stats key of why the rule drops the sentence)."""
    if rule == "strict":
        why = ("dropped_start_ge_end" if not s < e else "dropped_past_end" if e > duration
               else "dropped_before_start" if s < 0 else None)
        return s, e, why
    s, e = max(s, 0.0), min(e, duration)
    return s, e, ("dropped_start_ge_end" if s >= e else None)


class C3DFeatures(SnippetFeatures):
    """`sub_activitynet_v1-3.c3d.hdf5`: group `v_...` / dataset `c3d_features` (T, D); a file holding one
    dataset per video (as some repos repack it) is read too.  Checks (shape, dtype, NaN) are Charades-STA's."""

    def __init__(self, source: str | Path):
        if Path(source).is_dir():
            raise DataError(f"{source}: ActivityNet features are one HDF5 file (sub_activitynet_v1-3.c3d.hdf5), "
                            "not a folder")
        super().__init__(source)

    def where(self, vid: str) -> str:
        return f"{self.source}:{vid}/{FEATURE_DATASET}"

    def _raw(self, vid: str) -> np.ndarray:
        import h5py

        node = self.h5[vid]
        if isinstance(node, h5py.Group):
            if FEATURE_DATASET not in node:
                raise KeyError(f"group {vid!r} has no dataset {FEATURE_DATASET!r} (holds {sorted(node)})")
            node = node[FEATURE_DATASET]
        return np.asarray(node[()])
