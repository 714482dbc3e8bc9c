"""The search service: a FastAPI app over one opened :class:`~selfalign.index.gallery.Gallery`.

Endpoints are plain (sync) functions, so FastAPI runs them in its thread pool and queries are answered
concurrently; the gallery's inference is read-only (``torch.inference_mode``) and needs no lock.
Errors reach clients as ``{"error": message}``: 4xx for bad input, and a generic 500 without any detail.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import mimetypes
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfalign.errors import SelfAlignError
from selfalign.index.gallery import Gallery
from selfalign.serve.images import MAX_UPLOAD_BYTES, BadImage, ThumbnailCache, decode_upload

STATIC = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 300
MAX_K = 100
DOCS_ASSETS = "/docs-assets"  # Swagger UI 5 (reads OpenAPI 3.1), served from the fastapi-offline package's files
OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/static/")  # no token needed (no gallery data in them)
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


class BodyTooLarge(Exception):
    """A request body passed the upload limit while it was being received."""


class Guard:
    """ASGI middleware: bearer-token check, request-size limit (declared or streamed) and security headers."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and path != "/" and not path.startswith(OPEN_PATHS):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                await _send_json(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                 [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, f"request too large (at most {self.max_body} bytes)")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge()
            return message

        async def secured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if path == "/" or path.startswith("/static/"):
                    extra += [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, limited_receive, secured_send)


async def _send_json(send: Send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(gallery: Gallery, token: str | None = None, max_upload: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The app for ``gallery``; with ``token``, every route but ``/health``, the page and the docs needs it."""
    # docs_url=None: FastAPI's own /docs loads Swagger UI from a CDN, a blank page offline; ours serves the copy
    # that ships in the fastapi-offline package (swagger-ui-bundle's 4.x cannot read FastAPI's OpenAPI 3.1).
    app = FastAPI(title="selfalign search", version="1", summary="Text and image search over a selfalign gallery",
                  docs_url=None, redoc_url=None)
    thumbs = ThumbnailCache()

    @app.exception_handler(SelfAlignError)
    async def _user_error(request: Request, exc: SelfAlignError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(BadImage)
    async def _bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, f"request too large (at most {max_upload} bytes)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so the trace reaches the server log and never the client
        return _error(500, "internal server error")

    def _record(image_id: int) -> dict[str, Any]:
        try:
            return gallery.record(image_id)
        except SelfAlignError:
            raise HTTPException(404, f"no image with id {image_id}") from None

    def _image_hit(hit: dict[str, Any]) -> dict[str, Any]:
        return {**hit, "image": f"/api/images/{hit['id']}", "thumbnail": f"/api/thumbnails/{hit['id']}"}

    Q = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="the text query")
    K = Query(10, ge=1, le=MAX_K, description="number of results")

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness: the gallery is loaded."""
        return {"status": "ok", "images": len(gallery), "captions": len(gallery.captions)}

    @app.get("/api/info", tags=["service"])
    def info() -> dict[str, Any]:
        """What the gallery holds (counts, whether image -> caption search is possible)."""
        m = gallery.manifest
        return {"images": len(gallery), "captions": len(gallery.captions), "has_captions": gallery.has_captions,
                "backend": m["backend"], "updated": m.get("updated"), "querybank": m.get("querybank"), "max_k": MAX_K,
                "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": max_upload}

    @app.get("/api/search", tags=["search"])
    def search(q: str = Q, k: int = K) -> dict[str, Any]:
        """Text -> images, best first, with scores (dot products of the retrieval embeddings, minus each image's
        query-bank discount when the gallery was built with one: see ``querybank`` in /api/info)."""
        return {"query": q, "results": [_image_hit(h) for h in gallery.search_text(q, k)]}

    @app.post("/api/search/image", tags=["search"])
    def search_image(file: UploadFile = File(..., description="the query image"), k: int = Form(10, ge=1, le=MAX_K),
                     target: Literal["images", "captions"] = Form("images")) -> dict[str, Any]:
        """Image -> images (``target=images``) or captions (``target=captions``)."""
        if target == "captions" and not gallery.has_captions:
            raise HTTPException(409, "this gallery has no captions (it was built from a plain image folder), so "
                                     "image -> text search is not available")
        data = file.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise BadImage(413, f"the upload is larger than {max_upload} bytes")
        hits = gallery.search_image(decode_upload(data), k, target)
        return {"target": target, "results": [_image_hit(h) for h in hits] if target == "images" else hits}

    @app.get("/api/explain", tags=["search"])
    def explain(q: str = Q, id: int = Query(..., ge=0, description="a gallery image id")) -> dict[str, Any]:
        """For each word of the query, the image region it aligns with best: ``box`` (normalised x1,y1,x2,y2)
        and ``score`` (cosine of the word's and the region's context-free local features)."""
        _record(id)
        return {**gallery.explain(q, id), "image": f"/api/images/{id}"}

    @app.get("/api/images/{image_id}", tags=["images"], response_class=Response)
    def image(image_id: int = PathParam(..., ge=0)) -> Response:
        """The original image file of a gallery id."""
        path = Path(_record(image_id)["path"])
        if not path.is_file():
            raise HTTPException(404, f"the file of image {image_id} is no longer available")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/thumbnails/{image_id}", tags=["images"], response_class=Response)
    def thumbnail(image_id: int = PathParam(..., ge=0)) -> Response:
        """A JPEG thumbnail (at most 320 px a side) of a gallery id."""
        path = Path(_record(image_id)["path"])
        try:
            data = thumbs.get(image_id, path)
        except (OSError, SyntaxError, ValueError):
            raise HTTPException(404, f"the file of image {image_id} is missing or unreadable") from None
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="selfalign search: API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    swagger_files = importlib.resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_files)), name="docs-assets")
    # inside Starlette's error middleware, so a BodyTooLarge raised mid-upload reaches the handler above
    app.add_middleware(Guard, token=token or None, max_body=max_upload + 64 * 1024)  # room for the form fields
    return app
