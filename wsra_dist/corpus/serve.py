"""`wsra-dist serve INDEX`: a local search page over an index (standard library HTTP server, nothing fetched).

GET /?q=TEXT[&k=N]      the page, with results rendered by the server (works without JavaScript)
GET /api/search?q=...[&k=N | &top_k=N][&nms=IOU]   {"query", "results": [{video, start, end, score}, ...]} or {"error": "..."} (400)
GET /video/NAME         the index's video NAME from --videos (HTTP Range, so the player can seek); other files refused
The page's only script (inline) makes a result click load the video and seek the player to the moment's start.
Every bad request gets a one-line message and a 4xx status, never a traceback page.
"""

from __future__ import annotations

import html
import json
import mimetypes
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..data.records import DataError
from .search import MAX_QUERY_CHARS

MAX_K = 200
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi", ".ogv", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsra-dist search</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }}
form {{ display: flex; gap: .5rem; }} input[type=text] {{ flex: 1; font-size: 1.1rem; padding: .4rem; }}
.wrap {{ display: flex; gap: 1.5rem; margin-top: 1rem; }} ol {{ flex: 1; padding-left: 1.5rem; }}
li {{ margin: .3rem 0; cursor: pointer; }} li:hover {{ background: #eef; }} li.chosen {{ background: #dde; }} .score {{ color: #666; }}
.msg {{ color: #a00; }} video {{ width: 32rem; max-width: 100%; background: #000; }} .meta {{ color: #555; }}
</style></head><body>
<h1>Search {n_videos} videos</h1>
<p class="meta">{n_cand} candidate moments; index {index}</p>
<form method="get" action="/"><input type="text" name="q" id="q" value="{q}" maxlength="{max_chars}"
 placeholder="a man delivers a package" autofocus><input type="hidden" name="k" value="{k}">
<button type="submit">Search</button></form>
{message}
<div class="wrap"><ol id="results">{items}</ol>
<div>{player}<p id="now" class="meta"></p></div></div>
<script>
(function () {{
  var player = document.getElementById("player"), now = document.getElementById("now");
  function choose(li) {{
    var start = parseFloat(li.dataset.start), src = li.dataset.src;
    document.querySelectorAll("#results li.chosen").forEach(function (x) {{ x.classList.remove("chosen"); }});
    li.classList.add("chosen");
    now.textContent = li.dataset.video + " from " + start.toFixed(1) + " s";
    if (!player || !src) {{ return; }}
    function seek() {{ player.currentTime = start; player.dataset.seeked = String(start); }}
    if (player.getAttribute("src") !== src) {{
      player.setAttribute("src", src);
      player.addEventListener("loadedmetadata", seek, {{once: true}});
      player.load();
    }} else {{ seek(); }}
  }}
  var items = document.querySelectorAll("#results li");
  items.forEach(function (li) {{ li.addEventListener("click", function () {{ choose(li); }}); }});
  var pick = new URLSearchParams(location.search).get("play");  // ?play=N: choose result N (links, tests)
  if (pick !== null && items[+pick]) {{ items[+pick].click(); }}
}})();
</script></body></html>
"""


def _fmt(t: float) -> str:
    m, s = divmod(max(t, 0.0), 60)
    return f"{int(m)}:{s:04.1f}"


class _Handler(BaseHTTPRequestHandler):
    searcher = None
    videos: Path | None = None
    known: frozenset = frozenset()  # the index's video names: the only files /video/ serves
    stems: dict = {}  # NAME -> the index's NAME.mp4 (and the like)
    index_path = ""
    server_version = "wsra-dist"

    def log_message(self, *args) -> None:  # quiet: one line per request is noise for a local tool
        pass

    # ------------------------------------------------------------------------------- responses
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error_text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (414 URI too long, 400 bad request line, 501 unknown method): one line of
        text like every other error here, not its HTML error page."""
        self.close_connection = True
        short = message or self.responses.get(code, ("error",))[0]
        hint = {414: f" (a query has at most {MAX_QUERY_CHARS} characters)",
                501: " (this server answers GET and HEAD)"}.get(int(code), "")
        try:
            self._error_text(int(code), f"{int(code)} {short}{hint}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._send(405, f"405 {self.command} is not allowed (this server answers GET and HEAD)\n".encode(),
                   "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_GET(self) -> None:
        try:
            url = urllib.parse.urlsplit(self.path)
            args = urllib.parse.parse_qs(url.query)
            if url.path == "/":
                return self._page(args)
            if url.path == "/api/search":
                return self._api(args)
            if url.path.startswith("/video/"):
                return self._video(urllib.parse.unquote(url.path[len("/video/"):]))
            self._error_text(404, f"not found: {url.path} (pages: /, /api/search?q=..., /video/NAME)")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug must not become a traceback page
            self._error_text(500, f"internal error: {type(e).__name__}: {e}")

    def _query(self, args: dict) -> tuple[str, int]:
        q = (args.get("q") or [""])[0]
        name = "k" if "k" in args else "top_k" if "top_k" in args else "k"  # top_k: as `search --top-k` names it
        try:
            k = int((args.get(name) or ["20"])[0])
        except ValueError:
            raise DataError(f"{name} must be a whole number of results") from None
        if not 1 <= k <= MAX_K:
            raise DataError(f"{name} must be between 1 and {MAX_K}, got {k}")
        return q, k

    def _nms(self, args: dict) -> float:
        from .search import NMS

        try:
            x = float((args.get("nms") or [str(NMS)])[0])
        except ValueError:
            raise DataError("nms must be a number (an IoU between 0 and 1)") from None
        if not 0.0 <= x <= 1.0:  # also NaN
            raise DataError(f"nms must be an IoU between 0 and 1 (1: keep every moment), got {x}")
        return x

    def _results(self, q: str, k: int, nms: float | None = None) -> list[dict]:
        from .search import NMS

        return [m.json() for m in self.searcher.search(q, top_k=k, nms=NMS if nms is None else nms)]

    def _api(self, args: dict) -> None:
        try:
            q, k = self._query(args)
            self._json(200, {"query": q, "results": self._results(q, k, self._nms(args))})
        except DataError as e:
            self._json(400, {"error": str(e)})

    def _page(self, args: dict) -> None:
        q, k, items, message, status = "", 20, "", "", 200
        try:
            q, k = self._query(args)
            if "q" in args:
                res = self._results(q, k)
                items = "".join(self._item(r) for r in res)
                message = f'<p class="meta">{len(res)} moments for “{html.escape(q)}”</p>'
        except DataError as e:
            message, status = f'<p class="msg">{html.escape(str(e))}</p>', 400
        c = self.searcher.index.corpus
        player = ('<video id="player" controls preload="metadata"></video>' if self.videos is not None else
                  '<p class="meta">(start with --videos DIR to play the moments)</p>')
        body = PAGE.format(n_videos=len(c.videos), n_cand=c.size, index=html.escape(self.index_path),
                           q=html.escape(q[:MAX_QUERY_CHARS]), k=k, max_chars=MAX_QUERY_CHARS, message=message,
                           items=items, player=player)
        self._send(status, body.encode(), "text/html; charset=utf-8")

    def _item(self, r: dict) -> str:
        src = ""
        if self.videos is not None and self._video_path(r["video"]) is not None:
            src = "/video/" + urllib.parse.quote(r["video"])
        return (f'<li data-video="{html.escape(r["video"])}" data-start="{r["start"]}" data-src="{html.escape(src)}">'
                f'{html.escape(r["video"])} {_fmt(r["start"])}–{_fmt(r["end"])} '
                f'<span class="score">{r["score"]:.3f}</span></li>')

    def _video_path(self, name: str) -> Path | None:
        """The file of the index's video `name` under --videos, or None.  Only the index's own videos are served
        (NAME, NAME.EXT or NAME with its extension replaced by a video container's: a transcoded copy), only files
        with a video extension, and only inside the folder (`..`, absolute paths and links out are refused):
        --videos may be a folder that holds other things."""
        if self.videos is None or not name or "\x00" in name:
            return None
        known = self.known
        base = name if name in known else None
        if base is None and Path(name).suffix.lower() in VIDEO_EXTS:  # NAME.webm for the index's NAME or NAME.mp4
            stem = name[: -len(Path(name).suffix)]
            base = stem if stem in known else self.stems.get(stem)
        if base is None:
            return None
        root = self.videos.resolve()
        plain = root / base
        tries = [plain, *(plain.with_name(plain.name + ext) for ext in VIDEO_EXTS)]
        if plain.name.endswith("."):  # DiDeMo names cut after the dot ("...ad."): NAME + "mp4"
            tries += [plain.with_name(plain.name + ext[1:]) for ext in VIDEO_EXTS]
        if plain.suffix:
            tries += [plain.with_suffix(ext) for ext in VIDEO_EXTS]
        for q in tries:
            p = q.resolve()
            if root in p.parents and p.suffix.lower() in VIDEO_EXTS and p.is_file():
                return p
        return None

    def _video(self, name: str) -> None:
        if self.videos is None:
            return self._error_text(404, "no videos are served (start with --videos DIR)")
        p = self._video_path(name)
        if p is None:
            return self._error_text(404, f"unknown video: {name!r} (not a video of this index with a file under --videos)")
        size = p.stat().st_size
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        span = _byte_range(self.headers.get("Range", ""), size)
        if span == "unsatisfiable":
            return self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
        start, end = span or (0, size - 1)
        extra = {"Accept-Ranges": "bytes"}
        if span:
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._stream(206 if span else 200, p, start, end - start + 1, ctype, extra)

    def _stream(self, status: int, path: Path, start: int, length: int, ctype: str, extra: dict) -> None:
        """Headers, then the bytes in 1 MiB pieces: a multi-GB video never sits in memory (HEAD: headers only)."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            while length > 0:
                piece = f.read(min(length, 1 << 20))
                if not piece:
                    break
                self.wfile.write(piece)
                length -= len(piece)


def _byte_range(header: str, size: int):
    """RFC 9110 single byte range: (start, end) inclusive, None to send the whole file (no Range, a malformed one,
    or several ranges: a server may ignore Range), or "unsatisfiable" (416).  An end past the file is trimmed."""
    if not header.startswith("bytes=") or "," in header:
        return None
    a, sep, b = header[6:].strip().partition("-")
    if not sep or not (a.isdigit() or b.isdigit()) or (a and not a.isdigit()) or (b and not b.isdigit()):
        return None
    if not a:  # suffix: the last b bytes
        n = int(b)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    start = int(a)
    end = min(int(b), size - 1) if b else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end


def _stems(videos: list[str]) -> dict[str, str]:
    return {v[: -len(Path(v).suffix)]: v for v in videos if Path(v).suffix.lower() in VIDEO_EXTS}


def make_server(searcher, videos: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
                index_path: str = "") -> ThreadingHTTPServer:
    """The server (not started): `.serve_forever()`; port 0 picks a free one (`.server_address`)."""
    if videos is not None and not Path(videos).is_dir():
        raise DataError(f"--videos {videos}: not a folder")
    handler = type("Handler", (_Handler,), {"searcher": searcher, "videos": Path(videos) if videos else None,
                                            "known": frozenset(searcher.index.corpus.videos),
                                            "stems": _stems(searcher.index.corpus.videos), "index_path": index_path})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise DataError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


mimetypes.add_type("video/webm", ".webm")
mimetypes.add_type("video/mp4", ".m4v")
