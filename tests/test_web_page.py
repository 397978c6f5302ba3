"""The web page at /ui/, in a real browser (Debian's Chromium through Selenium, offline) against the real server:
it loads with no console errors and asks only this server, shows labels for a real photo, the attention map, the
MAE's reconstruction with a mask the user clicks and drags, the embedding similarity matrix, the error envelope's
message for an oversized file or a file that is no image (never interpreting a file name as HTML), and works with
an API key kept in the page only. Screenshots go to test-artefacts/web-page/ (VITSERVE_TEST_ARTEFACTS to change);
VITSERVE_PAGE_REPO=models runs it against another repository (the README's screenshots: the demo models)."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from matplotlib.cbook import get_sample_data
from PIL import Image, ImageDraw
from browser_logs import requested_urls
from serving_harness import API_KEY, Server

from service.web_page import FILES, PAGE_URL

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("VITSERVE_TEST_ARTEFACTS", ROOT / "test-artefacts")) / "web-page"
MAX_BODY_BYTES = 1_000_000  # the server's limit in these tests; the oversized upload is ~3 MB
WAIT_S = 30
XSS_NAME = "<img src=x onerror=document.title='owned'>.png"  # a file name that is markup: shown as text, or it runs


@pytest.fixture(scope="module")
def repo(serving_repo) -> Path:
    return Path(os.environ["VITSERVE_PAGE_REPO"]) if os.environ.get("VITSERVE_PAGE_REPO") else serving_repo


@pytest.fixture(scope="module")
def server(repo):
    srv = Server(repo, max_body_bytes=str(MAX_BODY_BYTES))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(repo):
    srv = Server(repo, api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """A real photo (matplotlib's grace_hopper.jpg, 512x600), two drawings of the demo's shapes, a ~3 MB PNG of noise
    (over the server's body limit), and a text file whose name is HTML."""
    folder = tmp_path_factory.mktemp("uploads")
    with get_sample_data("grace_hopper.jpg") as photo:
        (folder / "grace_hopper.jpg").write_bytes(photo.read())
    disc = Image.new("RGB", (320, 240), (30, 60, 140))
    ImageDraw.Draw(disc).ellipse((100, 60, 220, 180), fill=(250, 210, 40))
    disc.save(folder / "circle.png")
    square = Image.new("RGB", (240, 240), (40, 120, 60))
    ImageDraw.Draw(square).rectangle((70, 70, 170, 170), fill=(230, 230, 230))
    square.save(folder / "square.png")
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "huge.png")
    (folder / XSS_NAME).write_text("hello, I am text, not an image")
    return {path.name: path for path in folder.iterdir()}


def screenshot(element, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    element.screenshot(str(ARTEFACTS / name))


# --- driving the page --------------------------------------------------------------------------------------------

def wait(driver, condition, timeout: float = WAIT_S):
    """Until `condition` holds. The page re-renders lists (options, results) as answers arrive: an element found a
    moment ago may be gone when read, so such a poll just looks again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(lambda d: condition(d))


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver, url: str, models_needed: bool = True) -> None:
    driver.get(url)
    if models_needed:
        wait(driver, lambda d: find(d, "#tab-classify select option").get_attribute("value"))


def choose(driver, *paths: Path) -> None:
    find(driver, "#file-input").send_keys("\n".join(str(p) for p in paths))
    wait(driver, lambda d: len(find_all(d, "#thumbnails li")) >= len(paths))


def run_tab(driver, tab: str) -> None:
    find(driver, f"[role=tab][data-tab={tab}]").click()
    find(driver, f"#tab-{tab} button[type=submit]").click()


def error_text(driver) -> str:
    wait(driver, lambda d: find(d, "#error").is_displayed())
    return find(driver, "#error-message").text


def console_problems(driver) -> list[dict]:
    """Console messages other than the network's own line about a refused request (a 4xx the test provoked)."""
    return [entry for entry in driver.get_log("browser") if entry.get("source") != "network"]


def labels_of(server) -> set[str]:
    return {label for model in httpx.get(f"{server.url}/models").json()["models"] if model["task"] == "classify"
            for label in model["labels"]}


# --- the tests ---------------------------------------------------------------------------------------------------

def test_the_page_is_served_from_the_package_and_loads_offline_with_no_console_errors(browser, server):
    for path in ("/", "/ui"):
        redirect = httpx.get(server.url + path)
        assert redirect.status_code == 307 and httpx.URL(server.url + path).join(redirect.headers["location"]).path == PAGE_URL
    for name in FILES:
        answer = httpx.get(f"{server.url}{PAGE_URL}{'' if name == 'index.html' else name}")
        assert answer.status_code == 200 and answer.headers["content-type"] == FILES[name]
        assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert httpx.get(f"{server.url}{PAGE_URL}secrets.txt").status_code == 404

    open_page(browser, server.url + "/")  # redirected to /ui/, the models listed
    assert browser.current_url == server.url + PAGE_URL
    assert console_problems(browser) == [] and browser.get_log("browser") == []
    outside = {u for u in requested_urls(browser) if not u.startswith(server.url) and not u.startswith("data:")}
    assert not outside, f"the page asked for {outside}"
    options = {o.get_attribute("value") for o in find_all(browser, "#tab-classify select option")}
    assert options == {m["name"] for m in httpx.get(f"{server.url}/models").json()["models"] if m["task"] == "classify"}


def test_a_real_photo_gets_labels_with_score_bars(browser, server, uploads):
    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["grace_hopper.jpg"], uploads["circle.png"], uploads["square.png"])
    run_tab(browser, "classify")
    wait(browser, lambda d: len(find_all(d, "#classify-results .card")) == 3)
    cards = find_all(browser, "#classify-results .card")
    assert cards[0].find_element("css selector", "figcaption").text == "grace_hopper.jpg"
    shown = [label.text for label in find_all(browser, "#classify-results .card:first-child .label")]
    assert len(shown) == min(5, len(labels_of(server))) and set(shown) <= labels_of(server)
    widths = [bar.size["width"] for bar in find_all(browser, "#classify-results .card:first-child .bar")]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0  # bars as long as the scores, highest first
    assert console_problems(browser) == []
    screenshot(find(browser, "body"), "classify.png")


def test_the_browser_reads_where_a_classification_spent_its_time(browser, server, uploads):
    """Chromium's own Server-Timing parser (the Resource Timing API, what developer tools chart) reads the answer."""
    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["grace_hopper.jpg"])
    run_tab(browser, "classify")
    wait(browser, lambda d: len(find_all(d, "#classify-results .card")) == 1)
    timings = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => new URL(e.name).pathname === '/classify')"
        ".map(e => e.serverTiming.map(t => [t.name, t.duration]));")
    [metrics] = [dict(entry) for entry in timings]
    assert set(metrics) == {"decode", "queue", "inference", "total"}
    assert metrics["decode"] > 0 and metrics["inference"] > 0
    assert metrics["decode"] + metrics["queue"] + metrics["inference"] <= metrics["total"] + 0.02


def test_dropped_files_are_added_like_chosen_ones(browser, server, uploads):
    """A drop of two files on the drop zone (a DataTransfer holding real PNG bytes, as a drag from the desktop makes)."""
    open_page(browser, server.url + PAGE_URL)
    payload = base64.b64encode(uploads["circle.png"].read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        for (const name of ["dropped-1.png", "dropped-2.png"]) transfer.items.add(new File([bytes], name, {type: "image/png"}));
        document.querySelector("#drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, payload)
    wait(browser, lambda d: len(find_all(d, "#thumbnails li")) == 2)
    run_tab(browser, "classify")
    wait(browser, lambda d: len(find_all(d, "#classify-results .card")) == 2)
    names = [caption.text for caption in find_all(browser, "#classify-results .source figcaption")]
    assert names == ["dropped-1.png", "dropped-2.png"]
    assert console_problems(browser) == []


def test_the_attention_map_is_shown_over_the_photo(browser, server, uploads):
    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["grace_hopper.jpg"], uploads["circle.png"])
    run_tab(browser, "attention")
    wait(browser, lambda d: len(find_all(d, "#attention-results .overlay img")) == 2)
    overlay = find(browser, "#attention-results .overlay img")
    wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", overlay) > 0)
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay) == [512, 600]
    assert len(find_all(browser, "#attention-results canvas.heat-grid")) == 2
    assert console_problems(browser) == []
    screenshot(find(browser, "#tab-attention"), "attention.png")


def _mask(card) -> str:
    return card.get_attribute("data-mask")


def test_clicking_and_dragging_patches_changes_the_mask_and_the_reconstruction(browser, server, uploads):
    from selenium.webdriver.common.action_chains import ActionChains

    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["circle.png"], uploads["grace_hopper.jpg"])
    run_tab(browser, "reconstruct")
    wait(browser, lambda d: len(find_all(d, "#reconstruct-results .card[data-mask]")) == 2)
    card = find(browser, "#reconstruct-results .card")
    before, composite_before = _mask(card), card.find_element("css selector", "img[alt^=visible]").get_attribute("src")
    grid = httpx.get(f"{server.url}/models").json()
    rows = cols = int(round(len(before) ** 0.5))
    canvas = card.find_element("css selector", "canvas.patch-grid")
    width, height = canvas.size["width"], canvas.size["height"]

    def offset(row: int, col: int) -> tuple[int, int]:  # from the canvas' centre, as Selenium counts
        return int((col + 0.5) * width / cols - width / 2), int((row + 0.5) * height / rows - height / 2)

    # a click toggles one patch, and the server paints with that mask
    ActionChains(browser).move_to_element_with_offset(canvas, *offset(0, 0)).click().perform()
    wait(browser, lambda d: _mask(card) != before)
    after_click = _mask(card)
    assert after_click[0] != before[0] and after_click[1:] == before[1:]
    assert card.find_element("css selector", "img[alt^=visible]").get_attribute("src") != composite_before
    assert "hidden patches" in card.find_element("css selector", ".mse").text

    # a drag along the second row sets every patch it crosses the way the first one went
    chain = ActionChains(browser).move_to_element_with_offset(canvas, *offset(1, 0)).click_and_hold()
    for col in range(1, cols):
        chain.move_to_element_with_offset(canvas, *offset(1, col))
    chain.release().perform()
    hiding = after_click[cols] == "0"  # the drag hides when it started on a visible patch
    wait(browser, lambda d: _mask(card)[cols:2 * cols] == ("1" if hiding else "0") * cols)
    assert _mask(card)[:cols] == after_click[:cols] and _mask(card)[2 * cols:] == after_click[2 * cols:]
    assert _mask(find_all(browser, "#reconstruct-results .card")[1]) != ""  # the other image kept its own view
    assert console_problems(browser) == [] and grid
    screenshot(find(browser, "#tab-reconstruct"), "reconstruct.png")


def test_the_embeddings_are_compared_as_a_similarity_matrix(browser, server, uploads):
    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["grace_hopper.jpg"], uploads["circle.png"], uploads["square.png"])
    run_tab(browser, "embed")
    wait(browser, lambda d: find_all(d, "#embed-results table td"))
    cells = [float(td.text) for td in find_all(browser, "#embed-results table td")]
    matrix = np.array(cells).reshape(3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-3)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-3)
    assert console_problems(browser) == []
    screenshot(find(browser, "#tab-embed"), "embed.png")


def test_an_oversized_file_and_a_file_that_is_no_image_show_the_servers_message(browser, server, uploads):
    open_page(browser, server.url + PAGE_URL)
    choose(browser, uploads["huge.png"])
    run_tab(browser, "classify")
    message = error_text(browser)
    assert f"the limit is {MAX_BODY_BYTES}" in message and "HTTP 413" in message and "payload_too_large" in message
    screenshot(find(browser, "main"), "error-too-large.png")

    find(browser, "#thumbnails .remove").click()
    choose(browser, uploads["circle.png"], uploads[XSS_NAME])
    find(browser, "#tab-classify button[type=submit]").click()
    wait(browser, lambda d: "invalid_image" in find(d, "#error-message").text)
    message = find(browser, "#error-message").text
    assert f"(file: {XSS_NAME})" in message  # the name as text, not as markup
    assert find_all(browser, "#error img") == [] and browser.title != "owned"
    assert console_problems(browser) == []
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_the_api_key_is_asked_for_used_and_kept_in_the_page_only(browser, keyed_server, uploads):
    open_page(browser, keyed_server.url + PAGE_URL, models_needed=False)
    assert "unauthorized" in error_text(browser)
    key = find(browser, "#api-key")
    key.send_keys(API_KEY + "\t")  # the field's change event loads the models with the key
    wait(browser, lambda d: find(d, "#tab-classify select option").get_attribute("value"))
    assert not find(browser, "#error").is_displayed()
    choose(browser, uploads["circle.png"])
    run_tab(browser, "classify")
    wait(browser, lambda d: find_all(d, "#classify-results .label"))
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]


def test_an_installed_wheel_carries_the_page(tmp_path):
    """The page's files are package data: a wheel built from the project holds them where the server looks."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(next((tmp_path / "dist").glob("vitserve-*.whl"))) as wheel:
        held = set(wheel.namelist())
    assert {f"service/ui/{name}" for name in FILES} <= held
