"""End to end in headless Chromium: the page searches, shows thumbnails and draws each word's region.

Uses Debian's ``chromium`` driven by Playwright; the set-up installs either if missing (never ``playwright install``,
which downloads its own browser build) and skips with the reason when no browser can be had.
Screenshots go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfalign.index.gallery import Gallery
from selfalign.serve import serve_in_thread
from selfalign.serve.app import create_app

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TOKEN = "browser-token"


def _install_chromium() -> str:
    """apt-get install chromium (after an apt-get update if the first try fails); '' or why it failed."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "apt-get is not available to this (non-root) user"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode == 0:
            return ""
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "apt-get timed out"
    return "" if done.returncode == 0 else f"apt-get install chromium failed: {done.stderr[-300:]}"


def _playwright():
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], capture_output=True, timeout=600)
        importlib.invalidate_caches()
        try:
            return importlib.import_module("playwright.sync_api")
        except ImportError:
            return None


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        why = _install_chromium()
        if not CHROMIUM.exists():
            pytest.skip(f"no browser: {CHROMIUM} is missing and could not be installed ({why})")
    sync_api = _playwright()
    if sync_api is None:
        pytest.skip("no browser driver: the playwright package is missing and 'pip install playwright' failed")
    with sync_api.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        except Exception as exc:  # noqa: BLE001 - Playwright wraps launch failures in its own Error
            pytest.skip(f"Chromium at {CHROMIUM} would not start: {str(exc)[:300]}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(tiny_gallery):
    server, port = serve_in_thread(create_app(Gallery.load(tiny_gallery, load_extractor=True), token=TOKEN))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    server.thread.join(10)


def _wait(page, expression: str, timeout: float = 15.0) -> None:
    """Poll a JS expression until true. (Playwright's wait_for_function evals its predicate, which the page's
    Content-Security-Policy forbids; the test keeps that policy on rather than bypass it.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {expression}")
        page.wait_for_timeout(50)


def _open(browser, url: str, **context):
    page = browser.new_context(**context).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url)
    _wait(page, "document.getElementById('status').textContent.includes('8 images')")
    return page, errors


def _search(page, query: str) -> None:
    page.fill("#q", query)
    page.press("#q", "Enter")
    _wait(page, "[...document.querySelectorAll('#results .result img')].filter("
                "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0).length === 8")


def test_search_and_explain_in_the_browser(browser, base_url, tiny_gallery):
    ARTIFACTS.mkdir(exist_ok=True)
    page, errors = _open(browser, f"{base_url}/#token={TOKEN}", viewport={"width": 1200, "height": 800})
    assert "token=" not in page.url  # the token left the address bar
    query = "a red circle and a blue square"
    _search(page, query)
    scores = [float(s) for s in page.locator("#results .score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)
    assert query in page.text_content("#status")
    page.screenshot(path=str(ARTIFACTS / "serve_results.png"))

    page.click("#results .result >> nth=0")
    page.wait_for_selector("#boxes rect", state="attached", timeout=15000)
    _wait(page, "document.getElementById('explain-img').naturalWidth > 0")
    legend = page.locator("#legend li span:nth-child(2)").all_text_contents()
    assert legend == query.split()
    labels = page.locator("#labels .label").all_text_contents()
    assert labels and set(" · ".join(labels).split(" · ")) == set(query.split())
    box = page.locator("#boxes rect >> nth=0").bounding_box()
    stage = page.locator(".stage").bounding_box()
    assert box["width"] > 1 and stage["x"] <= box["x"] and box["x"] + box["width"] <= stage["x"] + stage["width"] + 1
    page.screenshot(path=str(ARTIFACTS / "serve_explain.png"))
    page.keyboard.press("Escape")
    assert page.locator("#explain").is_hidden()

    # image -> captions through the upload control
    page.select_option("#target", "captions")
    page.set_input_files("#file", str(Gallery.load(tiny_gallery).image_path(0)))
    _wait(page, "document.querySelectorAll('#captions li').length === 24")
    assert not errors, errors


def test_phone_layout_and_missing_token(browser, base_url):
    page, errors = _open(browser, f"{base_url}/#token={TOKEN}", viewport={"width": 390, "height": 844},
                         device_scale_factor=2, is_mobile=True, has_touch=True)
    _search(page, "two green stars")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    columns = page.evaluate(
        "getComputedStyle(document.getElementById('results')).gridTemplateColumns.split(' ').length")
    assert 2 <= columns <= 4
    page.click("#results .result >> nth=1")
    page.wait_for_selector("#boxes rect", state="attached", timeout=15000)
    page.screenshot(path=str(ARTIFACTS / "serve_phone.png"))
    assert not errors, errors

    anonymous = browser.new_context().new_page()
    anonymous.goto(base_url)
    _wait(anonymous, "document.getElementById('status').classList.contains('error')")
    assert "token" in anonymous.text_content("#status")
    assert anonymous.locator("#token-box").get_attribute("open") is not None


def test_api_docs_render_offline(browser, base_url):
    """Swagger UI at /docs comes from this server (no network here): the operations must render."""
    page = browser.new_context().new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(f"{base_url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15000)
    paths = set(page.locator(".opblock-summary-path").all_text_contents())
    assert {"/api/search", "/api/explain", "/health"} <= {p.replace("\u200b", "") for p in paths}
    page.screenshot(path=str(ARTIFACTS / "serve_docs.png"), full_page=False)
    assert not failed, failed
