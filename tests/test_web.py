"""The chat page of `edgemm serve`, driven in a real headless Chromium (Debian's package) through playwright."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import requires_demo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install playwright; it drives the system Chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("fastapi") is None, reason="needs the serve extra"),
    requires_demo]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
SHOT = Path(os.environ.get("EDGEMM_SCREENSHOT_DIR", "/tmp")) / "edgemm-chat-page.png"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _ask(page, q):
    n = page.locator(".msg.assistant, .msg.error").count()
    page.fill("#question", q)
    page.press("#question", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant .stats, .msg.error').length > {n}",
                           timeout=60000)
    return page.locator(".msg.assistant, .msg.error").nth(n)


def test_page_answers_like_edgemm_run_two_turns_and_shows_errors(browser):
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    from tests.test_serve import Server
    b = load_backend("torch", model="tiny-shapes", device="cpu")
    s = ChatSession(b, GenerationConfig(max_new_tokens=64))
    s.set_image(str(EXAMPLE))
    want1, want2 = s.ask("What color is the circle?"), s.ask("How many shapes are there?")
    srv = Server("--parallel", "2", key="k3y")
    try:
        page = browser.new_page(viewport={"width": 390, "height": 800})        # phone width
        page.goto(srv.url + "/")
        page.fill("#apikey", "k3y")
        page.dispatch_event("#apikey", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=30000)
        assert page.locator("#model option").first.get_attribute("value") == "tiny-shapes"
        page.set_input_files("#file", str(EXAMPLE))
        page.wait_for_function("document.getElementById('preview').style.display === 'block'", timeout=10000)
        # the browser resized the upload to the model's image size before it crossed the network
        size = page.evaluate("(() => { const i = document.getElementById('preview'); return [i.naturalWidth, i.naturalHeight]; })()")
        assert max(size) <= b.cfg.vision.image_size
        a1 = _ask(page, "What color is the circle?")
        assert a1.locator(".text").inner_text() == want1 and "tok/s" in a1.locator(".stats").inner_text()
        a2 = _ask(page, "How many shapes are there?")
        assert a2.locator(".text").inner_text() == want2
        err = _ask(page, "why " * 3000)                                       # over the context
        assert "error" in err.get_attribute("class") and "context" in err.inner_text()
        page.click("#new")
        assert page.locator(".msg").count() == 0
    finally:
        srv.stop()


def test_screenshot_mid_answer(browser, random_ckpt):
    """A random-weight model talks until max tokens: the page is caught while the answer streams in."""
    from tests.test_serve import Server
    srv = Server("--model", str(random_ckpt), "--max-tokens", "512")
    try:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=30000)
        page.fill("#max_tokens", "400")
        page.set_input_files("#file", str(EXAMPLE))
        page.wait_for_function("document.getElementById('preview').style.display === 'block'", timeout=10000)
        page.fill("#question", "What color is the circle?")
        page.press("#question", "Enter")
        page.wait_for_function("(() => { const t = document.querySelector('.msg.assistant .text');"
                               " return t && t.textContent.length > 40; })()", timeout=60000)
        streaming = page.locator(".msg.assistant .stats").count() == 0
        page.screenshot(path=str(SHOT))
        assert streaming and SHOT.stat().st_size > 10_000
        page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length > 0", timeout=60000)
    finally:
        srv.stop()
