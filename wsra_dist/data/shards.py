"""WebDataset tar shards + manifest: written atomically and reproducibly, read with webdataset's own
stages and an allow-list decoder, verified.

Layout of DIR: `shard-000000.tar`, ... (`.tar.gz` with `--compress`: the same tar, gzip level 1, which
tarfile and stock WebDataset read transparently) and `manifest.json` (written last).  Format 2: a sample is one
*video* with all of its queries: `KEY.video.npy` (the official features once: DiDeMo (6, ΣD) chunks,
modalities side by side; Charades-STA (T, D) snippets), `KEY.text.npy` (Q, Dt) float32 (row j = query j),
`KEY.meta.json` {video, video_hash, duration, num_segments, queries: [{query_id, sentence, times, ...}]}.
KEY is a zero-padded video index (real ids, which may contain dots, live in the json).  Stock
`webdataset.WebDataset(urls).decode()` yields exactly these three fields.  No pickle anywhere: npy is
loaded with allow_pickle=False and every other extension is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .remote import DEFAULT_TIMEOUT_S, open_remote
from .records import DataError

MANIFEST = "manifest.json"
FORMAT = "wsra-dist-shards/2"
OLD_FORMATS = ("wsra-dist-shards/1",)
FIELDS = ("video.npy", "text.npy", "meta.json")
LAYOUTS = ("didemo_chunks", "snippets")


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def encode_sample(video: np.ndarray, text: np.ndarray, meta: dict) -> dict[str, bytes]:
    """One video: features, its queries' text features (Q, Dt) and the json (queries in text row order)."""
    text = np.asarray(text, dtype=np.float32)
    if text.ndim != 2 or text.shape[0] != len(meta.get("queries", [])):
        raise DataError(f"video {meta.get('video')!r}: text features {text.shape} do not match its "
                        f"{len(meta.get('queries', []))} queries")
    return {
        "video.npy": npy_bytes(np.asarray(video, dtype=np.float32)),
        "text.npy": npy_bytes(text),
        "meta.json": json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode(),
    }


# Tar headers carry no time, owner or host: the same input gives byte-identical shards (same sha256).
_FIXED_MTIME = 0


class ShardWriter:
    """Writes shards of `shard_size` samples into a staging folder this tool owns (see `Staging`)."""

    def __init__(self, out_dir: str | Path, shard_size: int = 1000, compress: bool = False):
        if shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, got {shard_size}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.compress = compress
        self._streams: list[Any] = []
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar" + (".gz" if self.compress else "")
        self._name = name
        self._tmp = self.out / f".{name}.tmp-{os.getpid()}"
        if self.compress:
            # gzip's header carries a name and an mtime: both fixed, so the same input gives the same sha256.
            raw = open(self._tmp, "wb")
            gz = gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0)
            self._streams = [gz, raw]
            self._tar = tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT)
        else:
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._queries = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        for f in self._streams:
            f.close()
        self._streams = []
        digest = sha256_file(self._tmp)
        final = self.out / self._name
        os.replace(self._tmp, final)
        size = final.stat().st_size
        self._bytes += size
        self.shards.append({"name": self._name, "num_samples": self._count, "num_queries": self._queries,
                            "sha256": digest, "bytes": size})

    def write(self, key: str, fields: dict[str, bytes], queries: int = 0) -> None:
        """One sample (a video) with `queries` queries; a shard closes after `shard_size` samples."""
        if "." in key or "/" in key:
            raise DataError(f"shard key {key!r} must not contain '.' or '/' (WebDataset splits on the first dot)")
        if self._tar is None:
            self._open()
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = _FIXED_MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._queries += queries
        if self._count >= self.shard_size:
            self._close()

    def finish(self, manifest: dict) -> dict:
        if self._tar is not None:
            self._close()
        manifest = {"format": FORMAT, **manifest, "compression": "gzip" if self.compress else None,
                    "shards": self.shards,
                    "num_samples": sum(s["num_samples"] for s in self.shards),
                    "num_queries": sum(s["num_queries"] for s in self.shards), "total_bytes": self._bytes}
        atomic_write_text(self.out / MANIFEST, json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            for f in self._streams:
                f.close()
            self._streams = []
            self._tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a staging name's writer is still at work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Staging:
    """A new shard set is written beside `--out` and swapped in only when complete.

    Until `publish()`, `out` is untouched: a failure (bad features, SIGKILL, full disk) leaves the
    user's earlier set intact and verifiable.  Only files this tool wrote are ever replaced or
    removed: the shards the old manifest lists, and that manifest.  A `shard-*.tar[.gz]` in `out` that
    no manifest there lists is refused up front rather than deleted.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.staging-{os.getpid()}"

    def check(self) -> None:
        """Is `out` a place we may write?  Raises DataError before any work is done."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise DataError(f"--out {out}: exists and is not a folder")
        if out.is_dir():
            ours = set()
            if (out / MANIFEST).is_file():
                try:
                    ours = {s["name"] for s in load_manifest(out)["shards"]}
                except (DataError, KeyError, TypeError) as e:
                    raise DataError(f"--out {out}: holds a manifest.json this tool cannot read ({e}); move it away "
                                    "or choose another --out") from None
            foreign = sorted(p.name for p in out.glob("shard-*.tar*") if p.name not in ours)
            if foreign:
                raise DataError(f"--out {out}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                                "that no manifest there lists (not written by this tool, or its manifest is gone); "
                                "they would be overwritten: move them away or choose another --out")
            if not os.access(out, os.W_OK | os.X_OK):
                raise DataError(f"--out {out}: folder is not writable")
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--out {out}: cannot create its parent folder {parent}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataError(f"--out {out}: its folder {parent} is not writable")
        for old in parent.glob(f".{self.out.name}.staging-*"):  # left by a killed run of ours
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)

    def create(self, expected_bytes: int = 0) -> Path:
        self.check()
        try:
            self.dir.mkdir()
        except OSError as e:
            raise DataError(f"--out {self.out}: cannot create the staging folder {self.dir}: {e.strerror or e}") from None
        free = shutil.disk_usage(self.dir).free
        if expected_bytes and free < expected_bytes * 1.05:
            self.discard()
            raise DataError(f"--out {self.out}: the new shards need about {expected_bytes / 1e6:.1f} MB but "
                            f"{free / 1e6:.1f} MB are free there")
        return self.dir

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def publish(self) -> None:
        """Swap the complete staged set into `out` (the manifest last, so a reader never sees a mix)."""
        out = self.out
        new = load_manifest(self.dir)
        if not out.exists():
            os.replace(self.dir, out)  # one rename: nothing of the user's was there
            return
        self.check()  # `out` may have changed while we worked
        old_names = []
        if (out / MANIFEST).is_file():
            old_names = [s["name"] for s in load_manifest(out)["shards"]]
        backup = self.dir / ".previous"
        backup.mkdir()
        moved: list[str] = []
        placed: list[str] = []
        try:
            if (out / MANIFEST).is_file():  # the old set stops being "complete" first
                os.replace(out / MANIFEST, backup / MANIFEST)
                moved.append(MANIFEST)
            for n in old_names:
                if (out / n).exists():
                    os.replace(out / n, backup / n)
                    moved.append(n)
            for s in new["shards"]:
                os.replace(self.dir / s["name"], out / s["name"])
                placed.append(s["name"])
            os.replace(self.dir / MANIFEST, out / MANIFEST)
        except OSError as e:  # put the old set back as it was
            for n in placed:
                os.replace(out / n, self.dir / n)
            for n in moved:
                os.replace(backup / n, out / n)
            raise DataError(f"--out {out}: could not swap in the new shards ({e.strerror or e}); the previous set "
                            "is unchanged") from None
        self.discard()


# ------------------------------------------------------------------------------------ reading
def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no shard manifest (was `wsra-dist shard` run, and did it finish?)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: manifest is not valid JSON: {e}") from e
    if m.get("format") in OLD_FORMATS:
        raise DataError(f"{path}: shards in the old format {m['format']} (one sample per query); this version reads "
                        f"{FORMAT} (one sample per video, each video stored once): re-run the same `wsra-dist shard` "
                        "command to rewrite them")
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: unknown manifest format {m.get('format')!r} (expected {FORMAT})")
    if m.get("layout") not in LAYOUTS:
        raise DataError(f"{path}: unknown layout {m.get('layout')!r} (expected one of {LAYOUTS})")
    return m


def _npy(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.hasobject:
        raise ValueError("object arrays are refused")
    return arr


def decode_sample(sample: dict) -> dict:
    """Allow-list decoder (a webdataset map stage): .npy without pickle, .json; anything else is refused."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    out = {}
    for ext, data in sample.items():
        if ext.startswith("__"):
            out[ext] = data
            continue
        try:
            if ext.endswith(".npy"):
                out[ext] = _npy(data)
            elif ext.endswith(".json"):
                out[ext] = json.loads(data)
            else:
                raise DataError(f"{url}: sample {key}: field {ext!r} is not allowed (only .npy and .json are decoded)")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{url}: sample {key}: cannot decode {ext}: {e}") from e
    return out


def check_sample(s: dict, manifest: dict) -> dict:
    """A decoded video sample has the three fields, the manifest's shapes and one text row per query."""
    url, key = s.get("__url__", "?"), s.get("__key__", "?")
    missing = [f for f in FIELDS if f not in s]
    if missing:
        raise DataError(f"{url}: sample {key}: missing {missing}")
    v, t, meta = s["video.npy"], s["text.npy"], s["meta.json"]
    dims = manifest["dims"]
    rows_ok = v.shape[0] == 6 if manifest["layout"] == "didemo_chunks" else v.shape[0] >= 1
    if v.ndim != 2 or not rows_ok or v.shape[1] != dims["stored"]:
        want = "(6, %d)" % dims["stored"] if manifest["layout"] == "didemo_chunks" else "(T, %d)" % dims["stored"]
        raise DataError(f"{url}: sample {key}: video.npy has shape {v.shape}, the manifest says {want}")
    queries = meta.get("queries") if isinstance(meta, dict) else None
    if not queries or t.ndim != 2 or t.shape != (len(queries), dims["text"]):
        raise DataError(f"{url}: sample {key}: text.npy {t.shape} does not match its {len(queries or [])} queries x "
                        f"{dims['text']}-d text features")
    return s


_VERIFIED: set[tuple] = set()  # shards whose sha256 this process has checked: (url, size, mtime_ns, sha256)


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def _check_sha(url: str, got: str, expected: str) -> None:
    if got != expected:
        raise DataError(f"{url}: sha256 {got[:12]}... does not match the manifest ({expected[:12]}...)")


class _HashingReader(io.RawIOBase):
    """File-like wrapper that hashes every byte read, so a stream is checked while it is read."""

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))  # wds.gopen's Pipe has read() but no readinto()
        n = len(data)
        b[:n] = data
        if n:
            self.h.update(data)
        return n

    def drain(self) -> str:
        while chunk := self.f.read(1 << 20):
            self.h.update(chunk)
        return self.h.hexdigest()


def _local_version(url: str, sha: str) -> tuple:
    st = os.stat(url)
    return (os.path.abspath(url), st.st_size, st.st_mtime_ns, sha)


def _without_stream(msg: str) -> str:
    """webdataset's tar reader appends " @ <repr of the file object>" to a message (tariterators.tar_file_iterator);
    the shard is already named, so the object's repr is noise."""
    return re.sub(r" @ <[^<>]*>$", "", msg.strip())


def iter_shard(url: str, manifest: dict, expected_sha256: str | None = None,
               read_timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[dict]:
    """Decoded, checked video samples of one shard, in order, through webdataset's tar stages.

    The sha256 is checked at most once per process and file version: a local shard is hashed before
    its first sample is yielded; a stream (pipe:, URL) is hashed while it is read and checked at its
    end, and fails when it delivers nothing for `read_timeout_s` (data/remote.py).  Any problem is a
    DataError naming the shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    verify = bool(expected_sha256)
    raw = None
    try:
        if _is_local(url):
            try:
                version = _local_version(url, expected_sha256 or "")
                if verify and version not in _VERIFIED:
                    _check_sha(url, sha256_file(url), expected_sha256)
                    _VERIFIED.add(version)
                raw = open(url, "rb", buffering=1 << 20)
            except FileNotFoundError:
                raise DataError(f"{url}: shard is missing") from None
            except OSError as e:
                raise DataError(f"{url}: cannot open shard: {e.strerror or e}") from None
            stream, hashing = raw, None
        else:
            raw = open_remote(url, read_timeout_s)
            hashing = _HashingReader(raw) if verify and (url, expected_sha256) not in _VERIFIED else None
            stream = io.BufferedReader(hashing, 1 << 20) if hashing is not None else raw
        files = tar_file_expander([{"url": url, "stream": stream}])
        for s in group_by_keys(files):
            yield check_sample(decode_sample(s), manifest)
        if hashing is not None:
            _check_sha(url, hashing.drain(), expected_sha256)
            _VERIFIED.add((url, expected_sha256))
    except DataError as e:
        # webdataset's tar stage re-raises with (stream, url) appended to the args: keep the message only
        msg = _without_stream(str(e.args[0]) if e.args else str(e))
        raise DataError(msg if url in msg else f"{url}: {msg}") from None
    except (tarfile.TarError, ValueError, OSError) as e:
        msg = _without_stream(e.args[0] if e.args and isinstance(e.args[0], str) else str(e))
        raise DataError(f"{url}: unreadable shard: {msg}") from e
    finally:
        if raw is not None:
            raw.close()


def read_metas(url: str, read_timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """The meta.json of every sample of one shard, skipping the feature arrays (a local tar is read by seeking
    over them; a remote or pipe: stream is read through)."""
    out = []
    try:
        if not _is_local(url):
            tar = tarfile.open(fileobj=open_remote(url, read_timeout_s), mode="r|*")
        else:
            tar = tarfile.open(url, "r:*")
        with tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".meta.json"):
                    f = tar.extractfile(member)
                    out.append(json.loads(f.read()) if f is not None else {})
    except DataError:
        raise
    except (OSError, tarfile.TarError, ValueError) as e:
        raise DataError(f"{url}: cannot read the shard's meta.json: {e}") from e
    return out


def count_samples(path: str | Path) -> tuple[int, int]:
    """(videos, queries) of a shard, from its member names and meta.json files."""
    keys, queries = set(), 0
    with tarfile.open(path, "r") as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, _, ext = m.name.partition(".")
            keys.add(key)
            if ext == "meta.json":
                try:
                    queries += len(json.loads(tf.extractfile(m).read())["queries"])
                except (ValueError, KeyError, TypeError) as e:
                    raise tarfile.TarError(f"{m.name}: unreadable meta.json ({e})") from None
    return len(keys), queries


def verify(directory: str | Path) -> list[str]:
    """Re-hash and re-count every shard (videos and queries) against the manifest; returns the problems found."""
    directory = Path(directory)
    m = load_manifest(directory)
    problems = []
    listed = {s["name"] for s in m["shards"]}
    for extra in sorted(p.name for p in _shard_files(directory) if p.name not in listed):
        problems.append(f"{directory / extra}: not in the manifest")
    for s in m["shards"]:
        p = directory / s["name"]
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        digest = sha256_file(p)
        if digest != s["sha256"]:
            problems.append(f"{p}: sha256 {digest[:12]}... != manifest {s['sha256'][:12]}...")
            continue
        try:
            n, q = count_samples(p)
        except tarfile.TarError as e:
            problems.append(f"{p}: unreadable tar: {e}")
            continue
        if n != s["num_samples"]:
            problems.append(f"{p}: {n} videos != manifest {s['num_samples']}")
        if q != s.get("num_queries"):
            problems.append(f"{p}: {q} queries != manifest {s.get('num_queries')}")
    total = sum(s.get("num_queries", 0) for s in m["shards"])
    if total != m.get("num_queries", total):
        problems.append(f"{directory}: shards hold {total} queries, manifest num_queries says {m['num_queries']}")
    return problems


def _shard_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_file() and p.name.endswith((".tar", ".tar.gz"))]


def shard_urls(source: str, manifest: dict) -> list[str]:
    """Local folder -> its shards; a URL pattern (braces, pipe:) is expanded as WebDataset does."""
    p = Path(source)
    if p.is_dir():
        return [str(p / s["name"]) for s in manifest["shards"]]
    import braceexpand

    return list(braceexpand.braceexpand(source))


def manifest_path_for(source: str) -> str:
    """Manifest beside the shards: DIR/manifest.json, or the pattern's folder for a local URL pattern."""
    p = Path(source)
    if p.is_dir():
        return str(p / MANIFEST)
    if source.startswith("pipe:") or "://" in source:
        raise DataError(f"{source}: a remote shard pattern needs its manifest given explicitly (data.*_manifest)")
    # A folder that is not there must be named as such: looking for its parent's manifest.json would
    # report a missing manifest of another folder (shards/nope/train -> "shards/nope/manifest.json: ...").
    pattern = "{" in source
    folder = Path(source.split("{", 1)[0]).parent if pattern else p.parent
    if not pattern and not p.exists():
        if p.name.endswith((".tar", ".tar.gz")) and folder.is_dir():
            raise DataError(f"{source}: no such shard file")
        raise DataError(f"{source}: the shard folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: the shard folder does not exist (from the pattern {source})")
    return str(folder / MANIFEST)


def shard_name(url: str) -> str:
    """The manifest name of a shard URL: its file name, or the shard-NNNNNN.tar[.gz] inside a `pipe:` command."""
    return _pipe_name(url) if url.startswith("pipe:") else url.rstrip().split("/")[-1].split()[0]


def shard_entries(urls: Iterable[str], manifest: dict) -> list[dict]:
    """The manifest entry (num_samples, sha256, ...) of every URL; a URL the manifest lacks is an error."""
    by_name = {s["name"]: s for s in manifest["shards"]}
    out = []
    for u in urls:
        name = shard_name(u)
        if name not in by_name:
            raise DataError(f"{u}: shard {name!r} is not in the manifest")
        out.append(by_name[name])
    return out


def _pipe_name(url: str) -> str:
    import re

    m = re.search(r"(shard-\d+\.tar(?:\.gz)?)", url)
    if not m:
        raise DataError(f"{url}: cannot find a shard-NNNNNN.tar[.gz] name in the pipe command")
    return m.group(1)
