"""The page at / in a real browser (issue 28; docs/serving.md#the-page): headless Chromium, driven by
Selenium through the system's chromedriver, uploads the bundled image, runs `detect`, and the boxes
must be on the canvas: in the page's state (window.nanopali, the server's boxes) and in its pixels
(each box's left edge in its palette colour, the same palette nanopali/tasks/detection.py draws with).
A screenshot is saved beside the test's temporary files (its path is printed) for a person to look at.

Skipped, saying why, only where no browser can be run: .ci/run installs Debian's chromium and
chromium-driver.
"""
import shutil

import pytest

from test_serve_api import KEY, SHAPES, main_server

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the test extra)")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium + chromedriver on PATH (Debian: "
                                "apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def page(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("page")
    server, _ = main_server(request)     # the one tests/test_serve_api.py talks to: it wants an API key
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        browser.set_script_timeout(30)
        browser.get(server.url + "/")
        yield browser, d
    finally:
        browser.quit()


def state(browser, expression):
    return browser.execute_script(f"return window.nanopali.{expression}")


def wait_until(browser, expression, seconds=30):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, seconds, poll_frequency=0.05).until(lambda b: state(b, expression))


def test_detect_on_an_uploaded_image_draws_the_servers_boxes_on_the_canvas(page):
    browser, d = page
    wait_until(browser, "status === 'ready'")
    browser.find_element("id", "key").send_keys(KEY)     # the page shows the field: /health says a key is needed
    browser.find_element("id", "file").send_keys(SHAPES)
    wait_until(browser, "image !== null")
    browser.find_element("css selector", "#tasks button[data-task=detect]").click()
    browser.find_element("id", "arg").clear()
    browser.find_element("id", "arg").send_keys("circle ; square ; triangle")
    browser.find_element("id", "run").click()
    wait_until(browser, "status === 'done'")
    shot = d / "page.png"
    browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot}")
    boxes = state(browser, "boxes")
    assert [b["label"] for b in boxes] == ["circle", "square", "triangle"]
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200)]        # detection.PALETTE[:3]
    for b, colour in zip(boxes, palette):
        x0, y0, x1, y1 = b["box"]
        pixel = browser.execute_script("return window.nanopali.pixelAt(arguments[0], arguments[1])", x0,
                                       (y0 + y1) / 2)
        assert max(abs(p - c) for p, c in zip(pixel, colour)) <= 8, (b, pixel, colour)   # antialiasing only


def test_page_fetches_nothing_but_its_own_server(page):
    browser, _ = page
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    origin = browser.execute_script("return location.origin")
    assert urls and all(u.startswith(origin) for u in urls), urls


def test_a_mask_is_tinted_onto_its_pixels_in_its_colour_and_nowhere_else(page):
    browser, _ = page      # after the detect above: the bundled image is on the canvas
    wait_until(browser, "status === 'done'")
    h = w = 224                                                     # shapes_1.png
    inside, outside = (20, 200), (200, 20)                          # (x, y): left-bottom corner, right-top
    before = [browser.execute_script("return window.nanopali.pixelAt(arguments[0], arguments[1])", *p)
              for p in (inside, outside)]
    counts = [180, 44] * 40 + [h * w - 40 * h]   # COCO RLE, column-major from 0s: rows 180.. of columns 0..39
    browser.execute_script("""window.nanopali.masks = [{label: 'm', box: [0, 180, 40, 224],
        rle: {size: [224, 224], counts: arguments[0]}}]; window.nanopali.boxes = []; draw();""", counts)
    after = [browser.execute_script("return window.nanopali.pixelAt(arguments[0], arguments[1])", *p)
             for p in (inside, outside)]
    alpha = 115 / 255                                               # page.html's mask opacity
    tinted = [round((1 - alpha) * b + alpha * c) for b, c in zip(before[0], (230, 25, 75))]
    assert max(abs(a - t) for a, t in zip(after[0], tinted)) <= 2, (after[0], tinted)
    assert after[1] == before[1]
