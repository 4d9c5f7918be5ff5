"""The search web page and its JSON API, on the standard library's HTTP server.

    GET /                          the page: a search box, an ITC-only / re-ranked toggle, a grid of thumbnails
    GET /api/search?q=TEXT[&top=N][&k=K][&mode=rerank|itc]   results as JSON (engine/search_query.SearchResult)
    GET /api/info                  the index: image count, root, model id and checkpoint
    GET /thumb?path=REL            a JPEG thumbnail of an indexed image; GET /image?path=REL the file itself

Why the standard library: this is a single-user tool for one's own photos, bound to loopback by default; one
query runs at a time on the model anyway (Searcher holds a lock), and ThreadingHTTPServer serves thumbnails
while a query runs. No new dependency, nothing to configure. It is not meant to face the internet.

Files: only images that are in the index are ever served. `path` must be exactly one of the index's relative
paths (so `..`, absolute paths and any encoding of them are simply not found), and its real path (symlinks
resolved at request time) must still lie inside the indexed folder. Anything else is a 404.
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from data.image_folder import is_inside
from engine.search_query import Searcher

MAX_QUERY_CHARS = 1000  # the tokenizer keeps 35 tokens anyway; longer is a mistake or abuse
MAX_TOP = 200
MAX_RERANK_K = 1024
THUMB_SIDE = 256
PARAMS = {"/api/search": {"q", "top", "k", "mode"}, "/thumb": {"path"}, "/image": {"path"}, "/api/info": set()}


class BadRequest(Exception):
    """A request the client must fix: answered with 400 and this message."""


class NotFound(Exception):
    pass


def parse_params(query: str, allowed: set[str]) -> dict[str, str]:
    """The query string as {name: value}; BadRequest on bad encoding, repeated or unknown parameters."""
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRequest(f"malformed query string: {err}") from None
    unknown = sorted(set(parsed) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {unknown}; this endpoint takes {sorted(allowed)}")
    repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
    if repeated:
        raise BadRequest(f"parameter(s) {repeated} given more than once")
    return {name: values[0] for name, values in parsed.items()}


def _int_param(params: dict, name: str, default: int, low: int, high: int) -> int:
    if name not in params:
        return default
    try:
        value = int(params[name])
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {params[name]!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {value}")
    return value


def search_request(searcher: Searcher, params: dict) -> dict:
    """Validate /api/search parameters and run the query."""
    text = params.get("q", "")
    if not text.strip():
        raise BadRequest("empty query: pass some words, e.g. /api/search?q=a+red+circle")
    if len(text) > MAX_QUERY_CHARS:
        raise BadRequest(f"query too long: {len(text)} characters, at most {MAX_QUERY_CHARS}")
    top = _int_param(params, "top", 24, 1, MAX_TOP)
    k = _int_param(params, "k", searcher.config["k_test"], 1, MAX_RERANK_K)
    mode = params.get("mode", "rerank")
    if mode not in ("rerank", "itc"):
        raise BadRequest(f"mode must be 'rerank' or 'itc', got {mode!r}")
    searcher.reload_if_changed()
    result = searcher.search_text(text, top=top, rerank_k=k, rerank=mode == "rerank").as_dict()
    return {"query": text, **result}


def indexed_file(searcher: Searcher, rel: str) -> str:
    """The absolute path of the indexed image `rel`, or NotFound (see the module docstring)."""
    index = searcher.index
    if rel not in index.path_set():
        raise NotFound(f"{rel!r} is not an indexed image")
    full = os.path.join(index.image_root, rel)
    if not is_inside(index.image_root, full) or not os.path.isfile(full):
        raise NotFound(f"{rel!r} is not an indexed image")
    return full


def thumbnail(path: str) -> bytes:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()


def make_handler(searcher: Searcher, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "blip-search/1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
            if not quiet:
                super().log_message(format, *args)

        def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            try:
                if url.path not in PARAMS and url.path != "/":
                    raise NotFound(f"no such page: {url.path}")
                params = parse_params(url.query, PARAMS.get(url.path, set()))
                if url.path == "/":
                    self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
                elif url.path == "/api/search":
                    self._json(HTTPStatus.OK, search_request(searcher, params))
                elif url.path == "/api/info":
                    index = searcher.index
                    info = {"images": len(index), "image_root": index.image_root, "model": index.model["id"]}
                    self._json(HTTPStatus.OK, {**info, "checkpoint": index.model["checkpoint"]})
                else:
                    full = indexed_file(searcher, params.get("path", ""))
                    if url.path == "/thumb":
                        self._send(HTTPStatus.OK, thumbnail(full), "image/jpeg", cache=True)
                    else:
                        with open(full, "rb") as f:
                            body = f.read()
                        kind = mimetypes.guess_type(full)[0] or "application/octet-stream"
                        self._send(HTTPStatus.OK, body, kind, cache=True)
            except BadRequest as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            except NotFound as err:
                self._json(HTTPStatus.NOT_FOUND, {"error": str(err)})
            except OSError as err:  # an indexed file deleted or unreadable since indexing
                self._json(HTTPStatus.NOT_FOUND, {"error": f"could not read the image: {err.strerror}"})
            except Exception as err:  # a bug or a broken image: say so instead of dropping the connection
                self.log_error("error answering %s: %r", self.path, err)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

        def do_POST(self) -> None:  # noqa: N802
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET, e.g. /api/search?q=a+red+circle"})

    return Handler


def make_server(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
    """A ThreadingHTTPServer for `searcher` (port 0: any free port; `server.server_address` says which)."""
    server = ThreadingHTTPServer((host, port), make_handler(searcher, quiet))
    server.daemon_threads = True
    return server


def serve_in_thread(searcher: Searcher, host: str = "127.0.0.1", port: int = 0, quiet: bool = True):
    """Start a server in a background thread (tests, notebooks); returns (server, base URL). Stop with
    server.shutdown()."""
    server = make_server(searcher, host, port, quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Photo search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
  form { display: flex; gap: .6rem; align-items: center; flex-wrap: wrap; }
  #q { flex: 1 1 30rem; font-size: 1.1rem; padding: .45rem .6rem; }
  button { font-size: 1rem; padding: .45rem 1rem; }
  #status { margin: .8rem 0; color: #555; min-height: 1.2em; }
  #status.error { color: #b00020; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: .8rem; }
  figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .4rem; }
  figure img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; display: block; }
  figcaption { font-size: .8rem; margin-top: .3rem; }
  .path { word-break: break-all; color: #555; }
  .score { font-weight: 600; }
</style>
</head>
<body>
<h1>Photo search</h1>
<form id="search">
  <input id="q" name="q" type="search" placeholder="describe a photo, e.g. a red circle on a blue background"
         maxlength="1000" autofocus>
  <label><input id="rerank" type="checkbox" checked> re-rank with ITM</label>
  <button id="go" type="submit">Search</button>
</form>
<div id="status"></div>
<div id="results"></div>
<script>
const form = document.getElementById("search"), box = document.getElementById("q");
const rerank = document.getElementById("rerank"), status = document.getElementById("status");
const grid = document.getElementById("results");
async function run() {
  const q = box.value;
  const mode = rerank.checked ? "rerank" : "itc";
  status.className = ""; status.textContent = "searching...";
  const response = await fetch("/api/search?" + new URLSearchParams({q: q, mode: mode}));
  const data = await response.json();
  grid.replaceChildren();
  if (!response.ok) { status.className = "error"; status.textContent = data.error; return; }
  const total = Object.values(data.timings_ms).reduce((a, b) => a + b, 0);
  status.textContent = `${data.results.length} results, ${mode === "rerank" ?
    "ITC shortlist of " + data.rerank_k + " re-ranked by ITM" : "ITC only"}, ${total.toFixed(0)} ms`;
  grid.dataset.mode = mode;
  for (const hit of data.results) {
    const fig = document.createElement("figure"), img = document.createElement("img");
    const cap = document.createElement("figcaption"), score = document.createElement("span");
    const link = document.createElement("a"), path = document.createElement("span");
    link.href = "/image?" + new URLSearchParams({path: hit.path});
    img.src = "/thumb?" + new URLSearchParams({path: hit.path}); img.alt = hit.path; img.loading = "lazy";
    score.className = "score"; score.textContent = hit.score.toFixed(3);
    const parts = hit.itm === null ? " cos " + hit.cosine.toFixed(3)
                                   : ` = itm ${hit.itm.toFixed(3)} + cos ${hit.cosine.toFixed(3)}`;
    path.className = "path"; path.textContent = hit.path;
    cap.append(score, parts, document.createElement("br"), path);
    link.append(img); fig.append(link, cap); grid.append(fig);
  }
}
form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
rerank.addEventListener("change", () => { if (box.value.trim()) run(); });
</script>
</body>
</html>
"""
