"""WebDataset tar shards + manifest: written atomically, read with an allow-list decoder, verified.

Layout of DIR: `shard-000000.tar`, ... and `manifest.json` (written last).  A sample is one query:
`KEY.video.npy` (T, D) float32, `KEY.text.npy` (Dt,) float32, `KEY.meta.json`, `KEY.query.txt`.
KEY is a zero-padded sample index (real ids, which may contain dots, live in the json).
No pickle anywhere: npy is loaded with allow_pickle=False and other extensions are refused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .records import DataError

MANIFEST = "manifest.json"
FORMAT = "wsra-dist-shards/1"
FIELDS = ("video.npy", "text.npy", "meta.json", "query.txt")


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


def encode_sample(video: np.ndarray, text: np.ndarray, meta: dict, query: str) -> dict[str, bytes]:
    return {
        "video.npy": npy_bytes(np.asarray(video, dtype=np.float32)),
        "text.npy": npy_bytes(np.asarray(text, dtype=np.float32)),
        "meta.json": json.dumps(meta, separators=(",", ":")).encode(),
        "query.txt": query.encode(),
    }


# Tar headers carry no time, owner or host: the same input gives byte-identical shards (same sha256).
_FIXED_MTIME = 0


class ShardWriter:
    """Writes shards of `shard_size` samples into a staging folder this tool owns (see `Staging`)."""

    def __init__(self, out_dir: str | Path, shard_size: int = 1000):
        if shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, got {shard_size}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._name = name
        self._tmp = self.out / f".{name}.tmp-{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        digest = sha256_file(self._tmp)
        final = self.out / self._name
        os.replace(self._tmp, final)
        size = final.stat().st_size
        self._bytes += size
        self.shards.append({"name": self._name, "num_samples": self._count, "sha256": digest, "bytes": size})

    def write(self, key: str, fields: dict[str, bytes]) -> None:
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
        if self._count >= self.shard_size:
            self._close()

    def finish(self, manifest: dict) -> dict:
        if self._tar is not None:
            self._close()
        manifest = {"format": FORMAT, **manifest, "shards": self.shards,
                    "num_samples": sum(s["num_samples"] for s in self.shards), "total_bytes": self._bytes}
        atomic_write_text(self.out / MANIFEST, json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
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
    removed: the shards the old manifest lists, and that manifest.  A `shard-*.tar` in `out` that
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
            foreign = sorted(p.name for p in out.glob("shard-*.tar") if p.name not in ours)
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
            if pid.isdigit() and not _pid_alive(int(pid)):
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
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: unknown manifest format {m.get('format')!r} (expected {FORMAT})")
    return m


class _HashingReader(io.RawIOBase):
    """File-like wrapper that hashes every byte read, so a shard is checked while it streams."""

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


def _open_url(url: str):
    if url.startswith("pipe:") or "://" in url:
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb", buffering=1 << 20)


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple, bool, np.dtype, int, int]:
    """Parse an .npy header once per distinct header (shards repeat a handful of shapes)."""
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need pickle)")
    return shape, fortran, dtype, fp.tell(), int(np.prod(shape)) if shape else 1


def _npy(data: bytes) -> np.ndarray:
    """Zero-copy .npy decoding: the header is parsed (no pickle), the array is a view of the bytes."""
    if len(data) < 10 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    hl = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else int.from_bytes(data[8:12], "little") + 12
    shape, fortran, dtype, offset, count = _npy_header(bytes(data[:hl]))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_field(shard: str, key: str, ext: str, data: bytes) -> Any:
    try:
        if ext.endswith(".npy"):
            return _npy(data)
        if ext.endswith(".json"):
            return json.loads(bytes(data))
        if ext.endswith(".txt"):
            return bytes(data).decode("utf-8")
    except Exception as e:
        raise DataError(f"{shard}: sample {key}: cannot decode {ext}: {e}") from e
    raise DataError(f"{shard}: sample {key}: field {ext!r} is not allowed (only .npy, .json, .txt are decoded)")


def _parse_header(hdr, url: str) -> tuple[int, bytes, str]:
    """(size, typeflag, name) of a 512-byte tar header, checksum checked."""
    h = np.frombuffer(hdr, dtype=np.uint8)
    chk = int(bytes(hdr[148:156]).split(b"\0", 1)[0].strip() or b"0", 8)
    if chk != int(h.sum(dtype=np.int64)) - int(h[148:156].sum(dtype=np.int64)) + 256:
        raise DataError(f"{url}: corrupt tar header (checksum mismatch)")
    raw_size = bytes(hdr[124:136])
    size = int.from_bytes(raw_size[1:], "big") if raw_size[0] & 0x80 else int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
    name = bytes(hdr[:100]).split(b"\0", 1)[0].decode()
    if bytes(hdr[257:262]) == b"ustar":
        prefix = bytes(hdr[345:500]).split(b"\0", 1)[0].decode()
        name = f"{prefix}/{name}" if prefix else name
    return size, bytes(hdr[156:157]), name


def _members(read_header, read_data, url: str) -> Iterator[tuple[str, Any]]:
    """(name, data) of the regular files of a tar archive (ustar, pax and GNU long names)."""
    long_name = None
    while True:
        hdr = read_header()
        if hdr is None or not any(hdr[:512:64]) and bytes(hdr) == b"\0" * 512:
            return
        size, kind, name = _parse_header(hdr, url)
        data = read_data(size)
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(data).split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":  # pax extended header: only the path matters here
            for rec in bytes(data).decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        yield (long_name or name), data
        long_name = None


def _stream_members(f, url: str) -> Iterator[tuple[str, bytes]]:
    """Sequential reading (pipes, remote streams): one read call per member."""

    def header():
        hdr = f.read(512)
        if not hdr:
            return None
        if len(hdr) < 512:
            raise DataError(f"{url}: truncated tar header")
        return hdr

    def data(size: int) -> bytes:
        d = f.read(size)
        if len(d) < size:
            raise DataError(f"{url}: truncated tar member")
        if size % 512:
            f.read(512 - size % 512)
        return d

    return _members(header, data, url)


def _mmap_index(mv: memoryview, url: str) -> list[tuple[str, str, int, int]]:
    """(key, ext, offset, size) of every member of a mapped local shard, parsed once."""
    pos = 0
    n = len(mv)
    last = (0, 0)  # offset and size of the member _members yields next

    def header():
        nonlocal pos
        if pos + 512 > n:
            if pos < n and any(mv[pos:]):
                raise DataError(f"{url}: truncated tar header")
            return None
        hdr = mv[pos : pos + 512]
        pos += 512
        return hdr

    def data(size: int) -> memoryview:
        nonlocal pos, last
        if pos + size > n:
            raise DataError(f"{url}: truncated tar member")
        last = (pos, size)
        d = mv[pos : pos + size]
        pos += size + (-size) % 512
        return d

    out = []
    for name, _ in _members(header, data, url):
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot >= 0:
            out.append((name[:dot], name[dot + 1 :], *last))
    return out


_INDEX: dict[tuple[str, int, int], list[tuple[str, str, int, int]]] = {}


def _indexed_samples(mv: memoryview, index: list[tuple[str, str, int, int]]) -> Iterator[dict]:
    cur: dict | None = None
    for key, ext, off, size in index:
        if cur is None or cur["__key__"] != key:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        cur[ext] = mv[off : off + size]
    if cur is not None:
        yield cur


def _samples(members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Group consecutive members by key (the basename up to its first dot), as WebDataset does."""
    cur: dict | None = None
    for name, data in members:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1 :]
        if cur is None or cur["__key__"] != key:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        if ext in cur:
            raise DataError(f"duplicate file {name} in one sample")
        cur[ext] = data
    if cur is not None:
        yield cur


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) checked in this process


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def _check_sha(url: str, got: str, expected: str) -> None:
    if got != expected:
        raise DataError(f"{url}: sha256 {got[:12]}... does not match the manifest ({expected[:12]}...)")


def iter_shard(url: str, expected_sha256: str | None = None, dims: dict | None = None) -> Iterator[dict]:
    """Decoded samples of one shard, in order.  Raises DataError naming the shard on any problem.

    Local shards are memory-mapped and their arrays are read-only views (no copy until a batch is
    built); the sha256 is checked before the first sample of a shard is yielded, once per process
    and file version (size, mtime).  Streams (pipe:, URLs) are hashed while they are read.
    """
    if _is_local(url):
        import mmap

        try:
            f = open(url, "rb")
        except OSError as e:
            raise DataError(f"{url}: cannot open shard: {e}") from e
        with f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise DataError(f"{url}: empty shard")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mv = memoryview(mm)
        version = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
        if expected_sha256 and version + (expected_sha256,) not in _VERIFIED:
            _check_sha(url, hashlib.sha256(mv).hexdigest(), expected_sha256)
            _VERIFIED.add(version + (expected_sha256,))
        if version not in _INDEX:  # tar headers are parsed once per process and file version
            if len(_INDEX) > 4096:
                _INDEX.clear()
            _INDEX[version] = _mmap_index(mv, url)
        samples = _indexed_samples(mv, _INDEX[version])
        stream = None
        raw = None
    else:
        raw = _open_url(url)
        stream = _HashingReader(raw) if expected_sha256 else raw
        samples = _samples(_stream_members(io.BufferedReader(stream, 1 << 20) if expected_sha256 else stream, url))
    try:
        for s in samples:
            key = s["__key__"]
            out = {"__key__": key, "__url__": url}
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                out[ext] = decode_field(url, key, ext, data)
            missing = [f for f in FIELDS if f not in out]
            if missing:
                raise DataError(f"{url}: sample {key}: missing {missing}")
            if dims:
                v, t = out["video.npy"], out["text.npy"]
                if v.ndim != 2 or v.shape[1] != dims["video"] or t.shape != (dims["text"],):
                    raise DataError(f"{url}: sample {key}: video {v.shape} / text {t.shape} do not match the manifest "
                                    f"dims (video {dims['video']}, text {dims['text']})")
            yield out
        if stream is not None and expected_sha256:
            _check_sha(url, stream.drain(), expected_sha256)
    except DataError as e:
        if url not in str(e):
            raise DataError(f"{url}: {e}") from e
        raise
    finally:
        if raw is not None:
            raw.close()


def count_samples(path: str | Path) -> int:
    keys = set()
    with tarfile.open(path, "r") as tf:
        for m in tf:
            if m.isreg():
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


def verify(directory: str | Path) -> list[str]:
    """Re-hash and re-count every shard against the manifest; returns the problems found."""
    directory = Path(directory)
    m = load_manifest(directory)
    problems = []
    listed = {s["name"] for s in m["shards"]}
    for extra in sorted(p.name for p in directory.glob("*.tar") if p.name not in listed):
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
            n = count_samples(p)
        except tarfile.TarError as e:
            problems.append(f"{p}: unreadable tar: {e}")
            continue
        if n != s["num_samples"]:
            problems.append(f"{p}: {n} samples != manifest {s['num_samples']}")
    total = sum(s["num_samples"] for s in m["shards"])
    if total != m.get("num_queries", total):
        problems.append(f"{directory}: shards hold {total} samples, manifest num_queries says {m['num_queries']}")
    return problems


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
    return str(Path(source.split("{", 1)[0]).parent / MANIFEST)


def shard_name(url: str) -> str:
    """The manifest name of a shard URL: its file name, or the shard-NNNNNN.tar inside a `pipe:` command."""
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

    m = re.search(r"(shard-\d+\.tar)", url)
    if not m:
        raise DataError(f"{url}: cannot find a shard-NNNNNN.tar name in the pipe command")
    return m.group(1)
