"""The search web page and its JSON API, on the standard library's HTTP server.

    GET /                          the page: a search box, an ITC-only / re-ranked toggle, a grid of thumbnails
    GET /api/search?q=TEXT[&top=N][&k=K][&mode=rerank|itc]   results as JSON (engine/search_query.SearchResult)
    GET /api/info                  the index: image count, folder name, model id and checkpoint name
    GET /thumb?path=REL            a JPEG thumbnail of an indexed image; GET /image?path=REL the file itself

Why the standard library: this is a single-user tool for one's own photos, bound to loopback by default; one
query runs at a time on the model anyway (Searcher holds a lock), and ThreadingHTTPServer serves thumbnails
while a query runs. No new dependency, nothing to configure. It is not meant to face the internet.

Who may ask: only requests whose Host header names this server (by default the loopback names localhost,
127.0.0.1 and [::1], with or without the port; `allowed_hosts` adds names) are answered, anything else gets a 403.
A web page the user visits elsewhere could otherwise reach the server by DNS rebinding (its own name re-pointed
at 127.0.0.1), and its requests carry its own name in Host. /api/info names the folder and the checkpoint by
their base names only, never by absolute path.

Files: only images that are in the index are ever served. `path` must be exactly one of the index's relative
paths (so `..`, absolute paths and any encoding of them are simply not found), and its real path (symlinks
resolved at request time) must still lie inside the indexed folder: anything else is a 404. The file opened
must also be the one indexed: its size, mtime and inode (taken from the open file) must equal those recorded at
index time, so a file replaced since (a hard link to another file included, which keeps the path but not the
inode) is refused with a 409 and a log line until the folder is indexed again.

Bounded work: a thumbnail is decoded at reduced size where the format allows it (JPEG draft mode), images over
THUMB_MAX_PIXELS are not decoded at all, at most THUMB_DECODES decodes run at once, and thumbnails are kept in
an LRU cache of THUMB_CACHE_BYTES. Idle connections are closed after REQUEST_TIMEOUT_S. A query re-ranks at most
MAX_RERANK_K images (or k_test when larger) and reads at most MAX_QUERY_CHARS characters.
"""

from __future__ import annotations

import io
import ipaddress
import json
import mimetypes
import os
import stat
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from data.image_folder import is_inside, same_version
from engine.search_query import Searcher

MAX_QUERY_CHARS = 1000  # the tokenizer keeps 35 tokens anyway; longer is a mistake or abuse
MAX_TOP = 200
MAX_RERANK_K = 256  # the official COCO k_test; a larger k holds the model lock (all queries wait) for longer
THUMB_SIDE = 256
THUMB_MAX_PIXELS = 50_000_000  # after JPEG draft reduction: a larger image (a 7000x7000 PNG) is not decoded
THUMB_DECODES = 2  # thumbnails decoded at once (each may hold up to THUMB_MAX_PIXELS * 4 bytes)
THUMB_CACHE_BYTES = 64 * 2**20  # about 3000 thumbnails of 20 KB
REQUEST_TIMEOUT_S = 30.0  # a connection that sends nothing for this long is closed
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
PARAMS = {"/api/search": {"q", "top", "k", "mode"}, "/thumb": {"path"}, "/image": {"path"}, "/api/info": set()}


class BadRequest(Exception):
    """A request the client must fix: answered with 400 and this message."""


class NotFound(Exception):
    pass


class Changed(Exception):
    """An indexed file that is no longer the file indexed: answered with 409."""


class TooLarge(Exception):
    """An image too large to thumbnail: answered with 422."""


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
    k = _int_param(params, "k", searcher.config["k_test"], 1, max(MAX_RERANK_K, searcher.config["k_test"]))
    mode = params.get("mode", "rerank")
    if mode not in ("rerank", "itc"):
        raise BadRequest(f"mode must be 'rerank' or 'itc', got {mode!r}")
    searcher.reload_if_changed()
    result = searcher.search_text(text, top=top, rerank_k=k, rerank=mode == "rerank").as_dict()
    return {"query": text, **result}


def public_info(searcher: Searcher) -> dict:
    """/api/info: what is served, without absolute paths (base names of the folder and a local checkpoint)."""
    index = searcher.index
    checkpoint = index.model["checkpoint"]
    if checkpoint and "://" not in checkpoint:
        checkpoint = os.path.basename(os.path.normpath(checkpoint))
    folder = os.path.basename(os.path.normpath(index.image_root))
    return {"images": len(index), "folder": folder, "model": index.model["id"], "checkpoint": checkpoint}


# ---------------------------------------------------------------------------------------------------- Host


def allowed_host_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The Host header names to answer: the loopback names, the listening address when it is a specific one
    (not 0.0.0.0 or ::), and `extra`. IPv6 addresses are written in brackets, as in a Host header."""
    names = set(LOOPBACK_NAMES)
    for name in (host, *extra):
        name = name.strip().lower().rstrip(".")
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            if name:
                names.add(name)
            continue
        if not address.is_unspecified:
            names.add(f"[{address.compressed}]" if address.version == 6 else address.compressed)
    return frozenset(names)


def host_is_allowed(header: str | None, allowed: frozenset[str], port: int) -> bool:
    """True when a Host header names an allowed host, with no port or this server's `port`."""
    if not header:
        return False
    value = header.strip().lower()
    if value.startswith("["):  # [v6 address]:port
        name, _, rest = value.partition("]")
        name += "]"
    else:
        name, _, rest = value.rpartition(":") if ":" in value else (value, "", "")
        rest = ":" + rest if rest else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and int(rest[1:]) == port):
        return False
    return name.rstrip(".") in allowed


# ---------------------------------------------------------------------------------------------------- files


def open_indexed_file(searcher: Searcher, rel: str) -> tuple[BinaryIO, tuple[str, int, int, int]]:
    """The indexed image `rel`, opened, and its cache key (path, size, mtime_ns, inode) from the open file.
    NotFound when it is not an indexed path or leads out of the folder; Changed when the file opened is not
    the one recorded at index time (see the module docstring)."""
    index = searcher.index
    row = index.row_of(rel)
    if row is None:
        raise NotFound(f"{rel!r} is not an indexed image")
    full = os.path.join(index.image_root, rel)
    if not is_inside(index.image_root, full):
        raise NotFound(f"{rel!r} is not an indexed image")
    try:
        f = open(full, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound(f"{rel!r} is not an indexed image") from None
    st = os.fstat(f.fileno())  # of the file actually opened: a swap after the checks above shows here
    version = (st.st_size, st.st_mtime_ns, st.st_ino)
    if not stat.S_ISREG(st.st_mode) or not same_version(index.version(row), version):
        f.close()
        raise Changed(
            f"{rel!r} is not the file that was indexed (size, mtime or inode differ): run `search.py index` again"
        )
    return f, (rel, *version)


def make_thumbnail(file: BinaryIO, max_pixels: int = THUMB_MAX_PIXELS) -> bytes:
    """A JPEG of at most THUMB_SIDE pixels a side. JPEGs are decoded at 1/2 to 1/8 scale (draft mode); an
    image that still has more than `max_pixels` pixels is refused (TooLarge) before anything is decoded."""
    try:
        with Image.open(file) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            if img.width * img.height > max_pixels:
                raise TooLarge(f"{img.width}x{img.height} pixels")
            img = img.convert("RGB")
    except Image.DecompressionBombError as err:  # over PIL's own limit: refused by Image.open itself
        raise TooLarge(str(err)) from None
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), reducing_gap=2.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


class Thumbnails:
    """Thumbnails by (path, size, mtime_ns, inode): an LRU cache bounded in bytes, and at most `max_decodes`
    decodes at once (the rest wait), so that many requests for large images cannot exhaust memory."""

    def __init__(
        self, max_bytes: int = THUMB_CACHE_BYTES, max_decodes: int = THUMB_DECODES, max_pixels: int = THUMB_MAX_PIXELS
    ):
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.cache: OrderedDict[tuple, bytes] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(max_decodes)
        self.decodes = self.active = self.peak_active = 0  # counters, for tests and curiosity

    def get(self, key: tuple, file: BinaryIO) -> bytes:
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        with self.decoding:
            with self.lock:
                self.active += 1
                self.peak_active = max(self.peak_active, self.active)
            try:
                body = make_thumbnail(file, self.max_pixels)
            finally:
                with self.lock:
                    self.active -= 1
        with self.lock:
            self.decodes += 1
            if key not in self.cache and len(body) <= self.max_bytes:
                self.cache[key] = body
                self.bytes += len(body)
            while self.bytes > self.max_bytes:
                _, old = self.cache.popitem(last=False)
                self.bytes -= len(old)
        return body


# ---------------------------------------------------------------------------------------------------- server


class SearchServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries what its handlers share: the searcher, the allowed Host names, the
    thumbnail cache."""

    daemon_threads = True

    def __init__(
        self,
        searcher: Searcher,
        host: str,
        port: int,
        allowed_hosts: list[str] | tuple[str, ...] = (),
        quiet: bool = False,
        request_timeout: float = REQUEST_TIMEOUT_S,
    ):
        handler = type("Handler", (Handler,), {"timeout": request_timeout})
        super().__init__((host, port), handler)
        self.searcher, self.quiet = searcher, quiet
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.thumbnails = Thumbnails()


class Handler(BaseHTTPRequestHandler):
    server_version = "blip-search/1"
    server: SearchServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
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

    def _host_ok(self) -> bool:
        host = self.headers.get("Host")
        if host_is_allowed(host, self.server.allowed_hosts, self.server.server_address[1]):
            return True
        self.log_error("refused a request for Host %r (allowed: %s)", host, sorted(self.server.allowed_hosts))
        self._json(
            HTTPStatus.FORBIDDEN,
            {"error": f"Host {host!r} is not served here; start the server with --allowed-host NAME to allow it"},
        )
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            return
        searcher = self.server.searcher
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
                self._json(HTTPStatus.OK, public_info(searcher))
            else:
                f, key = open_indexed_file(searcher, params.get("path", ""))
                with f:
                    if url.path == "/thumb":
                        self._send(HTTPStatus.OK, self.server.thumbnails.get(key, f), "image/jpeg", cache=True)
                    else:
                        body = f.read()
                        kind = mimetypes.guess_type(key[0])[0] or "application/octet-stream"
                        self._send(HTTPStatus.OK, body, kind, cache=True)
        except BadRequest as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except NotFound as err:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(err)})
        except Changed as err:
            self.log_error("refused %s: %s", self.path, err)
            self._json(HTTPStatus.CONFLICT, {"error": str(err)})
        except TooLarge as err:
            self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"too large for a thumbnail: {err}"})
        except OSError as err:  # an indexed file unreadable since indexing, or not an image PIL can read
            self._json(HTTPStatus.NOT_FOUND, {"error": f"could not read the image: {err.strerror or err}"})
        except Exception as err:  # a bug: say so instead of dropping the connection
            self.log_error("error answering %s: %r", self.path, err)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

    def do_POST(self) -> None:  # noqa: N802
        if self._host_ok():
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET, e.g. /api/search?q=a+red+circle"})


def make_server(
    searcher: Searcher,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> SearchServer:
    """A server for `searcher` (port 0: any free port; `server.server_address` says which). `allowed_hosts`:
    Host header names accepted besides the loopback names and `host`."""
    return SearchServer(searcher, host, port, allowed_hosts, quiet, request_timeout)


def serve_in_thread(searcher: Searcher, host: str = "127.0.0.1", port: int = 0, quiet: bool = True, **kwargs):
    """Start a server in a background thread (tests, notebooks); returns (server, base URL). Stop with
    server.shutdown(). `kwargs` go to make_server."""
    server = make_server(searcher, host, port, quiet, **kwargs)
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
