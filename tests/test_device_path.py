"""The GPU-first training path, checked on the CPU: the device-resident split (data.device_cache) gives the
streaming loader's batches exactly; the step reads no tensor value on the host; the graphed step (emulated
here: WSRA_TEST_EMULATE_GRAPH) trains the same weights as the eager step."""

import json

import pytest
import torch

from wsra_dist.data.device_cache import CachedEpochLoader, SplitCache, estimated_bytes, use_cache
from wsra_dist.data.loader import EpochLoader, ShardSource

from .helpers import load_weights, max_weight_diff
from .test_train import exact_shards  # noqa: F401 (fixture)

FIELDS = ("video", "mask", "text", "video_id", "target")


def _same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert [m["key"] for m in x.meta] == [m["key"] for m in y.meta]
        for f in FIELDS:
            assert torch.equal(getattr(x, f), getattr(y, f)), f
    return a, b


@pytest.mark.parametrize("layout", ["didemo", "charades"])
@pytest.mark.parametrize("workers", [0, 2])
def test_cached_batches_equal_streaming_batches(layout, workers, planted_didemo, planted_charades):
    root = planted_didemo if layout == "didemo" else planted_charades
    src = ShardSource.open(str(root / "shards" / "train"))
    cache = SplitCache(src, torch.device("cpu"))
    kw = dict(seed=3, shuffle=True, shuffle_buffer=30, num_workers=workers)
    for world in (1, 2):
        for epoch in (0, 1):
            per_rank = []
            for rank in range(world):
                _, got = _same_batches(EpochLoader(src, 7, world, rank, **kw).epoch(epoch),
                                       CachedEpochLoader(src, cache, 7, world, rank, **kw).epoch(epoch))
                per_rank.append(got)
            # every batch knows the global batch's video ids (all processes, rank order) on the host
            for step in zip(*per_rank):
                glob = torch.cat([b.video_id for b in step])
                assert all(torch.equal(b.host_video_id, glob) for b in step)
            ids = [m["query_id"] for r in per_rank for b in r for m in b.meta]
            assert len(ids) == len(set(ids))  # no query twice in an epoch, on any process


def test_cached_resume_skip_and_fold_match_streaming(planted_didemo):
    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    cache = SplitCache(src, torch.device("cpu"))
    n = src.num_samples
    # a batch size that leaves a tail too short for the sampler: folded into the batch before it
    bs = next(b for b in range(9, 40) if 0 < n % b < 7)
    kw = dict(seed=1, shuffle=True, shuffle_buffer=50, min_global_batch=7)
    stream, cached = EpochLoader(src, bs, **kw), CachedEpochLoader(src, cache, bs, **kw)
    assert stream.plan(0).folded
    _same_batches(stream.epoch(0, skip=2), cached.epoch(0, skip=2))
    full = list(cached.epoch(0))
    assert sum(b.video.shape[0] for b in full) == n


def test_cache_decision_and_size_bound(planted_charades):
    src = ShardSource.open(str(planted_charades / "shards" / "train"))
    cache = SplitCache(src, torch.device("cpu"))
    assert estimated_bytes(src) >= cache.nbytes  # the manifest bound is an upper bound
    assert use_cache("auto", src, torch.device("cpu"), 0.25)[0] is False  # auto: GPUs only
    assert use_cache("true", src, torch.device("cpu"), 0.25)[0] is True
    assert use_cache("false", src, torch.device("cpu"), 0.25)[0] is False


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on anything that copies a tensor value to the host (a sync on a GPU) or has a data-dependent shape."""

    FORBIDDEN = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
                 "masked_select", "cpu"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.FORBIDDEN:
            raise AssertionError(f"host read in the step: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["didemo", "charades"])
def test_the_step_reads_nothing_on_the_host(layout, planted_didemo, planted_charades):
    """objective (every term, the sampler) + backward + clipping + SGD with momentum, under a mode that refuses
    host reads.  (Adam reads its CPU step counter; on CUDA the trainer builds it `capturable`, which keeps the
    counter on the device: torch's own capturable path, not testable on a CPU.)"""
    from accelerate import Accelerator

    from wsra_dist.config import load_recipe
    from wsra_dist.distributed import Gatherer
    from wsra_dist.evaluation.predict import model_from_info
    from wsra_dist.step import EagerStep
    from wsra_dist.train import build_optimizer, model_info

    root = planted_didemo if layout == "didemo" else planted_charades
    src = ShardSource.open(str(root / "shards" / "train"))
    recipe = load_recipe(None, ["loss.w_cross=1", "loss.w_supervised=0.5", "optim.grad_clip=1.0", "model.dropout=0.1",
                                "optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.1"])
    model = model_from_info(model_info(recipe, src.manifest)).train()
    opt = build_optimizer(recipe, model.parameters())
    step = EagerStep(model, opt, Accelerator(cpu=True), recipe.optim.grad_clip)
    batch = next(CachedEpochLoader(src, SplitCache(src, torch.device("cpu")), 16).epoch(0))
    before = [p.detach().clone() for p in model.parameters()]
    with _NoHostReads():
        out = step(batch, recipe.loss, Gatherer(16), want_norm=True)
    assert set(out.terms) == {"video", "snippet", "batch", "cross", "supervised"}
    assert out.grad_norm is not None and float(out.grad_norm) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(AssertionError, match="host read"):  # the mode does catch a host read
        with _NoHostReads():
            bool(out.loss > 0)


def _train(tmp, shards, name, *extra, env=None, monkeypatch=None):
    from wsra_dist.config import load_recipe
    from wsra_dist.train import train

    from .test_train import RECIPE

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    r = load_recipe(str(RECIPE), [f"data.train_shards={shards}", "data.val_shards=", "data.test_shards=",
                                  "train.epochs=2", "train.batch_size=16", "train.progress=false", "seed=0",
                                  f"output_dir={tmp / name}", "data.num_workers=0", "optim.lr=1e-3", *extra])
    train(r)
    for k in env or {}:
        monkeypatch.delenv(k)
    return tmp / name


@pytest.mark.parametrize("layout", ["didemo", "charades"])
def test_cached_and_graphed_training_equal_streaming_eager(layout, tmp_path, planted_didemo, planted_charades,
                                                           monkeypatch):
    root = planted_didemo if layout == "didemo" else planted_charades
    shards = root / "shards" / "train"
    extra = ["data.shuffle_buffer=20", "model.dropout=0.1", "optim.grad_clip=5.0"]
    ref = _train(tmp_path, shards, "stream", *extra, "data.device_cache=false")
    cached = _train(tmp_path, shards, "cached", *extra, "data.device_cache=true")
    graphed = _train(tmp_path, shards, "graphed", *extra, "data.device_cache=true", "train.cuda_graph=true",
                     env={"WSRA_TEST_EMULATE_GRAPH": "1"}, monkeypatch=monkeypatch)
    assert max_weight_diff(load_weights(ref), load_weights(cached)) == 0.0
    assert max_weight_diff(load_weights(ref), load_weights(graphed)) <= 1e-6
    h = json.loads((graphed / "history.json").read_text())
    assert h["graph_replays"] > 0 and json.loads((ref / "history.json").read_text())["graph_replays"] == 0
    assert [e["loss/total"] for e in h["epochs"]] == pytest.approx(
        [e["loss/total"] for e in json.loads((ref / "history.json").read_text())["epochs"]], rel=1e-5)


def test_recipe_keys_validated():
    from wsra_dist.config import ConfigError, load_recipe

    r = load_recipe(None, ["data.device_cache=true", "train.cuda_graph=false"])
    assert (r.data.device_cache, r.train.cuda_graph) == ("true", "false")  # YAML booleans become the words
    for bad in ("data.device_cache=maybe", "train.cuda_graph=sometimes", "data.device_cache_max_fraction=0",
                "model.pair_kernel=cuda"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_recipe(None, [bad])


@pytest.mark.slow
def test_two_cached_processes_equal_one_streaming_process(exact_shards, tmp_path):
    """The N-process split of the cached loader: 2 x 8 with the split on each process's device = 1 x 16 streamed
    (no shuffle, as the streaming equivalence test: the shuffled orders are compared per rank above)."""
    import sys

    from .helpers import run_checked
    from .test_train import LAUNCH, RECIPE, _overrides

    one, two = tmp_path / "one", tmp_path / "two"
    run_checked([sys.executable, "-m", "wsra_dist.train", str(RECIPE),
                 *_overrides(exact_shards, one, 16, 3, "adam", lr=1e-4)])
    run_checked([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "wsra_dist.train", str(RECIPE),
                 *_overrides(exact_shards, two, 8, 3, "adam", ["data.device_cache=true"], lr=1e-4)])
    assert max_weight_diff(load_weights(one), load_weights(two)) <= 1e-5
