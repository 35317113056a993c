"""Bad input while sharding and grounding, and the one error path: every case is a clear error naming
the file/line/sample, nothing the user had is lost, and no half-written set is left behind."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsra_dist.data import charades as CH
from wsra_dist.data import didemo as DD
from wsra_dist.data.pack import shard_charades, shard_didemo
from wsra_dist.data.records import DataError
from wsra_dist.data.shards import MANIFEST, ShardWriter, load_manifest, verify
from wsra_dist.ground import check_duration, check_queries, read_features

from . import helpers

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return helpers.run_cli(*args, check=False, env=env)


@pytest.fixture()
def charades_copy(planted_charades, tmp_path):
    """A private copy of the planted Charades-STA files (test split) that a test may corrupt."""
    src = planted_charades / "data"
    d = tmp_path / "data"
    d.mkdir()
    for n in ("charades_sta_test.txt", "Charades_v1_test.csv"):
        shutil.copy(src / n, d / n)
    shutil.copytree(src / "features", d / "features")
    return d


def _shard(d: Path, out: Path, cache: Path, **kw):
    return shard_charades(d / "charades_sta_test.txt", d / "Charades_v1_test.csv", d / "features", out, 5,
                          progress=False, cache_dir=str(cache), **kw)


def _last_video(d: Path) -> str:
    return d.joinpath("charades_sta_test.txt").read_text().splitlines()[-1].split()[0]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("bad", ["nan", "inf", "wrong_dim", "empty", "one_d", "four_d_wrong", "strings"])
def test_a_bad_late_video_leaves_the_previous_set_intact(charades_copy, planted_charades, tmp_path, bad):
    out = tmp_path / "out"
    _shard(charades_copy, out, planted_charades / "cache")
    (out / "NOTES.txt").write_text("mine")  # a file of the user's in --out
    before = _snapshot(out)
    vid = _last_video(charades_copy)
    f = charades_copy / "features" / f"{vid}.npy"
    x = np.load(f)
    arr = {"nan": np.where(np.arange(x.size).reshape(x.shape) == x.size - 1, np.nan, x),
           "inf": np.full_like(x, np.inf), "wrong_dim": x[:, :-1], "empty": x[:0], "one_d": x[0],
           "four_d_wrong": x.reshape(x.shape[0], 1, -1, 1), "strings": np.array([["a", "b"]])}[bad]
    np.save(f, arr)
    with pytest.raises(DataError) as e:
        _shard(charades_copy, out, planted_charades / "cache")
    assert vid in str(e.value)
    assert _snapshot(out) == before and verify(out) == []
    assert not list(tmp_path.glob(".out.staging-*"))


def test_foreign_shard_files_are_refused_never_deleted(charades_copy, planted_charades, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000003.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="shard-000003.tar"):
        _shard(charades_copy, out, planted_charades / "cache")
    assert (out / "shard-000003.tar").read_bytes() == b"someone else's"
    assert not (out / MANIFEST).exists()


def test_reshard_replaces_only_our_files_and_is_reproducible(charades_copy, planted_charades, tmp_path):
    out = tmp_path / "out"
    m1 = _shard(charades_copy, out, planted_charades / "cache")
    (out / "NOTES.txt").write_text("mine")
    m2 = shard_charades(charades_copy / "charades_sta_test.txt", charades_copy / "Charades_v1_test.csv",
                        charades_copy / "features", out, 1000, progress=False, cache_dir=str(planted_charades / "cache"))
    assert len(m2["shards"]) == 1 and sorted(p.name for p in out.iterdir()) == ["NOTES.txt", MANIFEST, "shard-000000.tar"]
    assert verify(out) == []
    # same input, same bytes: re-sharding gives the same sha256 for every shard
    m3 = _shard(charades_copy, tmp_path / "again", planted_charades / "cache")
    assert [s["sha256"] for s in m3["shards"]] == [s["sha256"] for s in m1["shards"]]
    assert all(not os.path.isabs(s["path"]) for s in m3["sources"])


def test_full_disk_while_writing_is_a_clear_error_and_changes_nothing(charades_copy, planted_charades, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"
    _shard(charades_copy, out, planted_charades / "cache")
    before = _snapshot(out)
    real = ShardWriter.write
    calls = {"n": 0}

    def full(self, key, fields, queries=0):
        calls["n"] += 1
        if calls["n"] > 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, fields, queries)

    monkeypatch.setattr(ShardWriter, "write", full)
    with pytest.raises(DataError, match="No space left on device") as e:
        _shard(charades_copy, out, planted_charades / "cache")
    assert "nothing was changed" in str(e.value)
    assert _snapshot(out) == before and verify(out) == []
    assert not list(tmp_path.glob(".out.staging-*"))


def test_bad_out_places_fail_before_any_encoding(charades_copy, planted_charades, tmp_path, monkeypatch):
    import wsra_dist.data.text as text

    def boom(*a, **k):  # the output place is checked before the text model is even loaded
        raise AssertionError("text encoder was loaded")

    monkeypatch.setattr(text, "TextEncoder", boom)
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        _shard(charades_copy, f, planted_charades / "cache")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m))
    with pytest.raises(DataError, match="not writable"):
        _shard(charades_copy, ro / "out", planted_charades / "cache")
    assert f.read_text() == "x"


def test_sigkill_while_writing_keeps_the_old_set(charades_copy, planted_charades, tmp_path):
    out = tmp_path / "out"
    _shard(charades_copy, out, planted_charades / "cache")
    before = _snapshot(out)
    code = f"""
import os, signal
from wsra_dist.data import shards
real = shards.ShardWriter.write
n = [0]
def write(self, key, fields, queries=0):
    n[0] += 1
    if n[0] == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, key, fields, queries)
shards.ShardWriter.write = write
from wsra_dist.data.pack import shard_charades
d = {str(charades_copy)!r}
shard_charades(d + "/charades_sta_test.txt", d + "/Charades_v1_test.csv", d + "/features", {str(out)!r}, 3,
               progress=False, cache_dir={str(planted_charades / 'cache')!r})
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert _snapshot(out) == before and verify(out) == []
    assert list(tmp_path.glob(".out.staging-*"))  # the killed run's staging folder...
    _shard(charades_copy, out, planted_charades / "cache")
    assert not list(tmp_path.glob(".out.staging-*"))  # ...is cleaned by the next run


@pytest.mark.parametrize("line,what", [
    ("{vid} nan 5.0##a person sits.", "finite"), ("{vid} -1.0 5.0##a person sits.", ">= 0"),
    ("{vid} 1.0 inf##a person sits.", "finite"), ("{vid} 1.0 5.0##   ", "empty description"),
    ("{vid} 1.0 5.0", "'##'"), ("{vid} 1.0##x", "expected"),
])
def test_charades_bad_annotation_lines_name_the_line(charades_copy, line, what):
    f = charades_copy / "charades_sta_test.txt"
    lines = f.read_text().splitlines()
    lines.insert(3, line.format(vid=lines[0].split()[0]))
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        CH.read_annotations(f, CH.read_durations(charades_copy / "Charades_v1_test.csv"))
    assert f"{f}: line 4" in str(e.value) and what in str(e.value)


@pytest.mark.parametrize("length", ["nan", "-3", "0", "", "abc", "inf"])
def test_charades_bad_durations_name_the_line(charades_copy, length):
    f = charades_copy / "Charades_v1_test.csv"
    rows = f.read_text().splitlines()
    header = rows[0].split(",")
    cells = rows[2].split(",")
    cells[header.index("length")] = length
    rows[2] = ",".join(cells)
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"{f}: line 3"):
        CH.read_durations(f)


@pytest.mark.parametrize("field,value,what", [
    ("description", "  ", "empty description"), ("num_segments", 0, "num_segments"), ("times", [[0, 7]], "outside"),
    ("times", [[4, 2]], "outside"), ("times", [], "empty"), ("annotation_id", "7", "should be int"),
])
def test_didemo_bad_records_name_the_record(tmp_path, field, value, what):
    recs = [{"annotation_id": i, "description": "a dog runs.", "video": f"v{i}.mp4", "num_segments": 6,
             "times": [[0, 1]]} for i in range(4)]
    recs[2][field] = value
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        DD.read_annotations(f)
    assert f"{f}: record 2" in str(e.value) and what in str(e.value)


def test_didemo_bad_chunk_features_are_checked_before_writing(planted_didemo, tmp_path):
    data = planted_didemo / "data"
    h5 = tmp_path / "f.h5"
    shutil.copy(data / "average_global_flow.h5", h5)
    recs = json.loads((data / "val_data.json").read_text())
    last = recs[-1]["video"]
    with h5py.File(h5, "a") as f:
        x = f[last][()]
        del f[last]
        f[last] = x[:5]  # 5 chunks instead of 6
    with pytest.raises(DataError, match=f"{last!r}.*shape"):
        shard_didemo(data / "val_data.json", [str(h5)], tmp_path / "o", 7, progress=False,
                     cache_dir=str(planted_didemo / "cache"))
    assert not (tmp_path / "o").exists()


def test_long_queries_are_counted_once_in_a_warning(planted_didemo, tmp_path):
    data = planted_didemo / "data"
    recs = json.loads((data / "val_data.json").read_text())
    recs[1]["description"] = "the person walks slowly across the room " * 250  # ~10,000 characters
    recs[4]["description"] = "word " * 300
    f = tmp_path / "val.json"
    f.write_text(json.dumps(recs))
    m = shard_didemo(f, [str(data / "average_global_flow.h5")], tmp_path / "o", 50, progress=False,
                     cache_dir=str(planted_didemo / "cache"))
    assert len(m["warnings"]) == 1 and m["warnings"][0].startswith("2 queries are longer than")
    assert f"annotation_id {recs[1]['annotation_id']}" in m["warnings"][0]
    assert load_manifest(tmp_path / "o")["text"]["truncated_queries"] == 2


def test_ground_inputs_are_checked(tmp_path):
    for q in ([], [""], ["ok", "   "]):
        with pytest.raises(DataError, match="query|queries"):
            check_queries(q)
    for d in (0, -10, float("nan"), float("inf")):
        with pytest.raises(DataError, match="--duration"):
            check_duration(d)
    np.save(tmp_path / "one_d.npy", np.zeros(7, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    np.save(tmp_path / "nan.npy", np.full((3, 4), np.nan, np.float32))
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["v1.mp4"] = np.zeros((6, 4), np.float32)
    cases = {str(tmp_path / "one_d.npy"): "shape", str(tmp_path / "empty.npy"): "T >= 1",
             str(tmp_path / "nan.npy"): "NaN", str(tmp_path / "f.h5") + ":nope.mp4": "no dataset 'nope.mp4'",
             str(tmp_path / "missing.npy"): "no such features file"}
    for spec, what in cases.items():
        with pytest.raises(DataError, match=what):
            read_features(spec)
    assert read_features(str(tmp_path / "f.h5") + ":v1.mp4").shape == (6, 4)


def test_ground_cli_errors_are_one_clean_line(trained_didemo, tmp_path):
    run = trained_didemo / "run"
    feats = str(trained_didemo / "data" / "average_global_flow.h5") + ":no_such_video.mp4"
    cases = [(["--query", ""], "query 1 is empty"), (["--query", "x", "--duration", "-10"], "--duration"),
             (["--query", "x", "--duration", "0"], "--duration"), (["--query", "x"], "no dataset 'no_such_video.mp4'")]
    for extra, what in cases:
        p = run_cli("ground", "--checkpoint", run, "--features", feats, *extra)
        assert p.returncode == 2 and what in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_error_path_is_markup_safe_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "odd [v2] [" / "b] name.json"  # the path reads '... [v2] [/b] name.json'
    bad.parent.mkdir()
    bad.write_text("{not json")
    p = run_cli("shard", "didemo", "--annotations", bad, "--features", tmp_path / "x.h5", "--out", tmp_path / "o")
    assert p.returncode == 2 and p.stderr.count("error:") == 1
    assert "odd [v2] [/b] name.json" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("--debug", "shard", "didemo", "--annotations", bad, "--features", tmp_path / "x.h5", "--out",
                tmp_path / "o")
    assert p.returncode == 2 and "Traceback" in p.stderr and "odd [v2] [/b] name.json" in p.stderr
    p = run_cli("shard", "didemo", "--annotations", bad, "--features", tmp_path / "x.h5", "--out", tmp_path / "o",
                env={"WSRA_DEBUG": "1"})
    assert "Traceback" in p.stderr
