"""Tests for the search web server (engine/search_server.py): the JSON API against the Searcher, 4xx for bad
queries, path traversal refused, and the page driven in a real headless Chromium (Debian's `chromium`, which
`make test` installs when missing) through Playwright.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
from urllib.parse import quote

import pytest
import torch
from PIL import Image

from data.synthetic import make_synthetic_dataset
from engine.search_index import SearchIndex, build_index
from engine.search_query import Searcher
from engine.search_server import (
    MAX_QUERY_CHARS,
    MAX_RERANK_K,
    Thumbnails,
    TooLarge,
    allowed_host_names,
    make_thumbnail,
    serve_in_thread,
)
from models.blip_retrieval import build_model
from tests.helpers import bomb_png, spread_weights, synthetic_config

CPU = torch.device("cpu")
CHROMIUM = "/usr/bin/chromium"
# Without the networking switches Chromium waits for network services that this closed network never answers.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A server over 10 generated images (one in a sub-folder), an outside secret file and an indexed file
    that is swapped for a symlink pointing outside after indexing."""
    root = tmp_path_factory.mktemp("serve")
    paths = make_synthetic_dataset(
        str(root / "gen"), num_train_images=0, num_val_images=0, num_test_images=10, image_size=64, seed=7
    )
    config = synthetic_config(root, paths, vit={"width": 48, "depth": 2, "heads": 2, "patch_size": 8}, k_test=5)
    torch.manual_seed(0)
    model = spread_weights(build_model(config)).eval()
    photos = root / "photos"
    shutil.copytree(os.path.join(paths["image_root"], "test"), photos / "album")
    shutil.move(photos / "album" / "00009.png", photos / "00009.png")
    (root / "secret.txt").write_text("top secret")
    build_index(model, config, None, str(photos), str(root / "idx"), CPU, False)
    os.remove(photos / "album" / "00008.png")  # indexed, then replaced by a link to a file outside the folder
    shutil.copy(os.path.join(paths["image_root"], "test", "00008.png"), root / "outside.png")
    os.symlink(root / "outside.png", photos / "album" / "00008.png")
    searcher = Searcher(model, SearchIndex.load(str(root / "idx")), config, CPU)
    server, url = serve_in_thread(searcher)
    with open(paths["test_file"]) as f:
        captions = [rec["caption"][0] for rec in json.load(f)]
    yield {"url": url, "searcher": searcher, "captions": captions, "root": root, "port": server.server_address[1]}
    server.shutdown()
    server.server_close()


def get(served: dict, target: str, method: str = "GET", host: str | None = None) -> tuple[int, str, bytes]:
    """A raw request: `target` goes on the request line as written (no client-side normalisation); `host`: the
    Host header (default 127.0.0.1:PORT, as a browser sends it)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    try:
        conn.request(method, target, headers={} if host is None else {"Host": host})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def test_api_returns_the_searcher_results(served):
    caption = served["captions"][3]
    status, kind, body = get(served, "/api/search?q=" + quote(caption) + "&top=4&k=5")
    assert status == 200 and kind.startswith("application/json")
    data = json.loads(body)
    expected = served["searcher"].search_text(caption, top=4, rerank_k=5)
    assert data["mode"] == "rerank" and data["query"] == caption
    assert [r["path"] for r in data["results"]] == [h.path for h in expected.hits]
    assert [r["score"] for r in data["results"]] == pytest.approx([h.score for h in expected.hits], abs=1e-6)
    status, _, body = get(served, "/api/search?q=" + quote(caption) + "&mode=itc&top=3")
    itc = served["searcher"].search_text(caption, top=3, rerank=False)
    assert status == 200 and [r["path"] for r in json.loads(body)["results"]] == [h.path for h in itc.hits]
    assert all(r["itm"] is None for r in json.loads(body)["results"])
    status, _, body = get(served, "/api/info")
    assert status == 200 and json.loads(body)["images"] == 10


def test_page_and_images(served):
    status, kind, body = get(served, "/")
    assert status == 200 and kind.startswith("text/html") and b'id="results"' in body
    status, kind, body = get(served, "/thumb?path=album/00001.png")
    assert status == 200 and kind == "image/jpeg" and Image.open(io.BytesIO(body)).size == (64, 64)
    status, kind, body = get(served, "/image?path=00009.png")
    assert status == 200 and kind == "image/png"
    with open(os.path.join(served["searcher"].index.image_root, "00009.png"), "rb") as f:
        assert body == f.read()


@pytest.mark.parametrize(
    "target, message",
    [
        ("/api/search", "empty query"),
        ("/api/search?q=", "empty query"),
        ("/api/search?q=%20%20", "empty query"),
        ("/api/search?q=" + "a" * (MAX_QUERY_CHARS + 1), "query too long"),
        ("/api/search?q=red&top=abc", "top must be an integer"),
        ("/api/search?q=red&top=0", "top must be in"),
        ("/api/search?q=red&k=99999", "k must be in"),
        (f"/api/search?q=red&k={MAX_RERANK_K + 1}", f"k must be in [1, {MAX_RERANK_K}]"),
        ("/api/search?q=red&mode=fast", "mode must be"),
        ("/api/search?q=red&colour=blue", "unknown parameter"),
        ("/api/search?q=red&q=blue", "more than once"),
        ("/api/search?q=%ff%fe", "malformed query string"),
    ],
)
def test_bad_queries_get_a_clear_400(served, target, message):
    status, kind, body = get(served, target)
    assert status == 400 and kind.startswith("application/json")
    assert message in json.loads(body)["error"]


@pytest.mark.parametrize(
    "target",
    [
        "/image?path=../secret.txt",
        "/image?path=album/../../secret.txt",
        "/image?path=" + quote(os.path.abspath("/etc/passwd"), safe=""),
        "/image?path=%2e%2e%2fsecret.txt",
        "/image?path=%252e%252e%252fsecret.txt",
        "/image?path=..%5csecret.txt",
        "/thumb?path=album/00008.png",  # indexed, now a symlink pointing out of the folder
        "/image?path=album/00008.png",
        "/image?path=album",
        "/image?path=",
        "/image",
        "/../secret.txt",
        "/secret.txt",
    ],
)
def test_no_file_outside_the_index_is_served(served, target):
    status, _, body = get(served, target)
    assert status == 404, (target, status)
    assert b"top secret" not in body and not body.startswith(b"\x89PNG")


def test_post_is_refused(served):
    status, _, body = get(served, "/api/search?q=red", method="POST")
    assert status == 405 and "use GET" in json.loads(body)["error"]


def test_index_update_is_picked_up_while_serving(served, tmp_path):
    searcher = served["searcher"]
    before = searcher.index.manifest["generation"]
    assert not searcher.reload_if_changed()
    photos = searcher.index.image_root
    shutil.copy(os.path.join(photos, "00009.png"), os.path.join(photos, "copy.png"))
    try:
        build_index(searcher.model, searcher.config, None, photos, searcher.index.index_dir, CPU, False)
        status, _, body = get(served, "/api/search?q=red&top=200&mode=itc")
        assert status == 200 and "copy.png" in [r["path"] for r in json.loads(body)["results"]]
        assert searcher.index.manifest["generation"] == before + 1
    finally:
        os.remove(os.path.join(photos, "copy.png"))
        build_index(searcher.model, searcher.config, None, photos, searcher.index.index_dir, CPU, False)
        searcher.reload_if_changed()


# ----------------------------------------------------------------------------- hardening


@pytest.mark.parametrize(
    "host, status",
    [
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST", 200),
        ("[::1]:{port}", 200),
        ("localhost.:{port}", 200),
        ("evil.example:{port}", 403),  # a page on evil.example whose name now resolves to 127.0.0.1
        ("evil.example", 403),
        ("127.0.0.1.evil.example:{port}", 403),
        ("127.0.0.1:1{port}", 403),
        ("localhost:{port}@evil.example", 403),
        ("", 403),
    ],
)
def test_only_loopback_host_headers_are_answered(served, host, status):
    for target in ("/api/info", "/api/search?q=red&mode=itc", "/thumb?path=album/00001.png"):
        got, _, body = get(served, target, host=host.format(port=served["port"]))
        assert got == status, (host, target)
        if status == 403:
            assert "--allowed-host" in json.loads(body)["error"]


def test_allowed_hosts_are_configurable(served):
    assert allowed_host_names("0.0.0.0") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_host_names("::", ["Photos.LAN."]) == {"localhost", "127.0.0.1", "[::1]", "photos.lan"}
    assert "192.168.1.5" in allowed_host_names("192.168.1.5") and "[fe80::1]" in allowed_host_names("fe80::1")
    server, _ = serve_in_thread(served["searcher"], allowed_hosts=["photos.lan"])
    try:
        other = {**served, "port": server.server_address[1]}
        assert get(other, "/api/info", host=f"photos.lan:{other['port']}")[0] == 200
        assert get(other, "/api/info", host="photos.lan.evil.example")[0] == 403
    finally:
        server.shutdown()
        server.server_close()


def test_info_names_no_absolute_path(served, monkeypatch):
    checkpoint = str(served["root"] / "weights" / "model_best.pth")
    monkeypatch.setitem(served["searcher"].index.manifest["model"], "checkpoint", checkpoint)
    status, _, body = get(served, "/api/info")
    info = json.loads(body)
    assert status == 200 and info["folder"] == "photos" and info["checkpoint"] == "model_best.pth"
    assert str(served["root"]) not in body.decode() and "/" not in body.decode()


@contextlib.contextmanager
def _swapped(path: str, replace):
    """Put the file at `path` aside (same inode, same mtime), `replace(path)`, and put it back on exit."""
    aside = path + ".aside"
    os.rename(path, aside)
    try:
        replace(path)
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rename(aside, path)


@pytest.mark.parametrize("endpoint", ["/image", "/thumb"])
def test_a_replaced_file_is_not_served(served, endpoint):
    """A hard link to a file outside the folder (same path, realpath inside, other inode), a file copied over
    with its mtime kept, and an edited file are all refused with 409; the original is served again after."""
    photos = served["searcher"].index.image_root
    rel = "album/00005.png"
    path = os.path.join(photos, rel)
    secret = served["root"] / "secret.png"
    shutil.copy2(os.path.join(photos, "album/00004.png"), secret)
    original = os.stat(path)

    def hard_link(p):
        os.link(secret, p)

    def same_size_and_mtime(p):  # another file's bytes, padded to the same size, with the old mtime
        with open(secret, "rb") as src, open(p, "wb") as dst:
            dst.write(src.read()[: original.st_size].ljust(original.st_size, b"\0"))
        os.utime(p, ns=(original.st_atime_ns, original.st_mtime_ns))

    def edited(p):
        shutil.copy(path + ".aside", p)

    for replace in (hard_link, same_size_and_mtime, edited):
        with _swapped(path, replace):
            status, _, body = get(served, f"{endpoint}?path={rel}")
        assert status == 409 and "is not the file that was indexed" in json.loads(body)["error"], replace.__name__
    assert get(served, f"{endpoint}?path={rel}")[0] == 200


def test_thumbnails_decode_little_and_refuse_huge_images():
    with pytest.raises(TooLarge, match="225000000 pixels"):  # over PIL's own bomb limit
        make_thumbnail(io.BytesIO(bomb_png(15000, 15000)))
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="8000x8000"):  # under PIL's limit, over ours: refused before decoding
        make_thumbnail(io.BytesIO(bomb_png(8000, 8000)))
    assert time.perf_counter() - started < 1.0
    big_jpeg, big_png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (2400, 1600), (200, 30, 30)).save(big_jpeg, "JPEG")
    Image.new("RGB", (1200, 1000), (200, 30, 30)).save(big_png, "PNG")
    # 3.84 M pixels, but JPEG draft mode decodes it at 1/4 scale (600x400, the smallest at least 256 a side):
    # within a 300 k pixel budget
    thumb = Image.open(io.BytesIO(make_thumbnail(io.BytesIO(big_jpeg.getvalue()), max_pixels=300_000)))
    assert thumb.size == (256, 171)
    with pytest.raises(TooLarge):  # a PNG has no draft mode: 1.2 M pixels to decode
        make_thumbnail(io.BytesIO(big_png.getvalue()), max_pixels=300_000)


def test_thumbnail_decodes_are_bounded_and_cached():
    files = []
    for i in range(8):
        buffer = io.BytesIO()
        Image.new("RGB", (900, 900), (i * 30, 100, 200 - i * 20)).save(buffer, "PNG")
        files.append(buffer.getvalue())
    thumbs = Thumbnails(max_bytes=10**7, max_decodes=2)
    start = threading.Barrier(8)

    def fetch(i: int) -> None:
        start.wait()
        thumbs.get((f"{i}.png", 0, 0, i), io.BytesIO(files[i]))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert thumbs.decodes == 8 and 1 <= thumbs.peak_active <= 2 and thumbs.active == 0
    for i in range(8):  # all cached: no decode, the file is not even read
        thumbs.get((f"{i}.png", 0, 0, i), io.BytesIO(b""))
    assert thumbs.decodes == 8
    small = Thumbnails(max_bytes=2 * len(thumbs.cache[("0.png", 0, 0, 0)]) + 10)
    for i in range(8):
        small.get((f"{i}.png", 0, 0, i), io.BytesIO(files[i]))
    assert len(small.cache) == 2 and small.bytes <= small.max_bytes and ("7.png", 0, 0, 7) in small.cache


def test_thumbnail_over_the_pixel_cap_gets_422(served):
    server, _ = serve_in_thread(served["searcher"])
    try:
        server.thumbnails.max_pixels = 64 * 64 - 1
        other = {**served, "port": server.server_address[1]}
        status, _, body = get(other, "/thumb?path=album/00002.png")
        assert status == 422 and "too large for a thumbnail: 64x64 pixels" in json.loads(body)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_idle_connections_are_closed(served):
    server, _ = serve_in_thread(served["searcher"], request_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as idle:
            started = time.perf_counter()
            idle.sendall(b"GET /api/info HTTP/1.1\r\n")  # and then nothing: the headers never end
            assert idle.recv(1024) == b""  # closed by the server, not by our 10 s timeout
            assert time.perf_counter() - started < 5
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- a real browser


def test_browser_types_a_query_sees_results_and_toggles(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium (apt-get install chromium)")
    caption = served["captions"][2]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(served["url"] + "/")
            page.fill("#q", caption)
            page.press("#q", "Enter")
            page.wait_for_selector("#results[data-mode=rerank] figure")
            reranked = page.eval_on_selector_all("#results figure img", "els => els.map(e => e.alt)")
            expected = served["searcher"].search_text(caption, top=24)
            assert reranked == [h.path for h in expected.hits]
            assert "re-ranked by ITM" in page.inner_text("#status")
            assert "= itm" in page.inner_text("#results figure figcaption")
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "reranked.png"), full_page=True)
            page.uncheck("#rerank")  # the toggle re-runs the query ITC-only
            page.wait_for_selector("#results[data-mode=itc] figure")
            itc = page.eval_on_selector_all("#results figure img", "els => els.map(e => e.alt)")
            assert itc == [h.path for h in served["searcher"].search_text(caption, top=24, rerank=False).hits]
            assert itc != reranked
            assert "ITC only" in page.inner_text("#status")
            page.fill("#q", "   ")
            page.press("#q", "Enter")
            page.wait_for_selector("#status.error")
            assert "empty query" in page.inner_text("#status")
            assert page.query_selector_all("#results figure") == []
        finally:
            browser.close()
    shot = os.environ.get("SEARCH_SCREENSHOT")  # keep the screenshot to look at it
    if shot:
        shutil.copy(tmp_path / "reranked.png", shot)
