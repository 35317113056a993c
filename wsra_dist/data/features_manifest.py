"""The manifest `wsra-dist features` writes beside the features, and what `shard` carries from it.

Where it lives (one rule for every layout, so a reader finds it from the path it was given):
  * a features folder (`charades` layout: `OUT/{stem}.npy`)  -> `OUT/manifest.json`
  * a features file (`didemo`, `activitynet`: one HDF5 at OUT) -> `OUT.manifest.json` (e.g. `flow.h5.manifest.json`)

Its `extractor` dict says how the features were made (model and weights sha256, fps, pooling, frames per
snippet, layout, dim); `shard` copies it into the shard manifest (key `extractor`) and the trainer into the
checkpoint, so that `wsra-dist ground --video` can make the same features from a raw video.  Plain json and
paths only here: `data/` imports no decoder and no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from .records import DataError

FORMAT = "wsra-dist-features/1"
FOLDER_MANIFEST = "manifest.json"
# The fields that decide whether two extractors make the same features (paths and names do not).
IDENTITY_KEYS = ("kind", "weights_sha256", "pooling", "fps", "frames_per_snippet", "layout", "dim")


def manifest_path(features: str | Path) -> Path:
    """Where the features manifest of `features` (a folder or a file) is, whether or not it exists."""
    p = Path(features)
    return p / FOLDER_MANIFEST if p.is_dir() else p.with_name(p.name + ".manifest.json")


def read_manifest(features: str | Path) -> dict | None:
    """The features manifest beside `features`, or None when there is none (official feature files)."""
    path = manifest_path(features)
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: features manifest is not readable JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        if Path(features).is_dir() and isinstance(m, dict) and "format" in m:
            return None  # another tool's manifest.json in a features folder: not ours, nothing to carry
        raise DataError(f"{path}: not a features manifest of format {FORMAT} (found {m.get('format') if isinstance(m, dict) else m!r})")
    if not isinstance(m.get("extractor"), dict) or not isinstance(m.get("videos"), dict):
        raise DataError(f"{path}: features manifest without 'extractor' or 'videos'")
    return m


def identity(extractor: dict) -> dict:
    """The part of an extractor record that two runs must share to give the same features."""
    if isinstance(extractor.get("concat"), list):
        return {"concat": [identity(e) for e in extractor["concat"]]}
    return {k: extractor.get(k) for k in IDENTITY_KEYS}


def same_extractor(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and identity(a) == identity(b)


def describe_extractor(e: dict) -> str:
    """One short line, e.g. `pixels (48-d, area4x4) at 2.0 fps, charades layout`."""
    if isinstance(e.get("concat"), list):
        return " + ".join(describe_extractor(x) for x in e["concat"])
    model = e.get("model", "?")
    extra = f", weights sha256 {str(e['weights_sha256'])[:12]}" if e.get("weights_sha256") else ""
    k = f", {e['frames_per_snippet']} frames per snippet" if e.get("frames_per_snippet") else ""
    return f"{model} ({e.get('dim')}-d, {e.get('pooling')}{extra}) at {e.get('fps')} fps{k}, {e.get('layout')} layout"


def extractor_for(features: Sequence[str | Path], videos: Iterable[str]) -> dict | None:
    """The `extractor` a shard manifest records for these feature sources, or None.

    One source with a manifest: its extractor dict.  Several sources (DiDeMo modalities side by side), all
    with manifests: {"concat": [extractor, ...]} in source order.  A source without a manifest (official
    features) means no extractor is recorded.  A sharded video that the manifest does not list was not
    written by that extraction (a file copied in by hand, or from another model): refused, since the
    recorded extractor would then lie about it.  Used by `shard didemo`, `shard charades` (and any other
    benchmark's shard command: call it with the feature paths and the video keys it reads)."""
    manifests = [(Path(f), read_manifest(f)) for f in features]
    if not manifests or any(m is None for _, m in manifests):
        return None
    keys = sorted(set(videos))
    for f, m in manifests:
        missing = [v for v in keys if v not in m["videos"]]
        if missing:
            raise DataError(f"{f}: {len(missing)} video(s) (e.g. {missing[0]!r}) are not listed in its features manifest "
                            f"{manifest_path(f)}: they were not written by that `wsra-dist features` run; re-run "
                            "`wsra-dist features` into this output (it extracts only what is missing) or remove them")
    ex = [dict(m["extractor"]) for _, m in manifests]
    return ex[0] if len(ex) == 1 else {"concat": ex}
