"""WebDataset shards -> padded batches, split by process then by worker, equal batches per process.

Each epoch: the shard list is shuffled with (seed, epoch) - the same order on every process - then
process r takes shards[r::world] and its workers split those.  The number of batches per epoch is
computed from the manifest's per-shard counts for every process (no communication) and the minimum
is used everywhere, so uneven shards can never leave one process waiting in a collective.

Short tail: every batch of an epoch is full (batch_size per process) except the last, which holds
what is left.  When the *global* last batch (summed over processes, known to every process from the
manifest) has fewer than `min_global_batch` queries - the top/last-K sampler needs K_top + K_last + 2
- it is folded into the batch before it: that batch is larger (by fewer than `min_global_batch`
queries in all), the epoch has one batch less, and no query is dropped.  Every process makes the same
choice from the same counts, so 1 process x N*B and N processes x B still see the same global batches.
An epoch whose only batch is too short cannot be folded and is an error at start-up (`EpochLoader.plan`).
"""

from __future__ import annotations

import math
import os
import random
import stat
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..objective import Batch
from .records import DataError
from .shards import iter_shard, load_manifest, manifest_path_for, shard_entries, shard_urls


@dataclass
class ShardSource:
    urls: list[str]
    counts: list[int]
    shas: list[str]
    manifest: dict
    sizes: list = field(default_factory=list)  # bytes per shard from the manifest (None: not recorded)
    name: str = ""  # the source as given (folder, pattern, pipe:)

    @classmethod
    def open(cls, source: str, manifest: str = "") -> "ShardSource":
        if not source:
            raise DataError("no shards given (data.train_shards)")
        m = load_manifest(manifest or manifest_path_for(source))
        urls = shard_urls(source, m)
        if not urls:
            raise DataError(f"{source}: no shards")
        entries = shard_entries(urls, m)
        return cls(urls, [e["num_samples"] for e in entries], [e["sha256"] for e in entries], m,
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
        return sum(self.counts)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, urls, shas, dims, shuffle_buffer: int, seed: int, verify: bool):
        self.urls, self.shas, self.dims = urls, shas, dims
        self.shuffle_buffer, self.seed, self.verify = shuffle_buffer, seed, verify

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed * 1000 + wid)
        buf: list[dict] = []
        for url, sha in list(zip(self.urls, self.shas))[wid::nw]:
            for s in iter_shard(url, sha if self.verify else None, self.dims):
                if self.shuffle_buffer <= 1:
                    yield s
                    continue
                buf.append(s)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


def _target(meta: dict, T: int) -> np.ndarray:
    """Annotated-time distribution over snippets/candidates, for the supervised reference only."""
    t = np.zeros(T, dtype=np.float32)
    if "target" in meta:  # DiDeMo: the majority annotation among the 21 candidates
        t[int(meta["target"])] = 1.0
        return t
    d, s, e = meta["duration"], meta["start"], meta["end"]
    k = (np.arange(T) + 0.5) * d / T
    inside = (k >= s) & (k <= e)
    if not inside.any():
        inside[min(int(s / d * T), T - 1)] = True
    t[inside] = 1.0 / inside.sum()
    return t


def collate(samples: list[dict]) -> Batch:
    T = max(s["video.npy"].shape[0] for s in samples)
    D = samples[0]["video.npy"].shape[1]
    video = np.zeros((len(samples), T, D), dtype=np.float32)
    mask = np.zeros((len(samples), T), dtype=bool)
    target = np.zeros((len(samples), T), dtype=np.float32)
    for i, s in enumerate(samples):
        v = s["video.npy"]
        video[i, : len(v)] = v
        mask[i, : len(v)] = True
        target[i, : len(v)] = _target(s["meta.json"], len(v))
    meta = [{**s["meta.json"], "query": s["query.txt"], "key": s["__key__"]} for s in samples]
    return Batch(
        video=torch.from_numpy(video), mask=torch.from_numpy(mask),
        text=torch.from_numpy(np.stack([s["text.npy"] for s in samples]).astype(np.float32)),
        video_id=torch.tensor([m["video_hash"] for m in meta], dtype=torch.long),
        target=torch.from_numpy(target), meta=meta,
    )


def _pinned(b: Batch) -> Batch:
    return Batch(b.video.pin_memory(), b.mask.pin_memory(), b.text.pin_memory(), b.video_id.pin_memory(),
                 b.target.pin_memory(), b.meta)


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch is cut into batches; the same on every process."""

    batches: int  # batches every process runs
    last: tuple[int, ...]  # size of the last batch of each process
    folded: int  # queries of a too-short global tail added to the batch before it (0: no fold)


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

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.source.urls)))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(idx)
        return idx

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

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """This process's batches of `epoch`, after skipping the first `skip` (mid-epoch resume)."""
        order = self._order(epoch)[self.rank :: self.world]
        plan = self.plan(epoch)
        n_batches = plan.batches
        stream = _Stream([self.source.urls[i] for i in order], [self.source.shas[i] for i in order],
                         self.source.manifest["dims"], self.shuffle_buffer if self.shuffle else 0,
                         seed=(self.seed * 7919 + epoch) * 131 + self.rank, verify=self.verify)
        # Own generator: DataLoader otherwise draws its base seed from the global RNG at every epoch,
        # which would shift the dropout stream of a run resumed mid-epoch.
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=gen,
                                         collate_fn=lambda x: x, prefetch_factor=8 if self.num_workers else None)
        it = iter(dl)
        for b in range(n_batches):
            want = plan.last[self.rank] if b == n_batches - 1 else self.batch_size
            samples = []
            for s in it:
                samples.append(s)
                if len(samples) == want:
                    break
            if not samples:
                break
            if b >= skip:
                batch = collate(samples)
                yield _pinned(batch) if self.pin_memory else batch
