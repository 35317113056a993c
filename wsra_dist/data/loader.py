"""WebDataset shards (one sample per video) -> queries -> padded batches, equal batches per process.

The pipeline is webdataset's own stages, in open_clip's pattern: the shard list is shuffled with
(seed, epoch) by `wds.detshuffle` - the same order on every process - then split by process (every
world-th shard, as `wds.split_by_node` does, with the rank accelerate gives us) and by DataLoader
worker (`wds.split_by_worker`); tars are read by `tar_file_expander` + `group_by_keys` (see
`shards.iter_shard`), each video is expanded into its queries, and queries are shuffled by
`wds.shuffle` with a generator seeded by (seed, epoch, rank, worker).  Workers are persistent; the
epoch reaches them through shared memory (`SharedEpoch`), so a worker keeps its record of verified
shards and each shard's sha256 is checked at most once per worker process, never per epoch.

Batch plan: the number of batches per epoch is computed from the manifest's per-shard query counts
for every process (no communication) and the minimum is used everywhere, so uneven shards can never
leave one process waiting in a collective.  Every batch of an epoch is full (batch_size queries per
process) except the last, which holds what is left.  When the *global* last batch (summed over
processes, known to every process from the manifest) has fewer than `min_global_batch` queries - the
top/last-K sampler needs K_top + K_last + 2 - it is folded into the batch before it: that batch is
larger (by fewer than `min_global_batch` queries in all), the epoch has one batch less, and no query
is dropped.  Every process makes the same choice from the same counts, so 1 process x N*B and N
processes x B still see the same global batches.  An epoch whose only batch is too short cannot be
folded and is an error at start-up (`EpochLoader.plan`).
"""

from __future__ import annotations

import atexit
import math
import os
import random
import signal
import stat
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..geometry import DIDEMO_CANDIDATES
from ..lifetime import loader_worker_init
from ..stop_signals import StopDuringRead, data_wait, pending
from .batch import Batch
from .records import DataError
from .remote import DEFAULT_TIMEOUT_S
from .shards import iter_shard, load_manifest, manifest_path_for, shard_entries, shard_urls

N_DIDEMO = len(DIDEMO_CANDIDATES)  # candidates per DiDeMo video


@dataclass
class ShardSource:
    urls: list[str]
    counts: list[int]  # queries per shard (the unit of batches)
    shas: list[str]
    manifest: dict
    sizes: list = field(default_factory=list)  # bytes per shard from the manifest (None: not recorded)
    name: str = ""  # the source as given (folder, pattern, pipe:)
    read_timeout_s: float = DEFAULT_TIMEOUT_S  # remote shards: longest wait for the next byte (data.read_timeout_s)

    @classmethod
    def open(cls, source: str, manifest: str = "") -> "ShardSource":
        if not source:
            raise DataError("no shards given (data.train_shards)")
        m = load_manifest(manifest or manifest_path_for(source))
        urls = shard_urls(source, m)
        if not urls:
            raise DataError(f"{source}: no shards")
        entries = shard_entries(urls, m)
        return cls(urls, [e["num_queries"] for e in entries], [e["sha256"] for e in entries], m,
                   [e.get("bytes") for e in entries], source)

    def check_files(self, key: str = "") -> None:
        """Every local shard of the manifest exists, is readable and has the size the manifest recorded.

        Run before training so a shard deleted or truncated after sharding stops the run at start-up,
        not when an epoch reaches it.  Remote shards (`pipe:`, URLs) are skipped: they are checked
        (sha256) while they stream.  The DataError names the file and `key` (e.g. data.train_shards).
        """
        where = f" ({key}={self.name})" if key else ""
        sizes = self.sizes or [None] * len(self.urls)
        for url, size in zip(self.urls, sizes):
            if url.startswith("pipe:") or "://" in url:
                continue
            try:
                st = os.stat(url)
            except FileNotFoundError:
                raise DataError(f"{url}: shard listed in the manifest is missing{where}; restore it or re-run "
                                "`wsra-dist shard`") from None
            except OSError as e:
                raise DataError(f"{url}: cannot read shard{where}: {e.strerror or e}") from None
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{url}: shard listed in the manifest is not a regular file{where}")
            if size is not None and st.st_size != int(size):
                raise DataError(f"{url}: shard is {st.st_size} bytes but the manifest records {int(size)}{where} "
                                "(truncated or replaced after sharding); restore it or re-run `wsra-dist shard`")
            if not os.access(url, os.R_OK):
                raise DataError(f"{url}: shard is not readable (permissions){where}")

    @property
    def num_samples(self) -> int:
        """Queries (not videos) in all shards."""
        return sum(self.counts)

    @property
    def layout(self) -> str:
        return self.manifest["layout"]


class SharedEpoch:
    """The current epoch in shared memory, so persistent DataLoader workers see it (open_clip's pattern)."""

    def __init__(self, epoch: int = 0):
        import multiprocessing as mp

        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices of `epoch`, shuffled by webdataset's detshuffle: the same order on every process."""
    import webdataset as wds

    idx = list(range(n))
    if not shuffle:
        return idx
    # detshuffle seeds random.Random(seed + epoch) after incrementing its epoch, hence epoch - 1
    return list(wds.detshuffle(bufsize=n, initial=n, seed=seed * 100003, epoch=epoch - 1).run(iter(idx)))


def expand_queries(videos: Iterator[dict]) -> Iterator[dict]:
    """A video sample -> one sample per query (the video array is shared, not copied)."""
    for s in videos:
        meta = s["meta.json"]
        video_meta = {k: v for k, v in meta.items() if k != "queries"}
        for j, q in enumerate(meta["queries"]):
            yield {"video": s["video.npy"], "text": s["text.npy"][j], "key": f"{s['__key__']}/{j}",
                   "meta": {**video_meta, **q, "query": q.get("sentence", "")}}


class _Queries(torch.utils.data.IterableDataset):
    """This process's shards of the current epoch -> shuffled queries (webdataset stages)."""

    def __init__(self, source: "ShardSource", world: int, rank: int, seed: int, shuffle: bool, shuffle_buffer: int,
                 verify: bool, epoch: SharedEpoch):
        self.urls, self.manifest = source.urls, source.manifest
        self.sha_of = dict(zip(source.urls, source.shas))
        self.world, self.rank, self.seed, self.shuffle = world, rank, seed, shuffle
        self.shuffle_buffer, self.verify, self.epoch = shuffle_buffer, verify, epoch
        self.read_timeout_s = source.read_timeout_s

    def _shards(self, src):
        for u in src:
            yield from iter_shard(u["url"], self.manifest, self.sha_of[u["url"]] if self.verify else None,
                                  self.read_timeout_s)

    def __iter__(self):
        import webdataset as wds

        epoch = self.epoch.get()
        order = shard_order(len(self.urls), self.seed, epoch, self.shuffle)[self.rank :: self.world]
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        stages = [wds.SimpleShardList([self.urls[i] for i in order]), wds.split_by_worker, self._shards, expand_queries]
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(((self.seed * 7919 + epoch) * 131 + self.rank) * 64 + wid)
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        it = iter(wds.DataPipeline(*stages))
        return _passed_to_trainer(it) if info is not None else it


class WorkerFailure:
    """An exception of a DataLoader worker, sent to the trainer as an item and raised there as it was.

    torch re-raises a worker's exception as a *new* one of the same type whose message is the worker's whole
    traceback ("Caught DataError in DataLoader worker process 1. Original Traceback ..."), so the one-line
    error of data.num_workers=0 became ~22 lines with workers.  Only plain text crosses the process boundary
    (the type's name, the message, the traceback for --debug); the trainer rebuilds the exception from a fixed
    set of types, so no exception object has to be pickled."""

    def __init__(self, exc: BaseException, trace: str):
        self.kind, self.message, self.trace = type(exc).__name__, str(exc), trace

    def reraise(self) -> None:
        cls = _REBUILT.get(self.kind)
        exc = cls(self.message) if cls is not None else RuntimeError(f"{self.kind}: {self.message}")
        raise exc from _WorkerTraceback(self.trace)


class _WorkerTraceback(Exception):
    """The cause shown by --debug: the traceback of the worker process the error happened in."""


_REBUILT = {"DataError": DataError, "ValueError": ValueError, "OSError": OSError, "RuntimeError": RuntimeError,
            "TimeoutError": TimeoutError, "EOFError": EOFError}


def _passed_to_trainer(it: Iterator[dict]) -> Iterator:
    """Worker side of WorkerFailure: the failure becomes the worker's last item."""
    import traceback

    try:
        yield from it
    except Exception as e:  # noqa: BLE001 - handed to the trainer, which raises it again
        yield WorkerFailure(e, traceback.format_exc())


def _target(meta: dict, T: int) -> np.ndarray:
    """Annotated-time distribution over snippets/candidates, for L_supervised only (the supervised reference, or a
    self-training student: pseudo-labelled queries carry a `weight`, 0 for those whose times it must not use)."""
    t = np.zeros(T, dtype=np.float32)
    if "target" in meta:  # DiDeMo: the majority annotation among the 21 candidates
        t[int(meta["target"])] = 1.0
        return t
    d, s, e = meta["duration"], meta["start"], meta["end"]
    k = (np.arange(T) + 0.5) * d / T
    inside = (k >= s) & (k <= e)
    if not inside.any():
        inside[min(int(s / d * T), T - 1)] = True
    t[inside] = float(meta.get("weight", 1.0)) / inside.sum()
    return t


def collate(samples: list[dict], layout: str) -> Batch:
    """Queries -> Batch.  `snippets`: padded (b, T, D) + mask; `didemo_chunks`: (b, 6, ΣD), 21 candidates each."""
    b = len(samples)
    D = samples[0]["video"].shape[1]
    if layout == "didemo_chunks":
        video = np.stack([s["video"] for s in samples]).astype(np.float32, copy=False)
        mask = np.ones((b, N_DIDEMO), dtype=bool)
        target = np.stack([_target(s["meta"], N_DIDEMO) for s in samples])
    else:
        T = max(s["video"].shape[0] for s in samples)
        video = np.zeros((b, T, D), dtype=np.float32)
        mask = np.zeros((b, T), dtype=bool)
        target = np.zeros((b, T), dtype=np.float32)
        for i, s in enumerate(samples):
            v = s["video"]
            video[i, : len(v)] = v
            mask[i, : len(v)] = True
            target[i, : len(v)] = _target(s["meta"], len(v))
    meta = [{**s["meta"], "key": s["key"]} for s in samples]
    return Batch(
        video=torch.from_numpy(video), mask=torch.from_numpy(mask),
        text=torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.float32)),
        video_id=torch.tensor([m["video_hash"] for m in meta], dtype=torch.long),
        target=torch.from_numpy(target), meta=meta,
    )


def iter_eval_batches(source: "ShardSource", batch_size: int, world: int = 1, rank: int = 0,
                      verify: bool = True) -> Iterator[Batch]:
    """Every query of this process's shards (every world-th, in order), in batches; no shuffling.

    Batches never cross a shard boundary, so they are the same whatever the number of processes and
    the predictions are bit-identical (BLAS results may depend on a batch's size).
    """
    for url, sha in list(zip(source.urls, source.shas))[rank::world]:
        buf: list[dict] = []
        for q in expand_queries(iter_shard(url, source.manifest, sha if verify else None, source.read_timeout_s)):
            buf.append(q)
            if len(buf) == batch_size:
                yield collate(buf, source.layout)
                buf = []
        if buf:
            yield collate(buf, source.layout)


def _pinned(b: Batch) -> Batch:
    return Batch(b.video.pin_memory(), b.mask.pin_memory(), b.text.pin_memory(), b.video_id.pin_memory(),
                 b.target.pin_memory(), b.meta)


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch is cut into batches; the same on every process."""

    batches: int  # batches every process runs
    last: tuple[int, ...]  # size of the last batch of each process
    folded: int  # queries of a too-short global tail added to the batch before it (0: no fold)


_LOADERS: "weakref.WeakSet[EpochLoader]" = weakref.WeakSet()  # loaders with workers, ended at exit
_EXIT_HOOK = False


def _abandon_all() -> None:
    for loader in list(_LOADERS):
        loader.abandon()


class EpochLoader:
    def __init__(self, source: ShardSource, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 2000, num_workers: int = 0, verify: bool = True,
                 drop_last: bool = False, min_global_batch: int = 1):
        if len(source.urls) < world:
            raise DataError(f"{len(source.urls)} shards for {world} processes: process {len(source.urls)} would get "
                            f"no shards; re-shard with a smaller --shard-size (at least {world} shards)")
        self.source, self.batch_size, self.world, self.rank = source, batch_size, world, rank
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.num_workers, self.verify, self.drop_last = num_workers, verify, drop_last
        self.min_global_batch = max(int(min_global_batch), 1)
        self.pin_memory = torch.cuda.is_available()  # lets Batch.to(non_blocking=True) overlap the copy
        self._epoch = SharedEpoch(0)
        self._dl = None

    def _order(self, epoch: int) -> list[int]:
        return shard_order(len(self.source.urls), self.seed, epoch, self.shuffle)

    def plan(self, epoch: int) -> EpochPlan:
        """Batches of `epoch` from the manifest counts alone: the same answer on every process.

        All batches hold batch_size queries per process except the last; a last *global* batch with
        fewer than `min_global_batch` queries is folded into the one before it (see the module doc).
        """
        order = self._order(epoch)
        per_rank = [sum(self.source.counts[i] for i in order[r :: self.world]) for r in range(self.world)]
        if min(per_rank) == 0:
            r = per_rank.index(0)
            raise DataError(f"process {r} gets shards with no samples in epoch {epoch}")
        B = self.batch_size
        f = math.floor if self.drop_last else math.ceil
        n = min(int(f(c / B)) for c in per_rank)
        if n == 0:
            return EpochPlan(0, tuple(0 for _ in per_rank), 0)
        last = [min(c, n * B) - (n - 1) * B for c in per_rank]
        tail = sum(last)
        if tail >= self.min_global_batch:
            return EpochPlan(n, tuple(last), 0)
        if n == 1:
            raise DataError(
                f"{self.source.name or 'training shards'}: epoch {epoch} has a single global batch of {tail} "
                f"queries ({self.world} process(es) x {'/'.join(map(str, last))}), fewer than the "
                f"{self.min_global_batch} a global batch needs; use more training data or fewer processes, or "
                "lower loss.k_top/loss.k_last")
        # fold: the previous batch takes the tail, so the epoch has one batch less
        return EpochPlan(n - 1, tuple(min(c, n * B) - (n - 2) * B for c in per_rank), tail)

    def batches_per_epoch(self, epoch: int) -> int:
        return self.plan(epoch).batches

    def _dataloader(self):
        if self._dl is None:
            ds = _Queries(self.source, self.world, self.rank, self.seed, self.shuffle, self.shuffle_buffer,
                          self.verify, self._epoch)
            # Own generator: DataLoader otherwise draws its base seed from the global RNG at every epoch,
            # which would shift the dropout stream of a run resumed mid-epoch.
            gen = torch.Generator().manual_seed(self.seed * 7919)
            nw = self.num_workers
            if nw:  # workers ignore SIGTERM (lifetime.loader_worker_init): they are ended by _abandon_all, which
                # runs before multiprocessing's exit hook (atexit is LIFO; registered after multiprocessing.util's),
                # as that hook would SIGTERM them and then wait for them forever
                global _EXIT_HOOK
                if not _EXIT_HOOK:
                    import multiprocessing.util  # noqa: F401 - its exit hook first, so that ours runs before it

                    atexit.register(_abandon_all)
                    _EXIT_HOOK = True
                _LOADERS.add(self)
            self._dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw, generator=gen,
                                                   collate_fn=lambda x: x, prefetch_factor=64 if nw else None,
                                                   persistent_workers=nw > 0,
                                                   # workers end with the trainer, even a SIGKILLed one
                                                   worker_init_fn=loader_worker_init if nw else None)
        return self._dl

    def abandon(self) -> None:
        """End the loader workers now (SIGKILL), when the run stops while they may be blocked in a stalled read:
        torch's own shutdown waits 5 s for each and then sends SIGTERM, which a worker in a read does not act on.
        Their `pipe:` commands end with them (the guard dies with its parent, data/remote.py)."""
        it = getattr(self._dl, "_iterator", None) if self._dl is not None else None
        workers = [w for w in (getattr(it, "_workers", None) or []) if w.is_alive()]
        if not workers or getattr(it, "_shutdown", True):
            return
        from torch.utils.data._utils import signal_handling

        it._shutdown = True  # torch's shutdown would wait on the killed workers again
        try:  # before the kill: torch's SIGCHLD handler would otherwise report the killed workers as a failure
            signal_handling._remove_worker_pids(id(it))
        except (RuntimeError, AttributeError):
            pass
        for w in workers:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for w in workers:
            w.join(timeout=5)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """This process's batches of `epoch`, after skipping the first `skip` (mid-epoch resume)."""
        plan = self.plan(epoch)
        n_batches = plan.batches
        self._epoch.set(epoch)  # before iter(): persistent workers read it when their iterator restarts
        it = iter(self._dataloader())
        layout = self.source.layout
        waiting_on = (f"{self.source.name or 'the training shards'}" +
                      (f" (through {self.num_workers} loader workers)" if self.num_workers else ""))
        end = object()
        for b in range(n_batches):
            want = plan.last[self.rank] if b == n_batches - 1 else self.batch_size
            samples = []
            while len(samples) < want:
                with data_wait(waiting_on):  # a stop signal ends a stalled wait for the next sample
                    s = next(it, end)
                if s is end:
                    break
                if isinstance(s, WorkerFailure):
                    if pending():  # the worker's source died of the stop signal sent to the whole group
                        raise StopDuringRead(pending(), waiting_on, stalled=False)
                    s.reraise()
                samples.append(s)
            if not samples:
                break
            if b >= skip:
                batch = collate(samples, layout)
                yield _pinned(batch) if self.pin_memory else batch
