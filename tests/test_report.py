"""report.html (written by `wsra-dist evaluate --checkpoint`) and the grounding figure (`ground --plot`)."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from wsra_dist.report import REPORT_FILE, Example, parse_table, pick_examples

ROOT = Path(__file__).resolve().parents[1]
PLANTED = "<script>alert('wsra')</script>"


class _Page(HTMLParser):
    """Tags, their URL attributes and the gallery's images."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.card_imgs, self._in_card = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "srcset", "action", "poster", "data")]
        if tag == "figure" and "card" in (a.get("class") or ""):
            self._in_card += 1
        if tag == "img" and self._in_card and (a.get("src") or "").startswith("data:image/png;base64,"):
            self.card_imgs += 1

    def handle_endtag(self, tag):
        if tag == "figure" and self._in_card:
            self._in_card -= 1


from tests.helpers import run_cli as _cli  # noqa: E402


@pytest.fixture(scope="module")
def planted_report(trained_didemo, tmp_path_factory):
    """evaluate --checkpoint on test shards whose every sentence ends with a <script> tag."""
    from wsra_dist.data.pack import shard_didemo

    root = tmp_path_factory.mktemp("report")
    recs = json.loads((trained_didemo / "data" / "test_data.json").read_text())
    for r in recs:
        r["description"] = f"{r['description']} {PLANTED}"
    (root / "test_data.json").write_text(json.dumps(recs))
    shard_didemo(root / "test_data.json", [str(trained_didemo / "data" / "average_global_flow.h5")],
                 root / "shards", 50, progress=False, cache_dir=str(root / "cache"))
    _cli("evaluate", "--checkpoint", trained_didemo / "run", "--shards", root / "shards", "--protocol", "didemo",
         "--out", root / "out")
    return root / "out" / REPORT_FILE


def test_report_is_self_contained_with_gallery_and_escaped(planted_report):
    page = planted_report.read_text(encoding="utf-8")
    p = _Page()
    p.feed(page)
    outside = [u for u in p.urls if not (u.startswith("data:") or u.startswith("#"))]
    assert not outside, outside[:3]
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert p.card_imgs >= 6
    assert PLANTED not in page and "&lt;script&gt;alert(&#x27;wsra&#x27;)&lt;/script&gt;" in page
    for section in ("Benchmark", "Learning curves", "Example queries"):
        assert f">{section}</h2>" in page
    assert "(this run)" in page and "R@1" in page
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_history_still_has_table_and_gallery(trained_didemo, tmp_path):
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    run = tmp_path / "bare_run"  # weights only: no history.json, no TensorBoard events
    run.mkdir()
    for f in ("model.safetensors", "wsra_model.json", "recipe.yaml"):
        shutil.copy(trained_didemo / "run" / f, run / f)
    evaluate_checkpoints([str(run)], [str(trained_didemo / "shards" / "test")], "didemo", tmp_path / "out",
                         device="cpu")
    page = (tmp_path / "out" / REPORT_FILE).read_text(encoding="utf-8")
    p = _Page()
    p.feed(page)
    assert p.card_imgs >= 6 and "(this run)" in page
    assert "no history.json" in page and "could not be built" not in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_headless_chromium(request, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the browser check needs one")
    from PIL import Image

    planted_report = request.getfixturevalue("planted_report")  # built only when a browser can look at it

    shot = tmp_path / "report.png"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1280,2000", planted_report.resolve().as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.is_file(), p.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"))
    assert px.shape[:2] == (2000, 1280)
    colours = np.unique(px.reshape(-1, 3), axis=0)
    not_white = (px.min(-1) < 235).mean()
    assert len(colours) > 200 and not_white > 0.05, (len(colours), not_white)


# ------------------------------------------------------------------------------- small pieces
def test_pick_examples_best_typical_worst_each_once():
    rows = [Example(i, iou, 0.5, [0, 0]) for i, iou in enumerate([1.0, 1.0, 0.9, 0.5, 0.5, 0.4, 0.0, 0.0, 0.1, 0.6])]
    picked = pick_examples(rows, 3)
    assert len(picked) == 9 and len({e.query_id for e in picked}) == 9
    groups = {g: [e.iou for e in picked if e.group == g] for g in ("best", "typical", "worst")}
    assert groups["best"] == [1.0, 1.0, 0.9] and sorted(groups["worst"]) == [0.0, 0.0, 0.1]
    assert all(abs(v - 0.5) <= 0.11 for v in groups["typical"])


def test_parse_table_keeps_a_method_name_with_a_pipe():
    md = ("Table: cap\n\n| method | feature | R@1 | R@5 | mIoU |\n|---|---|---:|---:|---:|\n"
          "| **a | b** (this run) | flow | 1.00 | 2.00 | 3.00 |\n")
    cap, head, rows = parse_table(md)
    assert cap == "cap" and head[0] == "method" and rows == [["**a | b** (this run)", "flow", "1.00", "2.00", "3.00"]]


def _fake_result(didemo: bool) -> dict:
    from wsra_dist.geometry import DIDEMO_CANDIDATES

    rng = np.random.default_rng(0)
    if didemo:
        times = [[5.0 * k, 5.0 * (k + 1)] for k in range(6)]
        cands = [[5.0 * s, 5.0 * (e + 1)] for s, e in DIDEMO_CANDIDATES]
    else:
        times = [[k, k + 1.0] for k in range(40)]
        cands = [[s, s + 8.0] for s in range(0, 32, 2)]
    scores = rng.uniform(0.45, 0.55, len(cands))
    order = np.argsort(-scores)[:3]
    phi = rng.uniform(0.45, 0.55, len(times))
    return {"query": "a person <b>opens</b> the door for $5 and $10", "moments": [cands[i] for i in order],
            "scores": [float(scores[i]) for i in order], "phi": phi.tolist(),
            "alpha": (np.exp(phi) / np.exp(phi).sum()).tolist(), "snippet_times": times,
            "candidate_moments": cands, "candidate_scores": scores.tolist()}


@pytest.mark.parametrize("didemo", [True, False])
def test_grounding_figure_writes_png_pdf_svg_by_extension(tmp_path, didemo):
    from wsra_dist.figures import save_grounding

    res = [_fake_result(didemo), _fake_result(didemo)]
    for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")):
        save_grounding(res, tmp_path / f"g.{ext}", [(5.0, 10.0), None], "didemo" if didemo else "charades")
        assert (tmp_path / f"g.{ext}").read_bytes()[:5].startswith(magic)
    assert not list(tmp_path.glob(".*tmp*"))
