"""A training split held as tensors on the training device; batches are gathered there by index.

At GPU speed the streaming loader (tar decoding, per-query Python collate, host-to-device copies) costs
more than the step itself.  When the split fits (`data.device_cache`, `fits`), it is read once through the
same checked shard reader (sha256, format checks) into:

* `video`: every video's rows stacked, (Σ T_v, D) (DiDeMo: 6 chunk rows per video), with each query's
  first row and length: a batch is one index gather, masked past each video's end (zeros, as collate pads);
* `text` (Q, Dt), `video_id` (Q,), and the supervised targets, flat like the videos.

The query order is not new: `CachedEpochLoader.order` feeds query *indices* through the streaming loader's
own stages (the shard order of `wds.detshuffle`, the split by process and by DataLoader worker, `wds.shuffle`
with the same seeded generator, the DataLoader's round-robin over workers) and cuts them with the same
`EpochLoader.plan`.  So a cached run sees exactly the batches a streaming run sees (tests compare the query
ids and the trained weights), and exactly-once per epoch, the shuffle, resume mid-epoch and the N-process
split keep the guarantees tested on the streaming loader.  Every process caches the whole split: the
shard-to-process assignment changes with each epoch's shuffle.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch

from .batch import Batch
from .loader import N_DIDEMO, EpochLoader, ShardSource, _target, expand_queries
from .records import DataError
from .shards import iter_shard

DEFAULT_FRACTION = 0.25  # data.device_cache_max_fraction: share of the GPU's memory the split may take (auto)


def estimated_bytes(source: ShardSource) -> int:
    """An upper bound of the cache's size from the manifest alone (before reading a shard)."""
    m = source.manifest
    dims = m.get("dims", {})
    q = int(m.get("num_queries") or source.num_samples)
    v = int(m.get("num_samples") or q)
    t = N_DIDEMO if source.layout == "didemo_chunks" else int(dims.get("max_snippets") or 1)
    d = int(dims.get("stored") or dims.get("video") or 1)
    return 4 * (v * t * d + q * (int(dims.get("text") or 1) + t + 4))


def use_cache(setting: str, source: ShardSource, device: torch.device, fraction: float) -> tuple[bool, str]:
    """(cache?, why) for data.device_cache = auto | true | false on `device`."""
    need = estimated_bytes(source)
    if setting == "false":
        return False, "data.device_cache=false"
    # `why` is printed inside parentheses after the outcome: no parentheses of its own, no repeated outcome
    if setting == "true":
        return True, "data.device_cache=true"
    if device.type != "cuda":
        return False, "data.device_cache=auto, and this is not a GPU: the streaming loader keeps host memory flat"
    total = torch.cuda.get_device_properties(device).total_memory
    est = f"the manifest's bound ~{need / 2**20:.0f} MiB"
    limit = f"{fraction:g} x {total / 2**30:.0f} GiB of GPU memory"
    if need <= fraction * total:
        return True, f"data.device_cache=auto: {est} fits in {limit}"
    return False, f"data.device_cache=auto: {est} exceeds {limit}, data.device_cache_max_fraction"


class SplitCache:
    """The tensors of one split on `device` (see the module doc); query i is the i-th query read."""

    def __init__(self, source: ShardSource, device: torch.device, verify: bool = True):
        layout = source.layout
        videos, texts, vids, tgts, metas = [], [], [], [], []
        v_first, v_len, q_video, t_first = [], [], [], []
        self.shard_queries: list[list[int]] = []
        rows = trows = 0
        for url, sha in zip(source.urls, source.shas):
            mine: list[int] = []
            last_video = None
            for s in expand_queries(iter_shard(url, source.manifest, sha if verify else None, source.read_timeout_s)):
                if s["video"] is not last_video:  # queries of one video share its array (expand_queries)
                    last_video = s["video"]
                    videos.append(np.asarray(last_video, dtype=np.float32))
                    v_first.append(rows)
                    v_len.append(len(last_video))
                    rows += len(last_video)
                t = N_DIDEMO if layout == "didemo_chunks" else v_len[-1]
                tgts.append(_target(s["meta"], t))
                t_first.append(trows)
                trows += t
                mine.append(len(texts))
                texts.append(np.asarray(s["text"], dtype=np.float32))
                vids.append(int(s["meta"]["video_hash"]))
                q_video.append(len(videos) - 1)
                metas.append({**s["meta"], "key": s["key"]})
            self.shard_queries.append(mine)
        if not texts:
            raise DataError(f"{source.name}: no queries to cache")
        put = lambda a, dt=None: torch.as_tensor(a, dtype=dt).to(device)  # noqa: E731
        self.layout, self.device, self.metas = layout, device, metas
        self.video = put(np.concatenate(videos))
        qv = np.asarray(q_video)
        self.first = put(np.asarray(v_first, dtype=np.int64)[qv])  # (Q,) first video row of each query
        self.length_host = np.asarray(v_len, dtype=np.int64)[qv]  # batch widths are decided on the host
        self.length = put(self.length_host)
        self.text = put(np.stack(texts))
        self.video_id_host = torch.as_tensor(np.asarray(vids, dtype=np.int64))
        self.video_id = self.video_id_host.to(device)
        self.target = put(np.concatenate(tgts))
        self.target_first = put(np.asarray(t_first, dtype=np.int64))

    @property
    def num_queries(self) -> int:
        return self.text.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.video, self.first, self.length, self.text,
                                                           self.video_id, self.target, self.target_first))

    def batch(self, idx: torch.Tensor, width: int, with_meta: bool = True, host_idx=None,
              global_idx=None) -> Batch:
        """The batch of queries `idx` (a device tensor), `width` snippets wide (DiDeMo: ignored); `host_idx` the
        same indices on the host (meta), `global_idx` the global batch's (every process's) indices on the host."""
        if self.layout == "didemo_chunks":
            rows = self.first[idx].unsqueeze(1) + torch.arange(6, device=self.device)
            video = self.video[rows]
            mask = torch.ones(idx.shape[0], N_DIDEMO, dtype=torch.bool, device=self.device)
            target = self.target[self.target_first[idx].unsqueeze(1) + torch.arange(N_DIDEMO, device=self.device)]
        else:
            ar = torch.arange(width, device=self.device)
            mask = ar < self.length[idx].unsqueeze(1)
            last = self.video.shape[0] - 1
            video = self.video[(self.first[idx].unsqueeze(1) + ar).clamp_max(last)]
            video = torch.where(mask.unsqueeze(-1), video, video.new_zeros(()))
            tl = self.target.shape[0] - 1
            target = self.target[(self.target_first[idx].unsqueeze(1) + ar).clamp_max(tl)]
            target = torch.where(mask, target, target.new_zeros(()))
        meta = [self.metas[i] for i in host_idx] if (with_meta and host_idx is not None) else []
        host_ids = self.video_id_host[global_idx] if global_idx is not None else None
        return Batch(video, mask, self.text[idx], self.video_id[idx], target, meta, host_ids)


def _roundrobin(streams: list[Iterator[int]]) -> Iterator[int]:
    """torch's DataLoader over an IterableDataset: one sample per worker in turn, exhausted workers skipped."""
    live = list(streams)
    while live:
        nxt = []
        for s in live:
            try:
                yield next(s)
                nxt.append(s)
            except StopIteration:
                pass
        live = nxt


class CachedEpochLoader(EpochLoader):
    """EpochLoader's batches (same plan, same order) gathered from a `SplitCache` on the device."""

    def __init__(self, source: ShardSource, cache: SplitCache, *args, with_meta: bool = True, **kwargs):
        super().__init__(source, *args, **kwargs)
        self.cache = cache
        self.with_meta = with_meta  # meta dicts per batch: only the test hooks read them in training
        self.pin_memory = False

    def order(self, epoch: int, rank: int | None = None) -> list[int]:
        """Process `rank`'s (default: this one's) query indices of `epoch` in the streaming loader's order."""
        import webdataset as wds

        rank = self.rank if rank is None else rank
        shards = self._order(epoch)[rank :: self.world]
        nw = max(self.num_workers, 1)
        streams = []
        for wid in range(nw):
            idx: Iterator[int] = (q for s in shards[wid::nw] for q in self.cache.shard_queries[s])
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(((self.seed * 7919 + epoch) * 131 + rank) * 64 + wid)
                idx = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(idx)
            streams.append(iter(idx))
        return list(_roundrobin(streams))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """This process's batches of `epoch` after the first `skip`, each knowing the global batch's video ids:
        every process computes every process's order (no communication, no device read)."""
        plan = self.plan(epoch)
        orders = [self.order(epoch, r) for r in range(self.world)]
        order = orders[self.rank]
        order_dev = torch.as_tensor(order, dtype=torch.long).to(self.cache.device)  # one copy per epoch
        start = 0
        for b in range(plan.batches):
            last = b == plan.batches - 1
            host = order[start : start + (plan.last[self.rank] if last else self.batch_size)]
            if not host:
                break
            if b >= skip:
                glob = [q for r, o in enumerate(orders)
                        for q in o[start : start + (plan.last[r] if last else self.batch_size)]]
                width = int(self.cache.length_host[host].max()) if self.cache.layout != "didemo_chunks" else 0
                yield self.cache.batch(order_dev[start : start + len(host)], width, self.with_meta, host, glob)
            start += self.batch_size
