"""The web demo: served on localhost, driven through gradio_client and a real headless Chromium."""

import io
import os
import re
import shutil
import socket
import tempfile
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
from segllm.viz import colour  # noqa: E402
from tests.helpers import RELEASED_FIXTURES, png_declaring  # noqa: E402

CHROMIUM = os.environ.get("SEGLLM_CHROMIUM", "/usr/bin/chromium")


_CLIENT_TEMP = re.compile(r"[0-9a-f]{40}")


@pytest.fixture(scope="module", autouse=True)
def _no_client_temp_folders():
    """gradio_client downloads every file into a new folder <temp>/<40 hex digits> and moves it
    out, leaving the folder behind (hundreds per run of this module); remove the empty ones this
    module made."""
    temp = Path(tempfile.gettempdir())
    before = {p.name for p in temp.iterdir()}
    yield
    for p in temp.iterdir():
        if p.name not in before and _CLIENT_TEMP.fullmatch(p.name) and p.is_dir():
            try:
                p.rmdir()  # only if empty: never anything with content
            except OSError:
                pass


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


def _browser(p):
    """A headless Chromium page (1280x900)."""
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )
    return browser, browser.new_page(viewport={"width": 1280, "height": 900})


def _upload(page, button: str, path: Path) -> None:
    """Choose ``path`` in the file dialog that the upload button ``button`` (a CSS selector) opens."""
    with page.expect_file_chooser() as chooser:
        page.locator(button).click()
    chooser.value.set_files(str(path))


def _first_round(p, url: str):
    """A headless Chromium on the demo with the bundled example image uploaded and round 1
    ("Segment the cross.") answered: (browser, page)."""
    from playwright.sync_api import expect

    browser, page = _browser(p)
    page.goto(url)
    _upload(page, "#upload", EXAMPLES / "shapes.png")
    expect(page.locator("#status")).to_contain_text("ready", timeout=30_000)
    page.locator("#question textarea").fill("Segment the cross.")
    page.locator("#ask").click()
    expect(page.locator("li.segllm-round")).to_have_count(1, timeout=30_000)
    return browser, page


def _displayed(page, after: str | None = None) -> tuple[np.ndarray, str]:
    """The image the page shows as the overlay, as displayed ([512, 512, 3]: the 128 px examples
    are shown 4x enlarged), and its URL; ``after``: wait until the URL is no longer that one."""
    from playwright.sync_api import expect

    img = page.locator("#overlay img")
    if after is not None:
        expect(img).not_to_have_attribute("src", after, timeout=30_000)
    src = img.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    shown = np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))
    assert shown.shape == (512, 512, 3), shown.shape
    return shown, src


def _shown(page, after: str | None = None) -> tuple[np.ndarray, str]:
    """The overlay the page shows at the image's resolution (128 px), and its URL."""
    shown, src = _displayed(page, after)
    return shown[::4, ::4], src


def _tinted(shown: np.ndarray, image: np.ndarray, x: int, y: int, rnd: int) -> bool:
    """Whether pixel (x, y) of the overlay is drawn towards round ``rnd``'s colour."""
    c = np.array(colour(rnd))
    return bool(np.abs(shown[y, x].astype(int) - c).sum() < np.abs(image[y, x].astype(int) - c).sum())


def _changed_outside(shown: np.ndarray, image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> int:
    """How many pixels outside the box (x0, y0)-(x1, y1) differ from the image."""
    diff = np.any(shown != image, axis=2)
    diff[max(0, y0):y1, max(0, x0):x1] = False
    return int(diff.sum())


@needs_chromium
def test_browser_two_rounds_with_a_reference(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    shots = _shots_folder(tmp_path)
    with sync_playwright() as p:
        browser, page = _first_round(p, url)
        page.locator("#question textarea").fill("Segment the object closest to instance 1.")
        page.locator("#refs").get_by_label("1", exact=True).check()
        page.locator("#question textarea").press("Enter")  # Enter asks
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
    overlay shows it; the legend shows one round alone and every round again. The screenshot of
    the three rounds is docs/demo_regions.png (``SEGLLM_TEST_ARTIFACTS=docs``)."""
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    shots = _shots_folder(tmp_path)
    image = np.asarray(Image.open(EXAMPLES / "shapes.png").convert("RGB"))
    with sync_playwright() as p:
        browser, page = _first_round(p, url)
        _, src = _shown(page)
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
        shown, src = _shown(page, after=src)
        assert _tinted(shown, image, x, y, 2), "the clicked region is not drawn in round 2's colour"
        page.locator("#question textarea").fill("Segment the shape closest to instance 2.")
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round")).to_have_count(3, timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='3']")).to_contain_text("refers to 2")
        every, src = _shown(page, after=src)
        page.screenshot(path=str(shots / "demo_regions.png"), full_page=True)
        # the legend: round 2 alone (the other rounds' masks gone from the overlay), then every round again
        window = (x - 16, y - 16, x + 16, y + 16)  # the disk and its number label
        assert _changed_outside(every, image, *window) > 0, "rounds 1 and 3 drew nothing"
        page.locator("li.segllm-round[data-round='2']").click()
        expect(page.locator("#status")).to_contain_text("Showing round 2 alone.", timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='2']")).to_have_attribute("data-shown", "true")
        expect(page.locator("li.segllm-round[data-round='1']")).to_have_attribute("data-shown", "false")
        expect(page.locator("#show input[value='2']")).to_be_checked()
        alone, src = _shown(page, after=src)
        assert _tinted(alone, image, x, y, 2) and _changed_outside(alone, image, *window) == 0
        page.screenshot(path=str(shots / "demo_round_alone.png"), full_page=True)
        page.locator("li.segllm-round[data-round='2']").click()  # the shown round again: every round
        expect(page.locator("#status")).to_contain_text("Showing every round.", timeout=30_000)
        expect(page.locator("li.segllm-round[data-shown]")).to_have_count(0)
        again, src = _shown(page, after=src)
        np.testing.assert_array_equal(again, every)
        # the view selector does the same as the legend
        page.locator("#show").get_by_label("Round 1", exact=True).check()
        expect(page.locator("#status")).to_contain_text("Showing round 1 alone.", timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='1']")).to_have_attribute("data-shown", "true")
        one, src = _shown(page, after=src)
        assert not np.array_equal(one, alone) and not np.array_equal(one, every)
        page.locator("li.segllm-round[data-round='1']").press("Enter")  # the legend by keyboard: every round
        expect(page.locator("#status")).to_contain_text("Showing every round.", timeout=30_000)
        np.testing.assert_array_equal(_shown(page, after=src)[0], every)
        browser.close()
    assert (shots / "demo_regions.png").stat().st_size > 10_000


@needs_chromium
def test_browser_example_thumbnail_box_by_two_clicks_and_a_mask_upload(server, tmp_path):
    """The examples are thumbnails; a box region by two clicks (the first corner marked on the
    image); a region from an uploaded mask; both drawn in the overlay."""
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    image = np.asarray(Image.open(EXAMPLES / "scene3.png").convert("RGB"))
    mask_file = tmp_path / "my_mask.png"
    mask = np.zeros((128, 128), np.uint8)
    mask[100:120, 10:40] = 255
    Image.fromarray(mask).save(mask_file)
    with sync_playwright() as p:
        browser, page = _browser(p)
        page.goto(url)
        thumbs = page.locator("#examples img")
        expect(thumbs).to_have_count(3, timeout=30_000)
        assert all("/file=" in thumbs.nth(i).get_attribute("src") for i in range(3))  # images, not names
        page.locator("#examples").get_by_text("scene3", exact=True).click()
        expect(page.locator("#status")).to_contain_text("Image 128x128 ready", timeout=30_000)
        before, src = _shown(page)
        np.testing.assert_array_equal(before, image)  # the example itself, no rounds yet
        page.locator("#tool").get_by_label("Box (two clicks: opposite corners)").check()
        expect(page.locator("#status")).to_contain_text("click one corner, then the opposite one", timeout=30_000)
        img = page.locator("#overlay img")
        b = img.bounding_box()
        at = lambda px, py: {"x": b["width"] * (px + 0.5) / 128, "y": b["height"] * (py + 0.5) / 128}  # noqa: E731
        img.click(position=at(70, 50))
        expect(page.locator("#status")).to_contain_text("Box: first corner at (70, 50)", timeout=30_000)
        marked, src = _displayed(page, after=src)
        changed = np.argwhere(np.any(marked != np.repeat(np.repeat(image, 4, 0), 4, 1), axis=2))
        assert len(changed) > 0, "the first corner is not marked"
        assert np.abs(changed.mean(axis=0) - [50.5 * 4, 70.5 * 4]).max() <= 1  # a cross centred on it
        expect(page.locator("li.segllm-round")).to_have_count(0)
        page.locator("#region-label textarea").fill("the box I drew")
        img.click(position=at(30, 20))
        expect(page.locator("#status")).to_contain_text("your region box (30, 20)-(71, 51)", timeout=30_000)
        expect(page.locator("li.segllm-round[data-round='1']")).to_contain_text("Segment the box I drew.")
        boxed, src = _shown(page, after=src)
        assert _tinted(boxed, image, 50, 35, 1) and _tinted(boxed, image, 70, 50, 1)
        assert _changed_outside(boxed, image, 29, 19, 71, 51) == 0  # the box, its outline and label only
        _upload(page, "#region-mask", mask_file)
        expect(page.locator("#status")).to_contain_text("your region from my_mask.png", timeout=30_000)
        expect(page.locator("li.segllm-round")).to_have_count(2)
        both, src = _shown(page, after=src)
        assert _tinted(both, image, 25, 110, 2) and _tinted(both, image, 50, 35, 1)
        page.locator("#question textarea").fill("Segment the shape closest to instance 1.")
        page.locator("#question textarea").press("Enter")
        expect(page.locator("li.segllm-round[data-round='3']")).to_contain_text("refers to 1", timeout=30_000)
        browser.close()


@needs_chromium
# slow set (CI's second step): the image editor's canvas costs a software-rendering Chromium
# ~26-38 s; test_browser_region_by_clicking_then_a_question_that_refers_to_it keeps a region round
# made in the browser in the fast set
@pytest.mark.slow
def test_browser_paint_a_region_then_refer_to_it(server, tmp_path):
    """A region painted with the brush in the editor becomes a round; the overlay shows it."""
    from playwright.sync_api import expect, sync_playwright

    _, url = server
    image = np.asarray(Image.open(EXAMPLES / "scene2.png").convert("RGB"))
    with sync_playwright() as p:
        browser, page = _browser(p)
        page.goto(url)
        page.locator("#examples").get_by_text("scene2", exact=True).click()
        expect(page.locator("#status")).to_contain_text("Image 128x128 ready", timeout=30_000)
        _, src = _shown(page)
        page.locator("#paint-box").get_by_text("Paint a region").click()
        canvas = page.locator("#paint canvas").first
        expect(canvas).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)  # the editor draws the image once it is shown
        page.locator("#paint button[aria-label='Brush']").first.click()
        b = canvas.bounding_box()
        cx, cy = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2  # the image sits in the canvas' centre
        page.mouse.move(cx - 30, cy)
        page.mouse.down()
        for i in range(1, 13):
            page.mouse.move(cx - 30 + 5 * i, cy)
        page.mouse.up()
        page.locator("#add-painted").click()
        expect(page.locator("#status")).to_contain_text("Round 1: your region painted (", timeout=30_000)
        n = int(re.search(r"painted \((\d+) pixels\)", page.locator("#status").inner_text()).group(1))
        assert 20 < n < 128 * 128 // 4, n  # a stroke, not the whole image
        painted, src = _shown(page, after=src)
        assert _tinted(painted, image, 64, 64, 1), "the painted stroke through the centre is not drawn"
        outside = _changed_outside(painted, image, 40, 40, 88, 88)
        assert outside == 0, f"{outside} pixels changed away from the stroke"
        page.screenshot(path=str(_shots_folder(tmp_path) / "demo_painted.png"), full_page=True)
        # the editor folded away again (its canvas costs a software-rendering Chromium much CPU)
        page.locator("#paint-box").get_by_text("Paint a region").click()
        page.locator("#question textarea").fill("Segment the shape closest to instance 1.")
        page.locator("#ask").click()
        expect(page.locator("li.segllm-round[data-round='2']")).to_contain_text("refers to 1", timeout=60_000)
        browser.close()


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
    folder = store._items[c.session_hash].folder

    def files():
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())

    before = files()
    assert sorted(p.name for p in before) == ["overlay.png", "segllm-masks.zip"], before  # earlier rounds' files are deleted
    # showing one round alone redraws the overlay and keeps the zip (the masks are the same)
    shown = c.predict("2", api_name="/show_round")
    assert shown[3] == "Showing round 2 alone." and "data-shown" in shown[1]
    after = files()
    zips = [p for p in after if p.name == "segllm-masks.zip"]
    assert len(after) == 2 and zips == [p for p in before if p.name == "segllm-masks.zip"], (before, after)
    assert [p for p in after if p.name == "overlay.png"] != [p for p in before if p.name == "overlay.png"]
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
