"""The page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the real server, twice: with the shipped models, and with a tiny random Wan pipeline folder
and causal checkpoint (``serve --model tiny-wan=DIR:WEIGHTS``, scripts/make_tiny_wan_pipeline.py:
32x48 pixel frames decoded by each stream's own VAE caches, 16 frames/s). ``make test-browser``;
excluded from ``make test``.

Starts a stream with the few-step model, checks that the canvas changes over time, switches the
prompt while it plays, stops, and saves a screenshot to docs/serve.png (the shipped models' run).
The page is the same for both.
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


ROOT = Path(__file__).resolve().parents[2]
# per server: (models given to create_app or None for the shipped ones, the options the page lists,
# the model picked, its steps and guidance, a prompt and the prompt switched to)
SERVERS = {
    "shipped": (None, ["digits (20 steps)", "digits-fast (4-step)"], "digits-fast", "4", "1",
                "a 3 moving down and right", "a 7 moving left"),
    "tiny-wan": ("tiny-wan", ["tiny-wan (4-step)"], "tiny-wan", "4", "1",
                 "a red cat runs on the beach", "a blue boat in the snow"),
}


def _tiny_wan(root: Path) -> dict:
    """{"tiny-wan": "DIR:WEIGHTS"}: the tiny pipeline and its causal weights, as `serve --model` takes them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "scripts" / "make_tiny_wan_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(root / "pipe", weights=root / "causal.pt")
    return {"tiny-wan": f"{root / 'pipe'}:{root / 'causal.pt'}"}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory):
    from ca2vdm.serve.app import create_app, run_in_thread

    models = _tiny_wan(tmp_path_factory.mktemp("tiny-wan")) if SERVERS[request.param][0] else None
    srv, url = run_in_thread(create_app(models, max_sessions=2, threads=1))
    yield url, request.param
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
    server, which = server
    _, options, name, steps, guidance, prompt, switched = SERVERS[which]
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'connected'", timeout=30_000)
    assert page.locator("#model option").all_text_contents() == options
    page.select_option("#model", name)
    assert page.input_value("#steps") == steps and page.input_value("#guidance") == guidance
    page.fill("#prompt", prompt)
    page.click("#start")
    page.wait_for_function("window.ca2vdm.framesShown >= 4", timeout=120_000)
    first = _canvas(page)
    assert sum(first) > 0, "the canvas stayed black"
    page.wait_for_function("window.ca2vdm.framesShown >= 12", timeout=120_000)
    assert _canvas(page) != first, "the canvas did not change while the stream played"
    assert _status(server)["sessions"] == 1

    page.fill("#prompt", switched)
    page.click("#switch")
    page.wait_for_function("window.ca2vdm.revisionSeen === 1", timeout=120_000)
    shown = page.evaluate("window.ca2vdm.framesShown")
    page.wait_for_function(f"window.ca2vdm.framesShown >= {shown + 24}", timeout=120_000)
    readout = page.inner_text("#readout")
    assert "frames/s" in readout and page.inner_text("#latency").endswith("ms"), readout
    assert float(page.inner_text("#fps-in")) > 0
    if which == "shipped":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    else:  # the frame size and rate the page was told are the pipeline's pixels and Wan's 16 frames/s
        with urllib.request.urlopen(server + "/api/models", timeout=10) as r:
            (described,) = json.loads(r.read())["models"]
        assert described["frame_size"] == [32, 48] and described["fps"] == 16

    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=30_000)
    deadline = time.monotonic() + 5
    while _status(server)["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(server)["sessions"] == 0
    assert page.is_enabled("#start") and not page.is_enabled("#stop")
    assert not errors, errors
