"""`wsra-dist features`: raw video -> snippet features, on synthetic videos written with PyAV.

Exact time alignment (hand-computed frame -> snippet assignment and 48-d pixel values), the three layouts
read back by the repo's readers, resuming, failures, a tiny random Hugging Face vision model, two processes
equal one, `ground --video` refusals, and a planted end-to-end check (features -> shard -> train ->
ground --video well above chance).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from wsra_dist.data.records import DataError  # noqa: E402
from wsra_dist.video.extract import PixelExtractor, area_resize, plane_means, yuv_to_rgb  # noqa: E402
from wsra_dist.video.pipeline import Spec, extract_video  # noqa: E402
from wsra_dist.video.run import run_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GREY = [20, 60, 100, 140, 180, 220]  # frame i of the timing video is this grey level


def write_video(path: Path, frames: list[np.ndarray], times: list[float] | None = None, rate: int = 25) -> Path:
    """mpeg4 in .mp4 (qscale 1: solid colours survive within ~1/255); frame i at times[i] s (pts in ms) or i/rate."""
    out = av.open(str(path), "w")
    s = out.add_stream("mpeg4", rate=rate)
    h, w = frames[0].shape[:2]
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    tb = Fraction(1, 1000) if times is not None else Fraction(1, rate)
    s.time_base = tb
    s.codec_context.time_base = tb
    s.options = {"qscale": "1"}
    s.codec_context.gop_size = 1  # intra frames only: each frame's colours are coded on their own
    for i, img in enumerate(frames):
        f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img, dtype=np.uint8), format="rgb24")
        f.pts = int(round(times[i] * 1000)) if times is not None else i
        f.time_base = tb
        for p in s.encode(f):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return path


def solid(level, h: int = 32, w: int = 48) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


from tests.helpers import run_cli as cli  # noqa: E402


def test_features_help_lists_the_contract():
    from wsra_dist import cli as C
    from wsra_dist.video.pipeline import LAYOUTS

    assert tuple(m.value for m in C.Layout) == LAYOUTS  # the CLI's choices are the library's
    out = cli("features", "--help").stdout
    assert "<charades|didemo|activitynet>" in out
    for flag in ("--videos", "--model", "--fps", "--layout", "--out", "--batch-size", "--device",
                 "--frames-per-snippet", "--quiet"):
        assert flag in out
    p = subprocess.run([sys.executable, "-m", "wsra_dist.features", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "--frames-per-snippet" in p.stdout


# ------------------------------------------------------------------------------------ the pixels definition
def test_area_resize_and_plane_means_by_hand():
    # 6 rows of value 10*r resized to 4: cell i covers rows [1.5 i, 1.5 i + 1.5)
    img = np.repeat((10 * np.arange(6.0))[:, None], 4, axis=1)
    expect_rows = [(0 * 1 + 10 * 0.5) / 1.5, (10 * 0.5 + 20 * 1) / 1.5, (30 * 1 + 40 * 0.5) / 1.5, (40 * 0.5 + 50) / 1.5]
    assert np.allclose(area_resize(img)[:, 0], expect_rows, atol=1e-12)
    # 5 columns to 4: cell j covers [1.25 j, 1.25 j + 1.25)
    row = np.array([[0.0, 4, 8, 12, 16]])
    exp = [(0 * 1 + 4 * 0.25) / 1.25, (4 * 0.75 + 8 * 0.5) / 1.25, (8 * 0.5 + 12 * 0.75) / 1.25, (12 * 0.25 + 16) / 1.25]
    assert np.allclose(area_resize(np.repeat(row, 4, 0))[0], exp, atol=1e-12)
    # the fast uint8 path equals the definition, sizes that 4 divides and sizes it does not
    rng = np.random.default_rng(0)
    for h, w in [(360, 640), (6, 5), (7, 9), (101, 203), (1, 1), (3, 7), (1080, 1920)]:
        p = rng.integers(0, 256, (h, w), dtype=np.uint8)
        assert np.abs(plane_means(p) - area_resize(p)).max() < 1e-9, (h, w)


def test_pixels_hand_computed_quadrants_and_yuv_path(tmp_path):
    """(y, x, channel) order: a 64 x 64 frame in four colour quadrants gives each 2 x 2 block of cells its
    quadrant's colour; the planar-YUV fast path agrees with libswscale's RGB + exact area resize."""
    q = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 255)}
    img = np.zeros((64, 64, 3), np.uint8)
    for (qy, qx), c in q.items():
        img[32 * qy:32 * qy + 32, 32 * qx:32 * qx + 32] = c
    v = write_video(tmp_path / "quad.mp4", [img] * 3, rate=3)
    ex = PixelExtractor()
    with av.open(str(v)) as c:
        frame = next(c.decode(video=0))
        feat = ex.embed([ex.prepare(frame)])[0]
        ref = area_resize(frame.to_ndarray(format="rgb24")) / 255.0
    cells = feat.reshape(4, 4, 3)
    for y in range(4):
        for x in range(4):
            assert np.abs(cells[y, x] - np.array(q[(y // 2, x // 2)]) / 255.0).max() < 0.03, (y, x, cells[y, x])
    assert np.abs(cells - ref).max() < 0.03  # same picture, conversion then averaging
    # smooth in-gamut content: averaging then converting equals converting then averaging (affine)
    yy, xx = np.mgrid[0:48, 0:64]
    grad = np.stack([60 + 2 * xx, 80 + yy, 150 - xx], -1).astype(np.uint8)
    v2 = write_video(tmp_path / "grad.mp4", [grad] * 2, rate=2)
    with av.open(str(v2)) as c:
        frame = next(c.decode(video=0))
        fast = ex.embed([ex.prepare(frame)])[0].reshape(4, 4, 3)
        slow = area_resize(frame.to_ndarray(format="rgb24")) / 255.0
    assert np.abs(fast - slow).max() < 2.5 / 255
    # BT.601 limited range by hand: Y 81, Cb 90, Cr 240 is (almost exactly) pure red
    assert np.allclose(yuv_to_rgb(np.array([81.0, 90.0, 240.0])), [1.0, 0.0, 0.0], atol=0.01)


@pytest.fixture(scope="module")
def timing_video(tmp_path_factory):
    """Six solid grey frames at 0, 0.3, 0.42, 1.2, 2.7, 2.76 s (a variable frame rate)."""
    d = tmp_path_factory.mktemp("timing")
    times = [0.0, 0.3, 0.42, 1.2, 2.7, 2.76]
    return write_video(d / "vfr.mp4", [solid(g) for g in GREY], times)


def _greys(x: np.ndarray) -> np.ndarray:
    """(T, 48) pixel features of solid grey frames -> one grey level per row, after checking all 48 agree."""
    assert np.abs(x - x.mean(1, keepdims=True)).max() < 0.01
    return x.mean(1) * 255.0


def test_exact_time_alignment_every_frame(timing_video):
    x, rec = extract_video(timing_video, PixelExtractor(), Spec("charades", 2.0))
    # duration: the stream's (last frame 2.76 s + one frame at the declared 25 fps) -> T = ceil(2.8 x 2) = 6
    assert rec["duration_source"] == "stream" and abs(rec["duration"] - 2.8) < 1e-6 and rec["T"] == 6 == len(x)
    g = GREY
    expected = [
        np.mean(g[0:3]),  # [0, .5): frames at 0, .3, .42
        g[2],             # [.5, 1): empty -> nearest to .75 is .42 (.33 away; 1.2 is .45)
        g[3],             # [1, 1.5): 1.2
        g[3],             # [1.5, 2): empty -> nearest to 1.75 is 1.2 (.55; 2.7 is .95)
        g[4],             # [2, 2.5): empty -> nearest to 2.25 is 2.7 (.45; 1.2 is 1.05)
        np.mean(g[4:6]),  # [2.5, 3): 2.7, 2.76
    ]
    assert np.allclose(_greys(x), expected, atol=1.5), (_greys(x), expected)
    assert rec["empty_bins"] == 3 and rec["frames_decoded"] == 6


def test_exact_time_alignment_k_frames_per_snippet(timing_video):
    x, rec = extract_video(timing_video, PixelExtractor(), Spec("charades", 2.0, frames_per_snippet=2))
    # sample times (k + .25)/2, (k + .75)/2; nearest frames worked out by hand:
    # .125->0  .375->.42 | .625->.42  .875->1.2 | 1.125, 1.375 ->1.2 | 1.625, 1.875 ->1.2 | 2.125, 2.375 ->2.7 |
    # 2.625->2.7  2.875->2.76
    g = GREY
    expected = [(g[0] + g[2]) / 2, (g[2] + g[3]) / 2, g[3], g[3], g[4], (g[4] + g[5]) / 2]
    assert np.allclose(_greys(x), expected, atol=1.5), (_greys(x), expected)
    assert rec["empty_bins"] == 0 and rec["frames_used"] == 5  # every frame but .3 s, each extracted once


def test_didemo_chunks_and_zero_rows(timing_video):
    x, rec = extract_video(timing_video, PixelExtractor(), Spec("didemo", 2.0))
    assert x.shape == (6, 48)
    assert np.allclose(_greys(x[:1]), [np.mean(GREY)], atol=1.5)  # chunk 0 = [0, 5): every frame
    assert np.all(x[1:] == 0)  # chunks starting after the end of the 2.8 s video


# ------------------------------------------------------------------------------------ layouts and the run
def _colour_video(path: Path, seconds: int, rate: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frames = [np.full((24, 32, 3), rng.integers(30, 220, 3), np.uint8) for _ in range(seconds * rate)]
    return write_video(path, frames, rate=rate)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for i, secs in enumerate((12, 7, 26)):
        _colour_video(d / f"vid{i}.mp4", secs, seed=i)
    return d


def test_layouts_read_back_by_the_repo_readers(video_dir, tmp_path):
    from wsra_dist.data.charades import SnippetFeatures
    from wsra_dist.data.didemo import FeatureFiles
    from wsra_dist.data.features_manifest import read_manifest

    outs = {"charades": tmp_path / "ch", "didemo": tmp_path / "dd.h5", "activitynet": tmp_path / "an.h5"}
    for layout, out in outs.items():
        s = run_features(video_dir, "pixels", 1.0, layout, out, progress=False)
        assert (s.written, s.skipped, s.failed) == (3, 0, 0)
    snips = SnippetFeatures(outs["charades"])
    for i, secs in enumerate((12, 7, 26)):
        x = snips.get(f"vid{i}")
        assert x.shape == (secs, 48) and x.dtype == np.float32
    files = FeatureFiles([outs["didemo"]])
    assert files.dims == [48] and all(f"vid{i}.mp4" in files for i in range(3))  # keyed by file name
    for i, secs in enumerate((12, 7, 26)):
        chunks = files.chunks(f"vid{i}.mp4")[0]
        snip = snips.get(f"vid{i}")  # 5 frames per 1-s snippet: a chunk is the mean of its 5 snippets
        for c in range(6):
            if 5 * c < secs:
                assert np.allclose(chunks[c], snip[5 * c:5 * c + 5].mean(0), atol=1e-5)
            else:
                assert np.all(chunks[c] == 0)
    files.close()
    import h5py

    with h5py.File(outs["activitynet"], "r") as f:
        assert sorted(f.keys()) == ["vid0", "vid1", "vid2"]
        for i in range(3):
            assert np.array_equal(f[f"vid{i}"]["c3d_features"][()], snips.get(f"vid{i}"))
    try:  # this repo's ActivityNet reader, where it exists
        from wsra_dist.data.activitynet import C3DFeatures

        assert np.array_equal(C3DFeatures(outs["activitynet"]).get("vid1"), snips.get("vid1"))
    except ImportError:
        pass
    for layout, out in outs.items():
        m = read_manifest(out)
        assert m["layout"] == layout and m["extractor"]["model"] == "pixels" and m["extractor"]["dim"] == 48
        assert m["extractor"]["fps"] == 1.0 and m["extractor"]["layout"] == layout and m["failures"] == {}
        v = m["videos"]["vid2.mp4" if layout == "didemo" else "vid2"]
        assert v["T"] == (6 if layout == "didemo" else 26) and v["source"]["size"] == (video_dir / "vid2.mp4").stat().st_size
        assert len(v["source"]["sha256"]) == 64
    assert not (tmp_path / "dd.h5.parts").exists() and not (outs["charades"] / ".wsra-features").exists()


def test_shard_carries_the_extractor_and_evaluate_refuses_another(video_dir, tmp_path):
    from wsra_dist.data.features_manifest import extractor_for
    from wsra_dist.evaluation.predict import check_compatible

    out = tmp_path / "ch"
    run_features(video_dir, "pixels", 1.0, "charades", out, progress=False)
    ex = extractor_for([out], ["vid0", "vid2"])
    assert ex["model"] == "pixels" and ex["layout"] == "charades"
    np.save(out / "alien.npy", np.zeros((3, 48), np.float32))  # not written by that extraction
    with pytest.raises(DataError, match="not listed in its features manifest"):
        extractor_for([out], ["vid0", "alien"])
    assert extractor_for([tmp_path / "official"], ["vid0"]) is None  # no manifest: official features
    both = extractor_for([out, out], ["vid1"])
    assert both == {"concat": [ex, ex]}
    dims = {"video": 48, "text": 384}
    info = {"dims": dims, "text": {}, "extractor": ex}
    check_compatible(info, {"dims": dims, "text": {}, "extractor": dict(ex)}, "shards")
    with pytest.raises(ValueError, match="video features come from"):
        check_compatible(info, {"dims": dims, "text": {}, "extractor": {**ex, "fps": 2.0}}, "shards")


def test_resume_skips_written_videos_and_picks_up_a_killed_run(video_dir, tmp_path):
    out = tmp_path / "dd.h5"
    first = run_features(video_dir, "pixels", 1.0, "didemo", out, progress=False)
    before = out.read_bytes()
    again = run_features(video_dir, "pixels", 1.0, "didemo", out, progress=False)
    assert (first.written, again.written, again.skipped, again.frames) == (3, 0, 3, 0)
    assert out.read_bytes() == before
    # a killed run: a finished part + journal line, and a staging file cut short
    extra = tmp_path / "more"
    extra.mkdir()
    for p in video_dir.iterdir():
        shutil.copy2(p, extra / p.name)
    _colour_video(extra / "new.mp4", 4, seed=9)
    parts = out.with_name(out.name + ".parts")
    from wsra_dist.video.layouts import DidemoH5

    o = DidemoH5(out)
    parts.mkdir()
    x, rec = extract_video(extra / "new.mp4", PixelExtractor(), Spec("didemo", 1.0))
    o.write("new.mp4", x)
    o.journal(0, {"key": "new.mp4", "ok": True, "record": {**rec, "source": {
        "size": (extra / "new.mp4").stat().st_size, "mtime_ns": (extra / "new.mp4").stat().st_mtime_ns}}})
    (parts / ".other.npy.tmp-99999").write_bytes(b"\x93NUMPY cut")
    with open(parts / "journal-0.jsonl", "a") as f:
        f.write('{"key": "cut')  # a line cut by the kill
    s = run_features(extra, "pixels", 1.0, "didemo", out, progress=False)
    assert (s.written, s.skipped) == (0, 4)
    import h5py

    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["new.mp4", "vid0.mp4", "vid1.mp4", "vid2.mp4"]
        assert np.array_equal(f["new.mp4"][()], x)
    assert not parts.exists()
    # another extractor into the same output is refused, not mixed
    with pytest.raises(DataError, match="another extractor"):
        run_features(extra, "pixels", 2.0, "didemo", out, progress=False)


def test_corrupt_videos_named_listed_exit_1(video_dir, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for i in range(2):
        shutil.copy2(video_dir / f"vid{i}.mp4", d / f"vid{i}.mp4")
    data = (video_dir / "vid2.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(data[: len(data) // 2])  # mp4 index (moov) at the end: gone
    (d / "notes.mp4").write_text("this is not a video\n")
    out = tmp_path / "feats"
    p = cli("features", "--videos", d, "--model", "pixels", "--fps", "1", "--layout", "charades", "--out", out,
            "--quiet", check=False)
    assert p.returncode == 1, p.stderr
    err = p.stderr
    assert f"{d / 'cut.mp4'}: cannot open" in err and f"{d / 'notes.mp4'}: cannot open" in err
    assert "Traceback" not in err and "2 video(s) could not be used" in err
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["failures"]) == ["cut", "notes"] and m["failures"]["cut"]["reason"].startswith("cannot open")
    assert sorted(m["videos"]) == ["vid0", "vid1"]
    assert sorted(x.name for x in out.iterdir()) == ["manifest.json", "vid0.npy", "vid1.npy"]  # nothing half-written
    # a list file naming a missing video: named, listed, the rest done
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two videos\n{d / 'vid0.mp4'}\nmissing.mp4\n")
    p = cli("features", "--videos", lst, "--model", "pixels", "--fps", "1", "--layout", "didemo", "--out",
            tmp_path / "l.h5", "--quiet", check=False)
    assert p.returncode == 1 and f"{tmp_path / 'missing.mp4'}: no such file" in p.stderr
    # bad options are one line and exit 2
    p = cli("features", "--videos", d, "--model", tmp_path / "nope", "--fps", "1", "--layout", "charades",
            "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "not a local Hugging Face model folder" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------ Hugging Face model
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_tiny_hf_vision_model(tiny_clip, video_dir, tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from wsra_dist.video.extract import weights_sha256

    out = tmp_path / "clip"
    s = run_features(video_dir, str(tiny_clip), 1.0, "charades", out, batch_size=4, device="cpu",
                     frames_per_snippet=1, progress=False)
    assert s.written == 3
    m = json.loads((out / "manifest.json").read_text())
    e = m["extractor"]
    assert (e["kind"], e["class"], e["pooling"], e["dim"], e["frames_per_snippet"]) == (
        "hf-image", "CLIPVisionModel", "pooler_output", 32, 1)
    assert e["weights_sha256"] == weights_sha256(tiny_clip) and e["model"] == tiny_clip.name
    assert str(tmp_path) not in json.dumps(m)  # no machine paths: names and sha256 only
    # by hand: snippet k (K=1) is the pooled output of the frame nearest to k + 0.5 s (5 fps: frame 5k + 2)
    proc = AutoImageProcessor.from_pretrained(str(tiny_clip), local_files_only=True)
    model = AutoModel.from_pretrained(str(tiny_clip), local_files_only=True).eval()
    with av.open(str(video_dir / "vid1.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    picked = [frames[5 * k + 2] for k in range(7)]
    with torch.inference_mode():
        ref = model(pixel_values=proc(images=picked, return_tensors="pt")["pixel_values"]).pooler_output.numpy()
    assert np.allclose(np.load(out / "vid1.npy"), ref, atol=1e-5)


def test_full_clip_model_uses_its_vision_tower(tmp_path, video_dir):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from wsra_dist.video.extract import HFImageExtractor

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    e = HFImageExtractor(tmp_path / "clip", "cpu")
    assert (e.class_name, e.pooling, e.dim) == ("CLIPModel", "pooler_output", 32)  # the tower, not the 8-d projection


# ------------------------------------------------------------------------------------ processes
def test_two_processes_equal_one(video_dir, tmp_path):
    import h5py

    from .helpers import run_checked

    d = tmp_path / "v"
    d.mkdir()
    for i in range(3):
        shutil.copy2(video_dir / f"vid{i}.mp4", d / f"vid{i}.mp4")
    _colour_video(d / "vid3.mp4", 3, seed=3)
    args = ["--videos", str(d), "--model", "pixels", "--fps", "2", "--layout", "didemo", "--quiet"]
    run_checked([sys.executable, "-m", "wsra_dist.features", *args, "--out", str(tmp_path / "one.h5")])
    p = run_checked([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
                     "no", "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "wsra_dist.features",
                     *args, "--out", str(tmp_path / "two.h5")])
    assert "4 videos written" in p.stdout  # counted over both processes, printed once
    with h5py.File(tmp_path / "one.h5", "r") as a, h5py.File(tmp_path / "two.h5", "r") as b:
        assert sorted(a.keys()) == sorted(b.keys()) == [f"vid{i}.mp4" for i in range(4)]
        for k in a.keys():
            assert np.array_equal(a[k][()], b[k][()])
    ma = json.loads((tmp_path / "one.h5.manifest.json").read_text())
    mb = json.loads((tmp_path / "two.h5.manifest.json").read_text())
    strip = lambda m: {k: {x: y for x, y in v.items()} for k, v in m["videos"].items()}  # noqa: E731
    assert strip(ma) == strip(mb) and ma["extractor"] == mb["extractor"]
    assert not (tmp_path / "two.h5.parts").exists()


# ------------------------------------------------------------------------------------ planted end to end
# Each colour has its own shape, so the sentences differ in two words (MiniLM puts "a red square appears." and
# "a blue square appears." at cosine 0.95; with the shape named too, about 0.8).
SHAPES = {"red": ("square", (220, 30, 30)), "green": ("circle", (30, 200, 40)),
          "blue": ("triangle", (30, 50, 230)), "yellow": ("cross", (230, 220, 30))}
_YY, _XX = np.mgrid[0:32, 0:32]
MASKS = {"square": (abs(_YY - 16) < 11) & (abs(_XX - 16) < 11),
         "circle": (_YY - 15.5) ** 2 + (_XX - 15.5) ** 2 < 13 ** 2,
         "triangle": (_YY > 4) & (_YY < 28) & (abs(_XX - 15.5) < (_YY - 4) * 0.6),
         "cross": (abs(_YY - 15.5) < 5) | (abs(_XX - 15.5) < 5)}
RATE, SNIPPETS_PER_S = 4, 2


def sentence(colour: str) -> str:
    return f"a {colour} {SHAPES[colour][0]} appears."


def _planted_video(path: Path, rng) -> tuple[float, list[tuple[str, float, float]]]:
    """A grey 32 x 32 video of 8-12 s at 4 fps with two coloured shapes (distinct colours) at disjoint times."""
    n = int(rng.integers(32, 49))
    a, b = rng.choice(list(SHAPES), 2, replace=False)
    l1, l2 = int(rng.integers(n // 4, n * 2 // 5)), int(rng.integers(n // 4, n * 2 // 5))
    s1 = int(rng.integers(0, n - l1 - l2 + 1))
    s2 = int(rng.integers(s1 + l1, n - l2 + 1))
    frames = []
    for i in range(n):
        img = np.full((32, 32, 3), 128, np.uint8)
        img += rng.integers(0, 6, img.shape, dtype=np.uint8)  # a little texture
        for c, s, ln in ((a, s1, l1), (b, s2, l2)):
            if s <= i < s + ln:
                img[MASKS[SHAPES[c][0]]] = SHAPES[c][1]
        frames.append(img)
    write_video(path, frames, rate=RATE)
    return n / RATE, [(a, s1 / RATE, (s1 + l1) / RATE), (b, s2 / RATE, (s2 + l2) / RATE)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Videos -> `wsra-dist features --model pixels` -> Charades-STA files -> `wsra-dist shard charades` -> train.

    120 training videos (240 sentences), 8 epochs of recipes/planted_charades.yaml with layernorm inputs:
    pixel features share a large positive grey component (the "activity direction" docs/method.md warns
    about), which layernorm removes.  32 test videos are only ever seen as raw video (ground --video)."""
    from wsra_dist.config import load_recipe
    from wsra_dist.train import train

    root = tmp_path_factory.mktemp("planted_video")
    rng = np.random.default_rng(0)
    truth = {}
    for split, n in (("train", 120), ("test", 32)):
        (root / split).mkdir()
        lines, durs = [], ["id,length"]
        for i in range(n):
            vid = f"{split}{i:03d}"
            dur, events = _planted_video(root / split / f"{vid}.mp4", rng)
            durs.append(f"{vid},{dur}")
            lines += [f"{vid} {s:.2f} {e:.2f}##{sentence(c)}" for c, s, e in events]
            truth[vid] = (dur, events)
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        (root / f"{split}.csv").write_text("\n".join(durs) + "\n")
    cli("features", "--videos", root / "train", "--model", "pixels", "--fps", SNIPPETS_PER_S, "--layout", "charades",
        "--out", root / "feats", "--quiet")
    cli("shard", "charades", "--annotations", root / "train.txt", "--durations", root / "train.csv",
        "--features", root / "feats", "--out", root / "shards", "--quiet", "--cache-dir", root / "cache")
    recipe = load_recipe(ROOT / "recipes" / "planted_charades.yaml", [
        f"data.train_shards={root / 'shards'}", "data.val_shards=", "data.test_shards=", "train.epochs=8",
        "train.batch_size=32", "model.input_norm=layernorm", "data.num_workers=0", f"output_dir={root / 'run'}",
        "train.progress=false"])
    train(recipe)
    return root, truth


def _iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def test_planted_video_end_to_end_ground_well_above_chance(planted):
    from wsra_dist.data.shards import load_manifest
    from wsra_dist.ground import load_model
    from wsra_dist.video.pipeline import checkpoint_features

    root, truth = planted
    ex = load_manifest(root / "shards")["extractor"]
    assert ex["model"] == "pixels" and ex["fps"] == SNIPPETS_PER_S and ex["layout"] == "charades"
    info = json.loads((root / "run" / "wsra_model.json").read_text())
    assert info["extractor"] == ex  # features manifest -> shard manifest -> checkpoint
    g = load_model(root / "run", "cpu")
    hits, chance, named = [], [], []
    for vid, (dur, events) in truth.items():
        if not vid.startswith("test"):
            continue
        feats, seconds = checkpoint_features(g.info, root / "test" / f"{vid}.mp4")
        assert abs(seconds - dur) < 1e-6 and feats.shape == (int(np.ceil(dur * SNIPPETS_PER_S)), 48)
        res = g.ground(feats, [sentence(c) for c, _, _ in events], seconds, top_k=1)
        for i, ((c, s, e), r) in enumerate(zip(events, res)):
            top, other = r["moments"][0], events[1 - i][1:]
            hits.append(_iou(top, (s, e)) >= 0.5)
            # chance: the top-1 moment drawn uniformly from the candidate windows (R@1, IoU >= 0.5)
            chance.append(np.mean([_iou(m, (s, e)) >= 0.5 for m in r["candidate_moments"]]))
            named.append(_iou(top, (s, e)) > _iou(top, other))  # the named shape, not the video's other one
    r1, ch = float(np.mean(hits)), float(np.mean(chance))
    assert r1 >= ch + 0.3 and r1 >= 2 * ch, (r1, ch)
    assert np.mean(named) >= 0.85, np.mean(named)  # a query-blind model would be at 0.5
    # the command line, once: ground --video
    dur, events = truth["test000"]
    p = cli("ground", "--checkpoint", root / "run", "--video", root / "test" / "test000.mp4", "--query",
            sentence(events[0][0]), "--top-k", "3", "--json")
    out = json.loads(p.stdout)["results"][0]
    assert len(out["moments"]) == 3 and all(0 <= s <= e <= dur + 1e-6 for s, e in out["moments"])


def test_ground_video_refuses_other_features(planted, tiny_clip, tmp_path):
    from wsra_dist.ground import load_model
    from wsra_dist.video.pipeline import checkpoint_features

    root, _ = planted
    video = root / "test" / "test000.mp4"
    g = load_model(root / "run", "cpu")
    ex = g.info["extractor"]
    with pytest.raises(DataError, match="records no video extractor"):
        checkpoint_features({**g.info, "extractor": None}, video)
    with pytest.raises(DataError, match="differs from the one the checkpoint was trained with"):
        checkpoint_features({**g.info, "extractor": {**ex, "pooling": "area8x8"}}, video)
    hf = {**ex, "kind": "hf-image", "model": "tiny", "path": str(tiny_clip), "weights_sha256": "0" * 64,
          "pooling": "pooler_output", "dim": 32}
    with pytest.raises(DataError, match="weights sha256"):
        checkpoint_features({**g.info, "extractor": hf}, video)
    with pytest.raises(DataError, match="recorded by name and weights sha256 only; give its local folder with "
                                        "--video-model"):
        checkpoint_features({**g.info, "extractor": {**hf, "path": None}}, video)
    with pytest.raises(DataError, match="is not at"):
        checkpoint_features({**g.info, "extractor": {**hf, "path": str(tmp_path / "gone")}}, video)
    # on the command line: one line, exit 2; --features and --video are exclusive
    run = tmp_path / "run"
    shutil.copytree(root / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((run / "wsra_model.json").read_text())
    info.pop("extractor")
    (run / "wsra_model.json").write_text(json.dumps(info))
    p = cli("ground", "--checkpoint", run, "--video", video, "--query", sentence("red"), check=False)
    assert p.returncode == 2 and "records no video extractor" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    from wsra_dist.ground import ground_cli

    for features, vid in (("x.npy", str(video)), (None, None)):
        with pytest.raises(DataError, match="exactly one of --features"):
            ground_cli(root / "run", features, ["q"], None, 3, None, [], video=vid)
