"""The web page in headless Chromium (Selenium + Debian's chromium and chromium-driver).

Skipped when selenium, chromium or chromedriver are missing. The tiny model is scripted to answer
a detect prompt with one box, so the test can check that the streamed answer appears and the box
is drawn on the canvas where the server says it is.
"""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from PIL import Image  # noqa: E402
from server_helpers import detect_script, force_tokens, running_server  # noqa: E402

from paligemma import load_model, load_processor  # noqa: E402
from paligemma.server.app import ServerSettings, create_app  # noqa: E402
from paligemma.server.batcher import BatchEngine  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, timeout: float = 30.0):
    """Poll a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {script}; status: {driver.find_element('id', 'status').text!r}")


def test_upload_detect_stream_and_draw_boxes(browser, tiny_checkpoint_dir, tmp_path, monkeypatch):
    model, processor = load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)
    force_tokens(monkeypatch, model, detect_script(processor.tokenizer, locs=(100, 200, 500, 900), label=" circle"))
    photo = tmp_path / "gray.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(photo)
    engine = BatchEngine(model, processor, batch_window_s=0)
    with running_server(create_app(engine, ServerSettings(model_name="tiny"))) as url:
        browser.get(url + "/")
        browser.find_element("id", "file").send_keys(str(photo))
        _wait(browser, "!document.getElementById('run').disabled")
        browser.find_element("css selector", "#task option[value=detect]").click()
        browser.find_element("id", "text").send_keys("circle")
        browser.find_element("id", "run").click()
        _wait(browser, "document.getElementById('view').dataset.boxes === '1'")
        assert browser.find_element("id", "answer").text == "<loc0100><loc0200><loc0500><loc0900> circle"
        assert browser.find_element("id", "status").text.startswith("done (stop)")
        # The scripted tokens have probability ~1: the listed box carries its score.
        assert browser.find_element("id", "objects").text == "circle — score 1.000 — box [78, 29, 352, 147]"
        # The box's left edge (x0 = 200/1023 of the width) is drawn in the box colour; the middle is not.
        x0, y_mid = round(200 / 1023 * 400), round(300 / 1023 * 300)
        pixel = "Array.from(document.getElementById('view').getContext('2d').getImageData(%d, %d, 1, 1).data)"
        assert browser.execute_script("return " + pixel % (x0, y_mid))[:3] == [255, 0, 255]
        assert browser.execute_script("return " + pixel % (x0 + 40, y_mid))[:3] == [128, 128, 128]


def test_segment_answer_masks_are_painted(browser, tiny_checkpoint_dir, tmp_path, monkeypatch):
    import torch

    from paligemma.vqvae import MaskCodec, MaskCodecConfig

    model, processor = load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)
    tokenizer = processor.tokenizer
    force_tokens(monkeypatch, model, [tokenizer.loc_id(v) for v in (100, 200, 500, 900)]
                 + [tokenizer.seg_id(v) for v in range(16)] + tokenizer.encode(" circle") + [tokenizer.eos_id])
    codec = MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)).eval()
    with torch.no_grad():  # every code decodes to > 0 everywhere: the mask fills its box
        codec.decoder[12].weight.zero_()
        codec.decoder[12].bias.fill_(1.0)
    photo = tmp_path / "gray.png"
    Image.new("RGB", (400, 300), (128, 128, 128)).save(photo)
    engine = BatchEngine(model, processor, batch_window_s=0)
    with running_server(create_app(engine, ServerSettings(model_name="tiny"), mask_codec=codec)) as url:
        browser.get(url + "/")
        browser.find_element("id", "file").send_keys(str(photo))
        _wait(browser, "!document.getElementById('run').disabled")
        browser.find_element("css selector", "#task option[value=segment]").click()
        browser.find_element("id", "text").send_keys("circle")
        browser.find_element("id", "run").click()
        _wait(browser, "document.getElementById('view').dataset.masks === '1'")
        assert browser.find_element("id", "status").text.startswith("done (stop)")
        pixel = "Array.from(document.getElementById('view').getContext('2d').getImageData(%d, %d, 1, 1).data)"
        inside = browser.execute_script("return " + pixel % (round(550 / 1023 * 400), round(300 / 1023 * 300)))
        assert inside[0] > 150 and inside[1] < 100  # tinted magenta over the grey
        assert browser.execute_script("return " + pixel % (20, 20))[:3] == [128, 128, 128]


def test_the_example_button_loads_the_bundled_image(browser, tiny_checkpoint_dir):
    from paligemma.server.app import EXAMPLE_IMAGE

    width = Image.open(EXAMPLE_IMAGE).width
    engine = BatchEngine(load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir), batch_window_s=0)
    with running_server(create_app(engine, ServerSettings(model_name="tiny"))) as url:
        browser.get(url + "/")
        assert browser.find_element("id", "run").get_attribute("disabled")
        browser.find_element("id", "example").click()
        _wait(browser, "!document.getElementById('run').disabled")
        assert browser.execute_script("return document.getElementById('view').width") == min(width, 720)
        browser.find_element("id", "run").click()  # a caption of the example image
        _wait(browser, "document.getElementById('status').textContent.startsWith('done')")
