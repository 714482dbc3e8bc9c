"""The search API with FastAPI's TestClient: every endpoint, the token, and every kind of bad input."""

from __future__ import annotations

import io
import re
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from selfalign.index.gallery import Gallery
from selfalign.index.gallery_build import build_gallery
from selfalign.serve import serve_in_thread
from selfalign.serve.app import MAX_K, MAX_QUERY_CHARS, create_app
from selfalign.serve.cli import is_loopback
from selfalign.serve.images import BadImage, decode_upload

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gallery(tiny_gallery) -> Gallery:
    return Gallery.load(tiny_gallery, load_extractor=True)


@pytest.fixture(scope="module")
def client(gallery) -> TestClient:
    return TestClient(create_app(gallery, token=TOKEN, max_upload=200_000), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def png(gallery) -> bytes:
    return gallery.image_path(1).read_bytes()


def _upload(client: TestClient, data: bytes, **form: str) -> httpx.Response:
    return client.post("/api/search/image", files={"file": ("q.png", data, "image/png")}, data=form, headers=AUTH)


def test_health_page_and_docs_need_no_token(client):
    assert client.get("/health").json() == {"status": "ok", "images": 8, "captions": 40}
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower()  # Swagger UI must load offline: its files come from this server
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', docs):
        assert client.get(asset).status_code == 200, asset
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/explain", "/api/images/{image_id}",
            "/api/thumbnails/{image_id}", "/health"} <= set(paths)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_api_needs_the_token(client, headers):
    for path in ("/api/search?q=red", "/api/info", "/api/images/0", "/api/thumbnails/0", "/api/explain?q=red&id=0"):
        response = client.get(path, headers=headers)
        assert response.status_code == 401 and "token" in response.json()["error"], path
    assert client.post("/api/search/image", headers=headers).status_code == 401


def test_text_search(client, gallery):
    response = client.get("/api/search", params={"q": "a blue square", "k": 5}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    expected = gallery.search_text("a blue square", 5)
    assert [r["id"] for r in body["results"]] == [h["id"] for h in expected]
    first = body["results"][0]
    assert first["thumbnail"] == f"/api/thumbnails/{first['id']}" and first["image"] == f"/api/images/{first['id']}"
    assert all("path" not in r for r in body["results"])  # ids only, never file paths


def test_image_search_images_and_captions(client, png):
    images = _upload(client, png, k="3")
    assert images.status_code == 200 and len(images.json()["results"]) == 3
    captions = _upload(client, png, k="4", target="captions")
    body = captions.json()
    assert body["target"] == "captions" and len(body["results"]) == 4 and body["results"][0]["text"]
    assert _upload(client, png, target="words").status_code == 422


def test_images_thumbnails_explain(client, gallery):
    full = client.get("/api/images/2", headers=AUTH)
    assert full.status_code == 200 and full.content == gallery.image_path(2).read_bytes()
    assert full.headers["content-type"] == "image/png" and full.headers["x-content-type-options"] == "nosniff"
    thumb = client.get("/api/thumbnails/2", headers=AUTH)
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    explain = client.get("/api/explain", params={"q": "two green stars", "id": 2}, headers=AUTH).json()
    assert [w["word"] for w in explain["words"]] == ["two", "green", "stars"]
    assert all(len(w["box"]) == 4 and 0 <= min(w["box"]) <= max(w["box"]) <= 1 for w in explain["words"])
    assert explain == {**gallery.explain("two green stars", 2), "image": "/api/images/2"}


@pytest.mark.parametrize("path, status, message", [
    ("/api/search?q=" + "x" * (MAX_QUERY_CHARS + 1), 422, "at most 300 characters"),
    ("/api/search?q=", 422, "q:"),
    ("/api/search?q=%20%20", 400, "empty"),
    ("/api/search", 422, "q: Field required"),
    (f"/api/search?q=red&k={MAX_K + 1}", 422, "k:"),
    ("/api/search?q=red&k=0", 422, "k:"),
    ("/api/search?q=red&k=ten", 422, "k:"),
    ("/api/explain?q=red&id=99", 404, "no image with id 99"),
    ("/api/explain?q=red&id=-1", 422, "id:"),
    ("/api/images/99", 404, "no image with id 99"),
    ("/api/images/..%2F..%2Fetc%2Fpasswd", 404, "Not Found"),  # no route takes a path: nothing to traverse
    ("/api/images/%2Fetc%2Fpasswd", 404, "Not Found"),
    ("/api/images/1.5", 422, "image_id"),
    ("/api/thumbnails/abc", 422, "image_id"),
    ("/api/nothing", 404, "Not Found"),
])
def test_bad_requests_get_clear_4xx(client, path, status, message):
    response = client.get(path, headers=AUTH)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_bad_uploads(client, png):
    cases = [
        (b"", 400, "empty"),
        (b"just some text, not an image", 415, "not an image"),
        (png[: len(png) // 2], 400, "truncated or corrupt"),
        (png + b"\0" * 200_000, 413, "larger than"),
    ]
    for data, status, message in cases:
        response = _upload(client, data)
        assert response.status_code == status and message in response.json()["error"], (status, response.text)
    missing = client.post("/api/search/image", data={"k": "3"}, headers=AUTH)
    assert missing.status_code == 422 and "file" in missing.json()["error"]
    declared = client.post("/api/search/image", content=b"x" * 10, headers={
        **AUTH, "content-type": "multipart/form-data; boundary=b", "content-length": str(10 << 20)})
    assert declared.status_code == 413


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(client):
    response = _upload(client, _png_header_only(30_000, 30_000))
    assert response.status_code == 413 and "image too large" in response.json()["error"]
    real = io.BytesIO()
    Image.new("1", (4000, 3000)).save(real, "PNG")  # 12 MP that compress to a few KB
    with pytest.raises(BadImage, match="too large") as exc:
        decode_upload(real.getvalue(), max_pixels=10_000_000)
    assert exc.value.status == 413


def test_no_stack_trace_reaches_the_client(gallery, monkeypatch):
    app = create_app(gallery)
    client = TestClient(app, raise_server_exceptions=False)

    def boom(*args, **kwargs):
        raise RuntimeError("secret detail at /home/someone/file.py")

    monkeypatch.setattr(gallery, "search_text", boom)
    response = client.get("/api/search", params={"q": "red"})
    assert response.status_code == 500 and response.json() == {"error": "internal server error"}
    assert "secret" not in response.text and "Traceback" not in response.text


def test_gallery_without_captions(tiny_scenes_run, gallery, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(gallery.image_path(0), folder)
    shutil.copy(gallery.image_path(1), folder)
    build_gallery(tiny_scenes_run["run_dir"], tmp_path / "g", folder, progress=False)
    client = TestClient(create_app(Gallery.load(tmp_path / "g")))
    response = _upload(client, gallery.image_path(0).read_bytes(), target="captions")
    assert response.status_code == 409 and "no captions" in response.json()["error"]
    info = client.get("/api/info").json()
    assert info["has_captions"] is False and info["querybank"] is None
    # the image file vanished after indexing: a 404, not a crash
    (folder / gallery.image_path(1).name).unlink()
    assert client.get("/api/images/1").status_code == 404
    assert client.get("/api/thumbnails/1").status_code == 404


def test_concurrent_queries_over_a_real_server(gallery):
    server, port = serve_in_thread(create_app(gallery, token=TOKEN))
    queries = ["a red circle", "two blue squares", "a green star above a ring", "a yellow triangle"] * 6
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as http:
            expected = {q: http.get("/api/search", params={"q": q, "k": 4}).json() for q in set(queries)}
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda q: http.get("/api/search", params={"q": q, "k": 4}).json(), queries))
            assert got == [expected[q] for q in queries]
            assert http.get("/health").status_code == 200
    finally:
        server.should_exit = True
        server.thread.join(10)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
