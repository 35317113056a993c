"""The search page: API and page over a real index, bad requests, paths outside --videos, Range; and in headless
Chromium: the query's results appear and choosing one seeks the player to its start."""

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from wsra_dist.data.records import DataError



@pytest.fixture(scope="module")
def server(corpus_run, tmp_path_factory):
    from wsra_dist.corpus.index import CorpusIndex, build_index
    from wsra_dist.corpus.search import Searcher
    from wsra_dist.corpus.serve import make_server

    root = corpus_run[0]
    d = tmp_path_factory.mktemp("serve")
    build_index(root / "run", [str(root / "shards" / "test")], d / "idx", "fp16")
    searcher = Searcher(CorpusIndex.load(d / "idx"))
    videos = d / "videos"
    videos.mkdir()
    (d / "secret.txt").write_text("not for the web")
    srv = make_server(searcher, videos, port=0, index_path=str(d / "idx"))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", searcher, videos
    srv.shutdown()
    srv.server_close()


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_api_and_page_answer_and_bad_requests_are_clear(server):
    base, searcher, _ = server
    st, body, _ = _get(f"{base}/api/search?q=" + urllib.parse.quote("a person opens a door") + "&k=5")
    res = json.loads(body)
    assert st == 200 and len(res["results"]) == 5
    assert res["results"] == [m.json() for m in searcher.search("a person opens a door", top_k=5)]
    for q, want in (("", "empty"), ("x" * 10_000, "at most"), ("ok&k=0", "k must be"), ("ok&k=abc", "whole number")):
        st, body, _ = _get(f"{base}/api/search?q={q}")
        assert st == 400 and want in json.loads(body)["error"]
    st, body, h = _get(f"{base}/?q=" + "y" * 10_000)
    assert st == 400 and b"at most" in body and b"Traceback" not in body and h["Content-Type"].startswith("text/html")
    st, body, _ = _get(f"{base}/?q=a+dog")
    assert st == 200 and body.count(b"<li ") == 20 and b"<script src" not in body and b"http" not in body.split(b"<body>")[1]


def test_the_servers_own_refusals_are_one_line(server):
    """http.server's 414 / 501 / 400 come as one line of text, never its HTML error page."""
    import http.client

    base, searcher, _ = server
    host, port = base.split("//")[1].split(":")
    for method, path, want in (("POST", "/api/search", 405), ("GET", "/?q=" + "z" * 70_000, 414),
                               ("DELETE", "/", 405), ("BREW", "/", 501)):
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request(method, path)
        r = c.getresponse()
        body = r.read()
        c.close()
        assert r.status == want and r.getheader("Content-Type").startswith("text/plain")
        assert len(body.decode().strip().splitlines()) == 1 and b"<html" not in body.lower(), body
        if want == 405:
            assert r.getheader("Allow") == "GET, HEAD"
    for bad, want in (({"nms": 1.5}, "--nms"), ({"nms": float("nan")}, "--nms"), ({"top_k": 10**6}, "--top-k")):
        with pytest.raises(DataError, match=want):
            searcher.search("a dog", **bad)


def test_video_paths_are_confined_and_ranges_served(server):
    base, searcher, videos = server
    name = searcher.index.corpus.videos[0]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    (videos / f"{stem}.webm").write_bytes(bytes(range(256)) * 4)  # the index's video, transcoded
    url = f"{base}/video/{urllib.parse.quote(name)}"
    st, body, h = _get(url, {"Range": "bytes=10-19"})
    assert st == 206 and body == bytes(range(10, 20)) and h["Content-Range"] == "bytes 10-19/1024"
    st, body, _ = _get(url)
    assert st == 200 and len(body) == 1024
    st, body, _ = _get(f"{base}/video/{urllib.parse.quote(stem)}.webm")  # asked for by its file name
    assert st == 200 and len(body) == 1024
    # files under --videos that are not the index's videos, or not videos, are not served
    (videos / "other.webm").write_bytes(b"not indexed")
    (videos / "notes.txt").write_text("private")
    (videos / stem).mkdir(exist_ok=True)
    (videos / f"{stem}.txt").write_text("private too")
    for bad in ("../secret.txt", "..%2Fsecret.txt", "%2Fetc%2Fpasswd", "nothing.mp4", "other.webm", "notes.txt",
                f"{urllib.parse.quote(stem)}.txt"):
        st, body, _ = _get(f"{base}/video/{bad}")
        assert st == 404 and b"not for the web" not in body and b"root:" not in body and b"private" not in body
        assert b"not indexed" not in body
    st, _, _ = _get(url, {"Range": "bytes=5000-6000"})
    assert st == 416
    # RFC 9110: an end past the file is trimmed; a suffix range; malformed or multiple ranges: the whole file
    st, body, h = _get(url, {"Range": "bytes=1000-999999"})
    assert st == 206 and body == (bytes(range(256)) * 4)[1000:] and h["Content-Range"] == "bytes 1000-1023/1024"
    st, body, h = _get(url, {"Range": "bytes=-4"})
    assert st == 206 and body == bytes(range(252, 256)) and h["Content-Range"] == "bytes 1020-1023/1024"
    for header in ("bytes=abc", "bytes=0-0,5-9", "items=0-1", "bytes=5-2x"):
        st, body, _ = _get(url, {"Range": header})
        assert st == 200 and len(body) == 1024, header


def test_video_bytes_are_streamed_not_read_whole(server, monkeypatch):
    """A video is sent in 1 MiB pieces: never one read of the whole file (multi-GB videos, several viewers)."""
    import builtins

    base, searcher, videos = server
    name = searcher.index.corpus.videos[1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    (videos / f"{stem}.mp4").write_bytes(b"\x01" * (3 * (1 << 20) + 5))
    sizes = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, n):
            self.f.seek(n)

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

    def spy_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Spy(f) if str(path).endswith(f"{stem}.mp4") and "b" in mode else f

    monkeypatch.setattr(builtins, "open", spy_open)
    st, body, _ = _get(f"{base}/video/{urllib.parse.quote(name)}")
    assert st == 200 and len(body) == 3 * (1 << 20) + 5
    assert sizes and max(sizes) <= 1 << 20 and -1 not in sizes
    sizes.clear()
    req = urllib.request.Request(f"{base}/video/{urllib.parse.quote(name)}", method="HEAD")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(3 * (1 << 20) + 5)
    assert not sizes  # HEAD reads nothing


def test_api_takes_top_k_as_search_names_it(server):
    base, searcher, _ = server
    q = urllib.parse.quote("a person opens a door")
    for arg in ("k=3", "top_k=3"):
        st, body, _ = _get(f"{base}/api/search?q={q}&{arg}")
        assert st == 200 and len(json.loads(body)["results"]) == 3
    st, body, _ = _get(f"{base}/api/search?q={q}&top_k=0")
    assert st == 400 and "top_k must be between 1 and 200" in json.loads(body)["error"]
    # nms as `search --nms`: 1 keeps every moment, an IoU outside 0..1 is refused
    st, body, _ = _get(f"{base}/api/search?q={q}&k=20&nms=1")
    assert st == 200 and json.loads(body)["results"] == [m.json() for m in searcher.search(
        "a person opens a door", top_k=20, nms=1.0)]
    for bad in ("5", "nan", "x"):
        st, body, _ = _get(f"{base}/api/search?q={q}&nms={bad}")
        assert st == 400 and "nms must be" in json.loads(body)["error"]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _webm(path, seconds=40):
    import av
    import numpy as np

    with av.open(str(path), "w", format="webm") as out:
        s = out.add_stream("libvpx-vp9", rate=5)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * 5):
            img = np.full((48, 64, 3), (i * 3) % 255, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def test_search_page_in_headless_chromium_seeks_the_player(server):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    base, searcher, videos = server
    q = "a person opens a door"
    top = searcher.search(q, top_k=20)
    first = next(i for i, m in enumerate(top) if m.start > 0)  # a moment that does not start at 0
    _webm(videos / (top[first].video.rsplit(".", 1)[0] + ".webm"))  # the page finds it beside its name
    url = f"{base}/?q={urllib.parse.quote(q)}&play={first}"
    p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
                        "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = p.stdout
    assert dom.count("<li ") == 20, p.stderr[-2000:]
    assert f'data-seeked="{top[first].start:g}"' in dom or f'data-seeked="{int(top[first].start)}"' in dom, dom[-3000:]
    assert f"from {top[first].start:.1f} s" in dom
