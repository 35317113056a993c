"""The WebDataset loader: epochs, per-process and per-worker splitting, equal batch counts, padding."""

import pytest

from wsra_dist.data.loader import EpochLoader, ShardSource
from wsra_dist.data.records import DataError


def ids(batches):
    return [m["query_id"] for b in batches for m in b.meta]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_visits_every_query_once(planted_didemo, workers):
    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    loader = EpochLoader(src, 16, seed=3, shuffle=True, shuffle_buffer=30, num_workers=workers)
    got = ids(loader.epoch(0))
    assert sorted(got) == sorted(set(got)) and len(got) == src.num_samples
    assert got != ids(loader.epoch(1))  # a fresh shuffle every epoch ...
    assert got == ids(loader.epoch(0))  # ... deterministic for (seed, epoch)


def test_processes_split_shards_and_run_equal_batches(planted_didemo):
    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    assert len(src.urls) >= 2 and len(set(src.counts)) > 1  # uneven shards (queries per shard differ)
    for epoch in range(3):
        per_rank = [list(EpochLoader(src, 8, world=2, rank=r, seed=0).epoch(epoch)) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])  # no process waits in a collective for the other
        a, b = set(ids(per_rank[0])), set(ids(per_rank[1]))
        assert not a & b  # no query on two processes


def test_padding_masks_and_targets(planted_charades):
    src = ShardSource.open(str(planted_charades / "shards" / "train"))
    b = next(EpochLoader(src, 12, shuffle=False).epoch(0))
    lengths = b.mask.sum(1)
    assert b.video.shape[1] == int(lengths.max()) and len(set(lengths.tolist())) > 1
    for i in range(12):
        n = int(lengths[i])
        assert float(b.video[i, n:].abs().sum()) == 0.0
        assert abs(float(b.target[i, :n].sum()) - 1.0) < 1e-6 and float(b.target[i, n:].sum()) == 0.0


def test_mid_epoch_skip_and_too_many_processes(planted_didemo):
    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    loader = EpochLoader(src, 8, seed=1)
    full = ids(loader.epoch(2))
    assert ids(loader.epoch(2, skip=3)) == full[24:]
    with pytest.raises(DataError, match=r"shards for 99 processes: process .* would get no shards"):
        EpochLoader(src, 8, world=99, rank=0)
