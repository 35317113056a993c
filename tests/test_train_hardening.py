"""Trainer hardening: short epoch tails, batches of too few videos, recipe values, shards changed after
sharding, resume into another model shape, and checkpoints that must never run code."""

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from wsra_dist.config import ConfigError, load_recipe
from wsra_dist.data.loader import EpochLoader, EpochPlan, ShardSource
from wsra_dist.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "planted_didemo.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


# ------------------------------------------------------------------------------------------ helpers
def regroup(src: Path, dst: Path, sizes: list[int], videos: dict[int, int] | None = None, **manifest) -> Path:
    """Shards of exactly `sizes` queries from the queries of `src` (in order), one query per sample (a v2
    sample may hold any subset of a video's queries); `videos` maps a query index to a new video_hash (to
    build batches of few videos); extra keyword arguments go into the manifest."""
    from wsra_dist.data.shards import ShardWriter, encode_sample, iter_shard, load_manifest

    m = load_manifest(src)
    queries = []
    for s in m["shards"]:
        for v in iter_shard(str(src / s["name"]), m):
            meta = v["meta.json"]
            for j, q in enumerate(meta["queries"]):
                queries.append((v["video.npy"], v["text.npy"][j : j + 1], {**meta, "queries": [q]}))
    assert sum(sizes) <= len(queries)
    shards, i = [], 0
    dst.mkdir(parents=True)
    for n, size in enumerate(sizes):
        w = ShardWriter(dst / f"part{n}", size)
        for q in range(i, i + size):
            video, text, meta = queries[q]
            if videos and q in videos:
                meta = {**meta, "video_hash": videos[q]}
            w.write(f"{q:08d}", encode_sample(video, text, meta), 1)
        w.finish({})
        os.replace(dst / f"part{n}" / "shard-000000.tar", dst / f"shard-{n:06d}.tar")
        shutil.rmtree(dst / f"part{n}")
        i += size
        raw = (dst / f"shard-{n:06d}.tar").read_bytes()
        shards.append({"name": f"shard-{n:06d}.tar", "num_samples": size, "num_queries": size,
                       "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
    m.update(shards=shards, num_samples=sum(sizes), num_queries=sum(sizes), **manifest)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst


def _overrides(shards, out, batch, steps=0, extra=(), optim="sgd", lr=0.01):
    return [f"data.train_shards={shards}", "data.val_shards=", "data.test_shards=", f"train.max_steps={steps}",
            f"train.batch_size={batch}", f"optim.name={optim}", f"optim.lr={lr}", "data.shuffle=false",
            "data.num_workers=0", "seed=0", f"output_dir={out}", "train.progress=false", "train.epochs=1", *extra]


def _train(*overrides):
    from wsra_dist.train import train

    return train(load_recipe(RECIPE, list(overrides)))


def _history(run) -> dict:
    return json.loads((Path(run) / "history.json").read_text())


from .helpers import load_weights as _weights  # noqa: E402
from .helpers import max_weight_diff as _max_diff  # noqa: E402
from .helpers import run_checked as _run  # noqa: E402
from .helpers import reseal_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def base(planted_didemo):
    return planted_didemo / "shards" / "train"  # 94 queries of 40 videos, unique sentences


# ------------------------------------------------------------------------------ 1. epoch tails
def _plan(counts, batch, world, need, epoch=0, shuffle=False):
    src = ShardSource([f"s{i}.tar" for i in range(len(counts))], list(counts), [""] * len(counts), {"dims": {}},
                      name="data/x")
    return [EpochLoader(src, batch, world, r, seed=0, shuffle=shuffle, min_global_batch=need).plan(epoch)
            for r in range(world)]


@pytest.mark.parametrize("counts, batch, world, expected", [
    ([45], 42, 1, EpochPlan(1, (45,), 3)),  # 42 + 3 -> one batch of 45
    ([2761], 46, 1, EpochPlan(60, (47,), 1)),  # 60 x 46 + 1 -> the 60th batch holds 47
    ([1000, 1000, 761], 46, 1, EpochPlan(60, (47,), 1)),
    ([48], 16, 1, EpochPlan(3, (16,), 0)),  # no tail
    ([40], 16, 1, EpochPlan(3, (8,), 0)),  # a tail of 8 >= 7 stays a batch
    ([12, 12], 5, 2, EpochPlan(2, (7, 7), 4)),  # 2 x (5 + 5 + 2): global tail 4 -> folded
    ([12, 12], 4, 2, EpochPlan(3, (4, 4), 0)),
    ([8, 8, 8, 8, 8, 8, 2, 1], 8, 2, EpochPlan(3, (10, 9), 3)),
])
def test_plan_folds_a_short_global_tail(counts, batch, world, expected):
    plans = _plan(counts, batch, world, need=7)
    assert all(p == expected for p in plans)  # the same plan on every process


def test_plan_never_leaves_a_global_batch_below_the_minimum():
    rng = random.Random(0)
    for _ in range(400):
        world, need = rng.randint(1, 4), rng.randint(1, 12)
        batch = rng.randint(max(1, -(-need // world)), 50)
        counts = [rng.randint(1, 300) for _ in range(rng.randint(world, 3 * world))]
        for epoch in range(3):
            try:
                p = _plan(counts, batch, world, need, epoch, shuffle=True)[0]
            except DataError as e:
                assert "single global batch" in str(e)
                continue
            from wsra_dist.data.loader import shard_order

            order = shard_order(len(counts), 0, epoch, True)
            per_rank = [sum(counts[i] for i in order[r::world]) for r in range(world)]
            full = min(-(-c // batch) for c in per_rank)  # batches without folding
            sizes = [[batch] * (p.batches - 1) + [p.last[r]] for r in range(world)]
            glob = [sum(s[b] for s in sizes) for b in range(p.batches)]
            assert min(glob) >= need and all(0 < s <= 2 * batch for row in sizes for s in row)
            for r in range(world):  # exactly the queries the old rule read: folding drops nothing
                assert sum(sizes[r]) == min(per_rank[r], full * batch)
            assert p.batches in (full, full - 1) and (p.folded > 0) == (p.batches == full - 1)


def test_loader_batches_follow_the_plan(base, tmp_path):
    shards = regroup(base, tmp_path / "s", [8, 8, 8, 8, 8, 8, 2, 1])
    src = ShardSource.open(str(shards))
    ranks = [list(EpochLoader(src, 8, 2, r, shuffle=False, min_global_batch=7).epoch(0)) for r in range(2)]
    assert [len(b.meta) for b in ranks[0]] == [8, 8, 10] and [len(b.meta) for b in ranks[1]] == [8, 8, 9]
    ids = [m["query_id"] for bs in ranks for b in bs for m in b.meta]
    assert len(ids) == len(set(ids)) == 51  # every query once, none dropped
    one = list(EpochLoader(src, 16, shuffle=False, min_global_batch=7).epoch(0))
    assert [len(b.meta) for b in one] == [16, 16, 19]
    skipped = list(EpochLoader(src, 16, shuffle=False, min_global_batch=7).epoch(0, skip=2))
    assert [m["query_id"] for m in skipped[0].meta] == [m["query_id"] for m in one[2].meta]


def test_45_queries_at_batch_42_train_every_epoch(base, tmp_path, capsys):
    shards = regroup(base, tmp_path / "s", [20, 25])
    out = tmp_path / "run"
    _train(*_overrides(shards, out, 42, 0, ["train.epochs=3", "train.keep_checkpoints=3"]))
    h = _history(out)
    assert h["steps"] == 3 and h["train_samples"] == 135 and [e["epoch"] for e in h["epochs"]] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002", "step-00000003"]
    assert "the last 3 queries are folded into batch 1" in capsys.readouterr().out


def test_an_epoch_too_small_for_one_global_batch_fails_at_start(base, tmp_path):
    shards = regroup(base, tmp_path / "s", [5])
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"single global batch of 5 queries.*fewer than the 7"):
        _train(*_overrides(shards, out, 42))
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_fold_tail_and_few_video_batch_like_one_process(base, tmp_path):
    """2 gloo processes x 8 == 1 process x 16 through a folded tail and a batch of a single video.

    Shards 8,8,8,8,8,8,2,1: rank r reads shards r, r+2, ...; the global tail (2 + 1) is folded into
    batch 3 on both ranks; batch 2 (shards 2 and 3) is relabelled to one video, so both runs train it
    without the sampler terms.
    """
    shards = regroup(base, tmp_path / "s", [8, 8, 8, 8, 8, 8, 2, 1], videos={q: 999_999 for q in range(16, 32)})
    one, two = tmp_path / "one", tmp_path / "two"
    mod = ["-m", "wsra_dist.train", str(RECIPE)]
    p1 = _run([sys.executable, *mod, *_overrides(shards, one, 16, lr=0.5)])
    p2 = _run([*LAUNCH, "--multi_gpu", "--num_processes", "2", *mod, *_overrides(shards, two, 8, lr=0.5)])
    for p in (p1, p2):
        text = p.stdout + p.stderr
        assert "the last 3 queries are folded into batch 3" in text
        assert re.search(r"warning: epoch 1 batch 2: 16 queries of 1 videos.*left out of this step", text)
    assert "training on 2 process(es)" in p2.stdout + p2.stderr
    h1, h2 = _history(one), _history(two)
    assert h1["steps"] == h2["steps"] == 3 and h1["train_samples"] == h2["train_samples"] == 51
    assert (two / "checkpoints" / "step-00000003" / "train_state.json").is_file()
    assert _max_diff(_weights(one), _weights(two)) <= 1e-5


# --------------------------------------------------------------- 1b. batches of too few videos
def test_batch_of_too_few_videos_trains_without_sampler_terms(base, tmp_path, capsys):
    # batch 2: 12 queries of one video + 4 of another: a query of the first has 4 other-video queries,
    # K_top 3 + K_last 2 leave it no hard negative.
    videos = {**{q: 111 for q in range(16, 28)}, **{q: 222 for q in range(28, 32)}}
    shards = regroup(base, tmp_path / "s", [16, 16], videos=videos)
    _train(*_overrides(shards, tmp_path / "a", 16))
    assert _history(tmp_path / "a")["steps"] == 2
    out = capsys.readouterr().out
    assert "batch 2: 16 queries of 2 videos: a query has only 4 queries of other videos" in out
    assert "L_snippet/L_batch left out of this step" in out and "batch 1:" not in out
    # only sampler-based terms weighted: the batch is skipped, the other one trains
    only = ["loss.w_video=0", "loss.w_cross=0"]
    _train(*_overrides(shards, tmp_path / "b", 16, extra=only))
    assert _history(tmp_path / "b")["steps"] == 1
    assert "batch 2" in capsys.readouterr().out
    # the hard-negative cross term needs the sampler too
    _train(*_overrides(shards, tmp_path / "c", 16, extra=[*only, "loss.w_cross=1", "loss.cross_negatives=hard"]))
    assert _history(tmp_path / "c")["steps"] == 1
    assert "the batch is skipped (no optimizer step)" in capsys.readouterr().out


def test_no_batch_usable_by_the_sampler_is_an_error_not_an_untrained_model(base, tmp_path):
    shards = regroup(base, tmp_path / "s", [16, 16], videos={q: q // 16 for q in range(32)})
    out = tmp_path / "run"
    with pytest.raises(DataError, match="nothing was trained"):
        _train(*_overrides(shards, out, 16, extra=["loss.w_video=0", "loss.w_cross=0"]))
    assert not (out / "model.safetensors").exists()
    one = regroup(base, tmp_path / "one", [16, 16], num_videos=1)  # known from the manifest: at start-up
    with pytest.raises(DataError, match="queries of other videos"):
        _train(*_overrides(one, tmp_path / "r1", 16))
    assert not (tmp_path / "r1" / "checkpoints").exists()


# ---------------------------------------------------------------------- 2. recipe values
@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs"), ("train.epochs=-2", "train.epochs"), ("train.max_steps=-1", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"), ("train.batch_size=-8", "train.batch_size"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=-0.001", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("train.log_every=0", "train.log_every"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.process_group_timeout_s=0", "train.process_group_timeout_s"),
    ("train.process_group_timeout_s=-1", "train.process_group_timeout_s"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"), ("eval.batch_size=0", "eval.batch_size"),
    ("data.num_workers=-1", "data.num_workers"), ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("model.hidden=0", "model.hidden"), ("model.depth=-1", "model.depth"), ("model.dropout=1.5", "model.dropout"),
    ("loss.w_snippet=-1", "loss.w_snippet"), ("loss.tau=0", "loss.tau"), ("loss.k_top=-1", "loss.k_top"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.beta2=1.5", "optim.beta2"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("seed=-1", "seed"), ("output_dir=", "output_dir"),
    ("eval.charades_filter=loose", "eval.charades_filter"),
])
def test_recipe_values_that_cannot_train_name_their_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_recipe(RECIPE, [override])


def test_all_loss_weights_zero_and_recipes_built_in_python(base, tmp_path):
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        load_recipe(RECIPE, ["loss.w_video=0", "loss.w_snippet=0", "loss.w_batch=0", "loss.w_cross=0"])
    from wsra_dist.train import train

    out = tmp_path / "run"
    for attr, value, key in (("epochs", 0, "train.epochs"), ("max_steps", -3, "train.max_steps"),
                             ("log_every", 0, "train.log_every")):
        r = load_recipe(RECIPE, _overrides(base, out, 16))
        setattr(r.train, attr, value)  # set after loading: train() validates again
        with pytest.raises(ConfigError, match=re.escape(key)):
            train(r)
    assert not out.exists()


# -------------------------------------------------------- 3. shards changed after sharding
@pytest.fixture()
def shard_copy(planted_didemo, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(planted_didemo / "shards", d)
    return d


@pytest.mark.parametrize("split, change", [("train", "delete"), ("train", "truncate"), ("train", "grow"),
                                           ("val", "delete"), ("val", "truncate"), ("test", "delete"),
                                           ("test", "truncate")])
def test_missing_or_resized_shard_fails_before_step_1(shard_copy, tmp_path, split, change):
    victim = shard_copy / split / "shard-000000.tar"
    if change == "delete":
        victim.unlink()
    elif change == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1024])
    else:
        victim.write_bytes(victim.read_bytes() + b"\0" * 512)
    out = tmp_path / "run"
    ov = _overrides(shard_copy / "train", out, 16, 0, [f"data.val_shards={shard_copy / 'val'}",
                                                        f"data.test_shards={shard_copy / 'test'}"])
    want = "is missing" if change == "delete" else "bytes but the manifest records"
    with pytest.raises(DataError, match=re.escape(str(victim)) + ".*" + want + rf".*data\.{split}_shards"):
        _train(*ov)  # later overrides win: val and test are the copies
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_shard_check_skips_remote_sources(shard_copy):
    d = shard_copy / "train"
    src = ShardSource.open(f"pipe:cat {d}/shard-{{000000..000001}}.tar", str(d / "manifest.json"))
    (d / "shard-000001.tar").unlink()
    src.check_files("data.train_shards")  # streams are checked while they are read, not up front
    with pytest.raises(DataError, match="shard-000001.tar: shard listed in the manifest is missing"):
        ShardSource.open(str(d)).check_files("data.train_shards")


# ---------------------------------------------------------------- 4. resume, another shape
@pytest.fixture(scope="module")
def small_run(planted_didemo, tmp_path_factory):
    """2 steps of hidden=32 with a checkpoint after each (step 2 is mid-epoch: 94 queries at 16)."""
    out = tmp_path_factory.mktemp("small") / "run"
    _train(*_overrides(planted_didemo / "shards" / "train", out, 16, 2, [*SMALL, "train.checkpoint_every=1"],
                       optim="adam", lr=1e-3))
    return out


SMALL = ["model.hidden=32", "model.dropout=0.1", "data.shuffle=true", "data.shuffle_buffer=10"]


@pytest.mark.parametrize("override, named", [
    ("model.hidden=64", "model.hidden is 64 here, 32 in the checkpoint"),
    ("model.depth=2", "model.depth is 2 here, 1 in the checkpoint"),
    ("model.input_norm=layernorm", "model.input_norm is 'layernorm' here, 'l2' in the checkpoint"),
])
def test_resume_into_another_model_shape_names_the_keys(small_run, planted_didemo, tmp_path, override, named):
    ck = small_run / "checkpoints" / "step-00000002"
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match=re.escape(named)):
        _train(*_overrides(planted_didemo / "shards" / "train", out, 16, 4, ["model.hidden=32", override,
                                                                              f"resume={ck}"], optim="adam"))
    assert not (out / "checkpoints").exists()


def test_resume_with_other_feature_dims_names_the_shards(small_run, planted_charades, tmp_path):
    ck = small_run / "checkpoints" / "step-00000002"
    with pytest.raises(ConfigError, match=r"video feature dim of data\.train_shards is 1024 here, 2048 in the checkpoint"):
        _train(*_overrides(planted_charades / "shards" / "train", tmp_path / "r", 16, 4,
                           ["model.hidden=32", f"resume={ck}"], optim="adam"))


def test_resume_mid_epoch_with_another_batch_size_is_refused(small_run, planted_didemo, tmp_path):
    ck = small_run / "checkpoints" / "step-00000002"
    with pytest.raises(ConfigError, match=r"mid-epoch with 1 process\(es\) x train.batch_size=16"):
        _train(*_overrides(planted_didemo / "shards" / "train", tmp_path / "r", 8, 4,
                           ["model.hidden=32", f"resume={ck}"], optim="adam"))
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        _train(*_overrides(planted_didemo / "shards" / "train", tmp_path / "r", 16, 4,
                           ["model.hidden=32", f"resume={tmp_path / 'nowhere'}"], optim="adam"))


# ------------------------------------------------------------- 5. checkpoints never run code
class Payload:
    """Unpickling this writes `marker` (what a planted checkpoint would do with pickle.load)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _payload_bytes(kind: str, marker: Path) -> bytes:
    if kind.startswith("pickle"):
        return pickle.dumps(Payload(marker), protocol=int(kind[6:] or pickle.DEFAULT_PROTOCOL))
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)  # a real torch zip file whose data.pkl runs code
    return buf.getvalue()


def test_the_payload_is_live(tmp_path):
    """Sanity for the tests below: a plain unpickler runs the payload."""
    m = tmp_path / "live"
    pickle.loads(_payload_bytes("pickle", m))
    assert m.read_text() == "pwned"
    m.unlink()
    torch.load(io.BytesIO(_payload_bytes("torch", m)), weights_only=False)
    assert m.is_file()


STATE_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json", "wsra_model.json"]


def _resume(planted_didemo, ck, out, steps=3):
    return _train(*_overrides(planted_didemo / "shards" / "train", out, 16, steps,
                              [*SMALL, f"resume={ck}", "train.checkpoint_every=1"], optim="adam", lr=1e-3))


def test_resume_never_unpickles_planted_payloads(small_run, planted_didemo, tmp_path):
    ck = small_run / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ck.iterdir()) == sorted(STATE_FILES + ["recipe.yaml", "checkpoint_manifest.json"])
    # (no pickled TrainState)
    marker = tmp_path / "PWNED"
    for name in STATE_FILES:
        for kind in ("pickle", "pickle2", "torch"):
            bad = tmp_path / f"{name}-{kind}"
            shutil.copytree(ck, bad)
            (bad / name).write_bytes(_payload_bytes(kind, marker))
            with pytest.raises(ConfigError, match=re.escape(name) + " sha256 differs|" + re.escape(name) + " has"):
                _resume(planted_didemo, bad, tmp_path / f"out-{name}-{kind}-unsealed")  # the manifest sees it
            reseal_checkpoint(bad)  # ... and with a manifest that agrees, the loaders themselves refuse it
            with pytest.raises(ConfigError, match=re.escape(name)):
                _resume(planted_didemo, bad, tmp_path / f"out-{name}-{kind}")
            assert not marker.exists(), f"{name} ({kind}) ran code"
            assert not (tmp_path / f"out-{name}-{kind}" / "checkpoints").exists()
    # files the loader never opens: accelerate's custom-object pickle, scheduler/sampler states, the recipe copy
    extra = tmp_path / "extra"
    shutil.copytree(ck, extra)
    for name in ("custom_checkpoint_0.pkl", "scheduler.bin", "sampler.bin"):
        (extra / name).write_bytes(_payload_bytes("torch", marker))
    (extra / "recipe.yaml").write_bytes(_payload_bytes("pickle", marker))
    reseal_checkpoint(extra)
    _resume(planted_didemo, extra, tmp_path / "out-extra")
    assert not marker.exists() and _history(tmp_path / "out-extra")["steps"] == 3
    # a folder with only the old pickled state is refused, and says why
    old = tmp_path / "old"
    shutil.copytree(extra, old)
    (old / "train_state.json").unlink()
    reseal_checkpoint(old)
    with pytest.raises(ConfigError, match="custom_checkpoint_0.pkl is a pickle and is not loaded"):
        _resume(planted_didemo, old, tmp_path / "out-old")
    # without wsra_model.json the recipe copy is read with yaml.safe_load: python tags are refused
    tag = tmp_path / "tag"
    shutil.copytree(ck, tag)
    (tag / "wsra_model.json").unlink()
    (tag / "recipe.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    reseal_checkpoint(tag)
    with pytest.raises(ConfigError, match="recipe.yaml is not readable YAML"):
        _resume(planted_didemo, tag, tmp_path / "out-tag")
    assert not marker.exists()
    assert not any(p.name == "PWNED" for p in tmp_path.rglob("*"))


def test_resume_restores_state_exactly(small_run, planted_didemo, tmp_path):
    """In-process: 2 steps + resume to 4 == 4 steps straight (weights, optimizer, RNG and position)."""
    full = tmp_path / "full"
    _train(*_overrides(planted_didemo / "shards" / "train", full, 16, 4, SMALL, optim="adam", lr=1e-3))
    cut = tmp_path / "cut"
    _resume(planted_didemo, small_run / "checkpoints" / "step-00000002", cut, steps=4)
    assert _max_diff(_weights(full), _weights(cut)) <= 1e-7
    st = json.loads((cut / "checkpoints" / "step-00000004" / "train_state.json").read_text())
    assert (st["step"], st["epoch"], st["batch_in_epoch"], st["samples"]) == (4, 0, 4, 64)


@pytest.mark.slow
def test_deepspeed_resume_never_unpickles_planted_payloads(planted_didemo, tmp_path):
    """DeepSpeed reads its own files (pytorch_model/*.pt) through the same weights_only loader."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    cmd = [*LAUNCH, "--config_file", str(ROOT / "recipes" / "deepspeed_zero2.yaml"), "--num_processes", "2",
           "-m", "wsra_dist.train", str(RECIPE)]
    extra = ["train.checkpoint_every=1", "train.process_group_timeout_s=60"]
    _run([*cmd, *_overrides(planted_didemo / "shards" / "train", out, 8, 1, extra, optim="adamw", lr=1e-3)])
    ck = out / "checkpoints" / "step-00000001"
    marker = tmp_path / "PWNED"
    planted = [*(ck / "pytorch_model").glob("*.pt"), *ck.glob("random_states_*.pkl"), ck / "custom_checkpoint_0.pkl"]
    assert len(planted) >= 5
    for f in planted:
        f.write_bytes(_payload_bytes("torch", marker))
    reseal_checkpoint(ck)
    p = _run([*cmd, *_overrides(planted_didemo / "shards" / "train", out, 8, 2, [*extra, f"resume={ck}"],
                                optim="adamw", lr=1e-3)], check=False)
    assert p.returncode != 0 and "cannot be loaded safely" in p.stdout + p.stderr
    assert not marker.exists()
