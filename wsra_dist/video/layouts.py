"""The official feature layouts, written so that no reader ever sees half a video.

charades     OUT/{stem}.npy, (T, D) float32, one file per video (OUT is a folder); manifest OUT/manifest.json
didemo       one HDF5 at OUT, a (6, D) float32 dataset per video keyed by its file name (extension included)
activitynet  one HDF5 at OUT, a group per video stem holding the dataset `c3d_features` (T, D) float32
             (manifest of an HDF5: OUT.manifest.json beside it)

Crash safety.  Every per-video file is written under a staging name and renamed when complete.  The HDF5
layouts never write into the live HDF5: each process writes one `.npy` part per video into `OUT.parts/`,
and at the end one process (rank 0, after every process has finished) builds a new HDF5 from the previous
one's datasets plus the parts under a staging name, renames it over OUT, then writes the manifest and
removes the parts.  A run killed at any point leaves OUT as it was or complete (HDF5 files written in
place are unreadable after a kill), and the finished parts are picked up by the next run.

Resuming.  Each process appends one json line per video to `journal-{rank}.jsonl` in the work folder
(`OUT/.wsra-features/` for charades, `OUT.parts/` for the HDF5 layouts) after its output is complete; a
video counts as written when the manifest or a journal lists it with the same source size and mtime and
its output exists.  `extractor.json` in the work folder pins the extractor of an unfinished run, so a run
with another model, fps or layout is refused instead of mixing features.  A video that fails in a run
(listed under `failures`) keeps no features from an earlier run of its old file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
import numpy as np

from ..data.features_manifest import FORMAT, describe_extractor, identity, manifest_path
from ..data.records import DataError
from ..data.shards import atomic_write_text

JOURNAL_GLOB = "journal-*.jsonl"


def _save_npy(path: Path, x: np.ndarray) -> None:
    """Write `path` completely or not at all (staging name in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # the last line of a killed run may be cut
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str):
            out.append(rec)
    return out


class Output:
    """A layout's output: where features go, what is already written, and the final manifest."""

    layout = ""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.manifest = manifest_path(self.out) if self.layout != "charades" else self.out / "manifest.json"

    # where things live --------------------------------------------------------------------------
    @property
    def work(self) -> Path:
        raise NotImplementedError

    def key(self, video: Path) -> str:
        return video.stem

    def has(self, key: str) -> bool:
        raise NotImplementedError

    def write(self, key: str, x: np.ndarray) -> None:
        raise NotImplementedError

    def check_shape(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[0] < 1 or not np.isfinite(x).all():
            raise ValueError(f"features of shape {x.shape} (or not finite)")

    # checks before any work ------------------------------------------------------------------------
    def _old_manifest(self) -> dict | None:
        if not self.manifest.is_file():
            return None
        try:
            m = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"--out {self.out}: its manifest {self.manifest} is not readable JSON ({e}); move it away "
                            "or choose another --out") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("layout") != self.layout:
            raise DataError(f"--out {self.out}: {self.manifest} is not a {self.layout} features manifest of "
                            f"`wsra-dist features` ({FORMAT}); choose another --out")
        return m

    def prepare(self, extractor: dict) -> None:
        """Refuse an --out that holds other features; pin the extractor for this (possibly resumed) run."""
        old = self._old_manifest()
        self._check_foreign(old)
        for where, ex in ((self.manifest, old and old.get("extractor")), (self.work / "extractor.json", self._pinned())):
            if ex and identity(ex) != identity(extractor):
                raise DataError(f"--out {self.out} holds features of another extractor ({describe_extractor(ex)}, "
                                f"recorded in {where}); this run is {describe_extractor(extractor)}: choose another "
                                "--out (features of two extractors must not be mixed)")
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {self.out}: cannot create {self.work}: {e.strerror or e}") from None
        if not (self.work / "extractor.json").is_file():
            atomic_write_text(self.work / "extractor.json", json.dumps(extractor, indent=1))

    def _pinned(self) -> dict | None:
        p = self.work / "extractor.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None

    def _check_foreign(self, old: dict | None) -> None:
        raise NotImplementedError

    # what is written -------------------------------------------------------------------------------
    def records(self) -> dict[str, dict]:
        """Videos written so far: the manifest's, then the journals' (newer) records, keyed by key."""
        old = self._old_manifest()
        recs = {k: v for k, v in (old or {}).get("videos", {}).items() if isinstance(v, dict)}
        for j in sorted(self.work.glob(JOURNAL_GLOB)) if self.work.is_dir() else []:
            for r in _read_jsonl(j):
                if r.get("ok"):
                    recs[r["key"]] = r["record"]
        return recs

    def journal(self, rank: int, entry: dict) -> None:
        with open(self.work / f"journal-{rank}.jsonl", "a") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()

    def journal_failures(self) -> dict[str, dict]:
        fails: dict[str, dict] = {}
        for j in sorted(self.work.glob(JOURNAL_GLOB)) if self.work.is_dir() else []:
            for r in _read_jsonl(j):
                if r.get("ok"):
                    fails.pop(r["key"], None)
                else:
                    fails[r["key"]] = {"path": r.get("path"), "reason": r.get("reason")}
        return fails

    # the end ----------------------------------------------------------------------------------------
    def finalize(self, extractor: dict, failures: dict[str, dict]) -> dict:
        """Assemble (HDF5), then write the manifest, then clear the work folder; returns the manifest."""
        raise NotImplementedError

    def _manifest(self, extractor: dict, videos: dict[str, dict], failures: dict[str, dict]) -> dict:
        from .. import __version__

        dims = {"feature": extractor.get("dim"), "rows": "chunks" if self.layout == "didemo" else "snippets"}
        m = {"format": FORMAT, "layout": self.layout, "output": self.out.name, "extractor": extractor, "dims": dims,
             "num_videos": len(videos), "num_failures": len(failures), "videos": dict(sorted(videos.items())),
             "failures": dict(sorted(failures.items())), "wsra_dist_version": __version__}
        atomic_write_text(self.manifest, json.dumps(m, indent=1))
        return m


class NpyFolder(Output):
    """charades: OUT/{stem}.npy (T, D) float32."""

    layout = "charades"

    @property
    def work(self) -> Path:
        return self.out / ".wsra-features"

    def _check_foreign(self, old: dict | None) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"--out {self.out}: exists and is not a folder (the charades layout writes OUT/{{stem}}.npy)")
        if self.out.is_dir() and old is None and not self.work.is_dir() and any(self.out.glob("*.npy")):
            raise DataError(f"--out {self.out}: holds .npy files that `wsra-dist features` did not write (no "
                            f"{self.manifest.name}); they could be mixed with or overwritten by new features: "
                            "choose another --out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {self.out}: cannot create the folder: {e.strerror or e}") from None

    def has(self, key: str) -> bool:
        return (self.out / f"{key}.npy").is_file()

    def write(self, key: str, x: np.ndarray) -> None:
        self.check_shape(x)
        _save_npy(self.out / f"{key}.npy", x)

    def finalize(self, extractor: dict, failures: dict[str, dict]) -> dict:
        for k in failures:  # a video that failed this time has no features, not stale ones of its old file
            (self.out / f"{k}.npy").unlink(missing_ok=True)
        videos = {k: v for k, v in self.records().items() if self.has(k) and k not in failures}
        m = self._manifest(extractor, videos, failures)
        shutil.rmtree(self.work, ignore_errors=True)
        return m


class H5File(Output):
    """didemo / activitynet: one HDF5 at OUT, assembled from per-video parts at the end."""

    @property
    def work(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    def _check_foreign(self, old: dict | None) -> None:
        if self.out.is_dir():
            raise DataError(f"--out {self.out}: is a folder; the {self.layout} layout writes one HDF5 file at OUT")
        if self.out.exists() and old is None:
            raise DataError(f"--out {self.out}: exists and has no features manifest {self.manifest.name} beside it "
                            "(not written by `wsra-dist features`); it would be replaced: choose another --out")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {self.out}: cannot create its folder: {e.strerror or e}") from None
        self._keys = self._h5_keys()

    def _h5_keys(self) -> set[str]:
        if not self.out.is_file():
            return set()
        import h5py

        try:
            with h5py.File(self.out, "r") as f:
                return set(f.keys())
        except OSError as e:
            raise DataError(f"--out {self.out}: cannot read the existing HDF5 ({e}); move it away") from None

    def _part(self, key: str) -> Path:
        return self.work / f"{key}.npy"

    def has(self, key: str) -> bool:
        if not hasattr(self, "_keys"):
            self._keys = self._h5_keys()
        return key in self._keys or self._part(key).is_file()

    def write(self, key: str, x: np.ndarray) -> None:
        self.check_shape(x)
        _save_npy(self._part(key), x)

    def _put(self, f, key: str, x: np.ndarray) -> None:
        raise NotImplementedError

    def finalize(self, extractor: dict, failures: dict[str, dict]) -> dict:
        import h5py

        recs = self.records()
        parts = {k for k in recs if self._part(k).is_file()}
        old_keys = self._h5_keys()
        # a video that failed this time has no features, not stale ones of its old file
        videos = {k: v for k, v in recs.items() if (k in parts or k in old_keys) and k not in failures}
        if parts or not self.out.is_file() or any(k in old_keys for k in failures):
            tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
            try:
                # track_times=False: the same features give the same bytes, whoever assembled them
                with h5py.File(tmp, "w", track_order=True) as dst:
                    src = h5py.File(self.out, "r") if old_keys else None
                    try:
                        for k in sorted(videos):
                            if k in parts:
                                self._put(dst, k, np.load(self._part(k), allow_pickle=False))
                            else:
                                self._put(dst, k, self._get(src, k))
                    finally:
                        if src is not None:
                            src.close()
                os.replace(tmp, self.out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        m = self._manifest(extractor, videos, failures)
        shutil.rmtree(self.work, ignore_errors=True)
        self._keys = set(videos)
        return m

    def _get(self, f, key: str) -> np.ndarray:
        raise NotImplementedError


class DidemoH5(H5File):
    """didemo: f[name] (6, D) float32, name = the video's file name with its extension."""

    layout = "didemo"

    def key(self, video: Path) -> str:
        return video.name

    def _put(self, f, key: str, x: np.ndarray) -> None:
        f.create_dataset(key, data=np.asarray(x, dtype=np.float32), track_times=False)

    def _get(self, f, key: str) -> np.ndarray:
        return f[key][()]


class ActivityNetH5(H5File):
    """activitynet: f[stem]["c3d_features"] (T, D) float32 (the layout of the official C3D file)."""

    layout = "activitynet"

    def _put(self, f, key: str, x: np.ndarray) -> None:
        g = f.create_group(key, track_order=True)
        g.create_dataset("c3d_features", data=np.asarray(x, dtype=np.float32), track_times=False)

    def _get(self, f, key: str) -> np.ndarray:
        return f[key]["c3d_features"][()]


OUTPUTS = {"charades": NpyFolder, "didemo": DidemoH5, "activitynet": ActivityNetH5}


def output_for(layout: str, out: str | Path) -> Output:
    if layout not in OUTPUTS:
        raise DataError(f"--layout must be one of {tuple(OUTPUTS)}, got {layout!r}")
    return OUTPUTS[layout](out)
