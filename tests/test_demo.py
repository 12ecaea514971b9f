"""The web demo: served on localhost, driven through gradio_client and a real headless Chromium."""

import os
import re
import shutil
import socket
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from segllm.default import EXAMPLES, load_model  # noqa: E402
from segllm.demo import SessionStore, build_demo, user_message  # noqa: E402
from tests.helpers import RELEASED_FIXTURES, png_declaring  # noqa: E402

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
    # answers are shown with a chip per mask, never a raw <seg> token
    assert "&lt;seg&gt;" not in out_a[1] and out_a[1].count('class="segllm-mask"') >= 2 and "<seg>" not in out_a[3]
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
    uploads = gr.utils.get_upload_folder()
    for bad in (broken, text, bomb):
        with pytest.raises(AppError, match="cannot read image") as err:
            c.predict(handle_file(str(bad)), api_name="/set_image")
        # the user's own file name, never where the server stored it
        assert bad.name in str(err.value) and uploads not in str(err.value) and "/tmp" not in str(err.value)
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


# the browser tests drive Debian's chromium; without it they are skipped, not failed
needs_chromium = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def _shots_folder(tmp_path: Path) -> Path:
    """Where the browser tests' screenshots go (``SEGLLM_TEST_ARTIFACTS``, else the test's tmp folder)."""
    shots = Path(os.environ.get("SEGLLM_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _first_round(p, url: str):
    """A headless Chromium on the demo with the bundled example image uploaded and round 1
    ("Segment the cross.") answered: (browser, page)."""
    from playwright.sync_api import expect

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
    return browser, page


@needs_chromium
def test_browser_two_rounds_with_a_reference(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    shots = _shots_folder(tmp_path)
    with sync_playwright() as p:
        browser, page = _first_round(p, url)
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


@needs_chromium
def test_browser_region_by_clicking_then_a_question_that_refers_to_it(server, tmp_path):
    """Issue 17: a click on the image marks a region round; a later question refers to it; the
    overlay shows both rounds. The screenshot of the three rounds is docs/demo_regions.png."""
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    shots = _shots_folder(tmp_path)
    with sync_playwright() as p:
        browser, page = _first_round(p, url)
        page.locator("#region-label textarea").fill("the thing I clicked")
        img = page.locator("#overlay img")
        box = img.bounding_box()
        img.click(position={"x": box["width"] * 0.25, "y": box["height"] * 0.75})  # (32, 96) of the 128x128 image
        expect(page.locator("li.segllm-round")).to_have_count(2, timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='2']")).to_contain_text("your region")
        expect(page.locator("li.segllm-round[data-round='2']")).to_contain_text("Segment the thing I clicked.")
        expect(page.locator("#status")).to_contain_text("your region at (")
        x, y = (int(v) for v in re.search(r"region at \((\d+), (\d+)\)", page.locator("#status").inner_text()).groups())
        assert abs(x - 32) <= 1 and abs(y - 96) <= 1  # in image pixels (the 128 px image is shown enlarged)
        page.locator("#question textarea").fill("Segment the shape closest to instance 2.")
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round")).to_have_count(3, timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='3']")).to_contain_text("refers to 2")
        page.screenshot(path=str(shots / "demo_regions.png"), full_page=True)
        browser.close()
    assert (shots / "demo_regions.png").stat().st_size > 10_000


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


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_store_drops_idle_and_over_cap_sessions_and_everything_they_hold(model, tmp_path):
    now = [0.0]
    store = SessionStore(model, 2, idle_timeout=10, folder=tmp_path / "store", clock=lambda: now[0], max_new_tokens=8)
    with store.use("a") as entry:
        entry.session.set_image(EXAMPLES / "shapes.png")
        entry.session.ask("Segment the cross.")
        (entry.folder / "overlay.png").write_bytes(b"x")
        held, folder_a = weakref.ref(entry.session), entry.folder
    del entry
    now[0] = 5.0
    with store.use("b"):
        pass
    now[0] = 10.5  # a idle 10.5 s, b 5.5 s
    assert store.sweep() == 1 and len(store) == 1
    assert held() is None, "the dropped session (image, masks, caches) is still referenced"
    assert not folder_a.exists() and store.expired("a") and not store.expired("b")
    # the cap: a third live session drops the least recently used idle one, never a busy one
    with store.use("b"):
        with store.use("c"):
            with store.use("d"):
                assert len(store) == 3  # all three mid-request: over the cap until one ends
        with store.use("e"):
            assert store.expired("c") and store.expired("d") and len(store) == 2
    store.drop("e")  # its tab closed
    assert len(store) == 1 and not store.expired("e")
    store.close()
    assert not (tmp_path / "store").exists()


def test_a_dropped_conversation_is_reclaimed_soon_even_in_a_reference_cycle(model, tmp_path):
    """Closing a tab wakes the sweeper (not its next interval): a garbage collection frees what
    the conversation held even through a reference cycle, and glibc gives the pages back."""
    import gc
    import platform
    import time

    from segllm.demo import reclaim_memory

    store = SessionStore(model, 4, idle_timeout=600, folder=tmp_path / "store", max_new_tokens=8)
    store.start_sweeper(interval=300)
    gc.disable()  # only the store's own collection may free the cycle
    try:
        with store.use("a") as entry:
            entry.session.me = entry.session  # a cycle: reference counting alone never frees it
            held = weakref.ref(entry.session)
        del entry
        assert store.reclaims == 0
        store.drop("a")
        deadline = time.monotonic() + 20
        while store.reclaims == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.reclaims == 1, "no reclaim within 20 s of the drop (the sweeper waits 300 s)"
        assert held() is None, "the dropped session is still alive"
    finally:
        gc.enable()
        store.close()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert reclaim_memory() is True  # malloc_trim found and called


def test_a_conversation_keeps_one_overlay_and_one_zip_and_drops_them_when_it_ends(server):
    demo, url = server
    store = demo.segllm_store
    c = Client(url, verbose=False)
    c.predict("shapes", api_name="/pick_example")
    for q in ("Segment the cross.", "Segment the star.", "Segment the object closest to instance 1."):
        out = c.predict(q, [], api_name="/ask")
    assert sorted(zipfile.ZipFile(out[4]).namelist())[:3] == ["overlay.png", "round1_mask1.png", "round2_mask1.png"]
    files = sorted(p.name for p in store.folder.rglob("*") if p.is_file() and c.session_hash in store._items
                   and p.is_relative_to(store._items[c.session_hash].folder))
    assert files == ["overlay.png", "segllm-masks.zip"], files  # earlier rounds' files are deleted
    folder = store._items[c.session_hash].folder
    store.drop(c.session_hash)
    assert not folder.exists() and c.session_hash not in store._items
    c.close()


def test_an_upload_over_the_limit_is_refused_before_it_is_stored(server, tmp_path):
    demo, url = server
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(demo.max_upload_bytes + 1024))
    uploads = Path(gr.utils.get_upload_folder())
    before = {p for p in uploads.rglob("huge.png")}
    c = Client(url, verbose=False)
    with pytest.raises(Exception, match="exceeds the maximum file size"):  # the client reads the limit from the page
        c.predict(handle_file(str(big)), api_name="/set_image")
    # and the server refuses it while it streams in, whoever sends it
    import httpx

    with big.open("rb") as f:
        r = httpx.post(url + "gradio_api/upload", files={"files": ("huge.png", f, "image/png")}, timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert {p for p in uploads.rglob("huge.png")} == before  # nothing of it was kept


def test_user_messages_name_files_not_server_paths():
    stored = os.path.join(gr.utils.get_upload_folder(), "0a1b2c", "photo.jpg")
    msg = user_message(f"cannot read image {stored}: OSError: cannot identify image file '{stored}'", stored)
    assert msg == "cannot read image photo.jpg: OSError: cannot identify image file 'photo.jpg'"
    assert user_message(f"see {os.path.join(gr.utils.get_upload_folder(), 'x', 'y.zip')} now") == "see <file> now"
