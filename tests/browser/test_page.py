"""The page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the real server with the shipped models. ``make test-browser``; excluded from ``make test``.

Starts a stream with the few-step model, checks that the canvas changes over time, switches the
prompt while it plays, stops, and saves a screenshot to docs/serve.png.
"""

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CA2VDM_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve.png"


@pytest.fixture(scope="module")
def server():
    from ca2vdm.serve.app import create_app, run_in_thread

    srv, url = run_in_thread(create_app(max_sessions=2, threads=1))
    yield url
    srv.should_exit = True
    srv.thread.join(timeout=30)


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CA2VDM_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        yield page
        browser.close()


def _status(url):
    with urllib.request.urlopen(url + "/api/status", timeout=10) as r:
        return json.loads(r.read())


def _canvas(page) -> list[int]:
    """A coarse fingerprint of the canvas: the sum of each 48x48 block's red, green and blue."""
    return page.evaluate("""() => {
        const c = document.getElementById('screen'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const out = [];
        for (let by = 0; by < c.height; by += 48) for (let bx = 0; bx < c.width; bx += 48) {
            let s = 0;
            for (let y = by; y < by + 48; y++) for (let x = bx; x < bx + 48; x++) {
                const i = 4 * (y * c.width + x); s += d[i] + d[i + 1] + d[i + 2];
            }
            out.push(s);
        }
        return out;
    }""")


def test_page_streams_switches_prompt_and_stops(server, page):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=30_000)
    assert page.locator("#model option").all_text_contents() == ["digits (20 steps)", "digits-fast (4-step)"]
    page.select_option("#model", "digits-fast")
    assert page.input_value("#steps") == "4" and page.input_value("#guidance") == "1"
    page.fill("#prompt", "a 3 moving down and right")
    page.click("#start")
    page.wait_for_function("window.ca2vdm.framesShown >= 4", timeout=120_000)
    first = _canvas(page)
    assert sum(first) > 0, "the canvas stayed black"
    page.wait_for_function("window.ca2vdm.framesShown >= 12", timeout=120_000)
    assert _canvas(page) != first, "the canvas did not change while the stream played"
    assert _status(server)["sessions"] == 1

    page.fill("#prompt", "a 7 moving left")
    page.click("#switch")
    page.wait_for_function("window.ca2vdm.revisionSeen === 1", timeout=120_000)
    shown = page.evaluate("window.ca2vdm.framesShown")
    page.wait_for_function(f"window.ca2vdm.framesShown >= {shown + 24}", timeout=120_000)
    readout = page.inner_text("#readout")
    assert "frames/s" in readout and page.inner_text("#latency").endswith("ms"), readout
    assert float(page.inner_text("#fps-in")) > 0
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=30_000)
    deadline = time.monotonic() + 5
    while _status(server)["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(server)["sessions"] == 0
    assert page.is_enabled("#start") and not page.is_enabled("#stop")
    assert not errors, errors
