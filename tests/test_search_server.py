"""Tests for the search web server (engine/search_server.py): the JSON API against the Searcher, 4xx for bad
queries, path traversal refused, and the page driven in a real headless Chromium (Debian's `chromium`, which
`make test` installs when missing) through Playwright.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
from urllib.parse import quote

import pytest
import torch
from PIL import Image

from data.synthetic import make_synthetic_dataset
from engine.search_index import SearchIndex, build_index
from engine.search_query import Searcher
from engine.search_server import MAX_QUERY_CHARS, serve_in_thread
from models.blip_retrieval import build_model
from tests.helpers import spread_weights, synthetic_config

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


def get(served: dict, target: str, method: str = "GET") -> tuple[int, str, bytes]:
    """A raw request: `target` goes on the request line as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=60)
    try:
        conn.request(method, target)
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
