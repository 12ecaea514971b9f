"""The web demo: served on localhost, driven through gradio_client and a real headless Chromium."""

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from segllm.default import EXAMPLES, load_model  # noqa: E402
from segllm.demo import build_demo  # noqa: E402
from tests.conftest import RELEASED_FIXTURES, png_declaring  # noqa: E402

CHROMIUM = os.environ.get("SEGLLM_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server():
    demo = build_demo(load_model(), max_side=1024, max_new_tokens=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


def _legend_rounds(html: str) -> int:
    return html.count('class="segllm-round"')


def test_two_sessions_stay_isolated(server):
    demo, url = server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    a.predict("shapes", api_name="/pick_example")
    b.predict("scene2", api_name="/pick_example")
    a.predict("Segment the cross.", [], api_name="/ask")
    out_a = a.predict("Segment the object closest to instance 1.", ["1"], api_name="/ask")
    out_b = b.predict("Segment the tree.", [], api_name="/ask")
    assert _legend_rounds(out_a[1]) == 2 and "refers to 1" in out_a[1]
    assert _legend_rounds(out_b[1]) == 1 and "tree" in out_b[1] and "cross" not in out_b[1]
    assert out_a[3].startswith("Round 2") and out_b[3].startswith("Round 1")
    # each client's download holds only its own rounds
    import zipfile

    names_b = zipfile.ZipFile(out_b[4]).namelist()
    assert "round1_mask1.png" in names_b and "round2_mask1.png" not in names_b
    undo_a = a.predict(api_name="/undo")
    assert _legend_rounds(undo_a[1]) == 1 and undo_a[3] == "Undid round 2."
    assert _legend_rounds(b.predict(api_name="/undo")[1]) == 0


def test_bad_input_gets_a_message_and_the_session_goes_on(server, tmp_path):
    _, url = server
    c = Client(url, verbose=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    bomb = png_declaring(tmp_path / "bomb.png", 60000, 60000)  # a decompression bomb's header
    for bad in (broken, text, bomb):
        with pytest.raises(AppError, match="cannot read image"):
            c.predict(handle_file(str(bad)), api_name="/set_image")
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((8, 1500, 3), np.uint8)).save(big)
    with pytest.raises(AppError, match="at most 1024 pixels"):
        c.predict(handle_file(str(big)), api_name="/set_image")
    with pytest.raises(AppError, match="Upload or pick an image first"):
        c.predict("Segment the cross.", [], api_name="/ask")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tiny)
    assert c.predict(handle_file(str(tiny)), api_name="/set_image")[3] == "Image 1x1 ready. Ask a question."
    out = c.predict("Segment the dot.", [], api_name="/ask")
    assert out[3].startswith("Round 1")
    c.predict(handle_file(str(EXAMPLES / "shapes.png")), api_name="/set_image")
    c.predict("Segment the cross.", [], api_name="/ask")
    with pytest.raises(AppError, match="question is empty"):
        c.predict("   ", [], api_name="/ask")
    with pytest.raises(AppError, match="refers to round 9, which does not exist"):
        c.predict("Segment the one next to it [REF:9]", [], api_name="/ask")
    out = c.predict("Segment the star.", [], api_name="/ask")
    assert out[3].startswith("Round 2") and _legend_rounds(out[1]) == 2


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_browser_two_rounds_with_a_reference(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    shots = Path(os.environ.get("SEGLLM_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.set_input_files("#upload input[type=file]", str(EXAMPLES / "shapes.png"))
        expect(page.locator("#status")).to_contain_text("ready", timeout=30_000)
        page.locator("#question textarea").fill("Segment the cross.")
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round")).to_have_count(1, timeout=30_000)
        page.locator("#question textarea").fill("Segment the object closest to instance 1.")
        page.get_by_label("1", exact=True).check()
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round")).to_have_count(2, timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='2']")).to_contain_text("refers to 1")
        expect(page.locator("#overlay img")).to_be_visible()
        page.screenshot(path=str(shots / "demo_two_rounds.png"), full_page=True)
        # an error shows in the page and the conversation goes on
        page.locator("#question textarea").fill("Segment it [REF:9]")
        page.locator("#ask").click()
        expect(page.get_by_text("refers to round 9").first).to_be_visible(timeout=30_000)
        page.locator("#question textarea").fill("Segment the star.")
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round")).to_have_count(3, timeout=30_000)
        browser.close()
    print(f"screenshot: {shots / 'demo_two_rounds.png'}")
    assert (shots / "demo_two_rounds.png").stat().st_size > 10_000


RELEASED = RELEASED_FIXTURES


@pytest.mark.skipif(
    not (RELEASED / "segllm_tiny/checkpoint/model.safetensors").exists(),
    reason=f"released tiny SegLLM fixture not found under {RELEASED} (set SEGLLM_FIXTURES)",
)
def test_demo_serves_a_released_checkpoint(tmp_path):
    """The demo's checkpoint option with a released-layout folder (the miniature checkpoint)."""
    from safetensors.torch import load_file

    photo = tmp_path / "voc.png"
    Image.fromarray(load_file(RELEASED / "hipie/inputs.safetensors")["image_rgb_uint8"].numpy()).save(photo)
    demo = build_demo(load_model(RELEASED / "segllm_tiny/checkpoint"), max_side=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert c.predict(handle_file(str(photo)), api_name="/set_image")[3] == "Image 500x375 ready. Ask a question."
        c.predict("Segment the person on the left.", [], api_name="/ask")
        out = c.predict("Segment the chair next to instance 1.", ["1"], api_name="/ask")
        assert _legend_rounds(out[1]) == 2 and "refers to 1" in out[1]
        assert out[3].startswith("Round 2")
    finally:
        demo.close()
