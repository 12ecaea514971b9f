"""Image files through the Python API, ``segllm chat`` and the demo's upload handler.

Each case is handled as displayed (every door gives masks, overlays and ``session.json`` of the
displayed size; the API's pixels are the displayed ones, EXIF orientation applied) or refused
with one error naming the file and the problem. Images that decode are checked pixel by pixel
against what an image viewer shows; the size limits are the API's 8192 px and the demo's 4096 px
(its default); headers declaring an enormous size are refused from the header, within the
memory bound of tests/reliability/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segllm.conversation import MAX_IMAGE_SIDE, load_image
from segllm.session import Session
from tests.reliability import inputs as mk
from tests.reliability.doors import (
    OK,
    Expect,
    check_api,
    check_cli,
    check_demo,
    demo_request,
    fails,
    no_progress,
    run_cli,
)

try:
    from segllm.demo import MAX_SIDE as DEMO_MAX_SIDE
except ImportError:  # no gradio: the demo door is skipped; its limit only names the cases
    DEMO_MAX_SIDE = 4096

UNREADABLE = r"cannot read image"
TOO_BIG = r"too large to decode safely|at most \d+ pixels"


@dataclass
class ImageCase:
    id: str
    make: Callable[[Path], Path]
    expect: Expect = OK
    shape: tuple[int, int] = (mk.H, mk.W)  # displayed (height, width) when handled
    pixels: Callable[[np.ndarray], np.ndarray] | None = None  # stored RGB -> displayed RGB, when checked exactly
    demo: Expect | None = None  # the demo's outcome where it differs (its smaller size limit)
    needs: bool = True  # False: this Pillow lacks the codec


SIDE_SWAP = (mk.W, mk.H)

CASES = [
    # formats and modes that must work
    ImageCase("png-rgb", lambda f: mk.rgb(f, "rgb.png"), pixels=lambda a: a),
    ImageCase("png-mode-1", lambda f: mk.mode(f, "bilevel.png", "1")),
    ImageCase("png-mode-L", lambda f: mk.mode(f, "gray.png", "L")),
    ImageCase("png-mode-P", lambda f: mk.mode(f, "palette.png", "P")),
    ImageCase("png-P-transparency", mk.palette_transparent),
    ImageCase("png-mode-LA", lambda f: mk.mode(f, "gray_alpha.png", "LA")),
    ImageCase("png-mode-RGBA", lambda f: mk.mode(f, "rgba.png", "RGBA"), pixels=lambda a: a),
    ImageCase("png-16bit-gray", lambda f: mk.gray16(f, "gray16.png")),
    ImageCase("png-16bit-rgb", mk.png16_rgb, pixels=lambda a: a),
    ImageCase("jpeg-rgb", lambda f: mk.rgb(f, "rgb.jpg", quality=95)),
    ImageCase("jpeg-mode-L", lambda f: mk.mode(f, "gray.jpg", "L")),
    ImageCase("jpeg-cmyk", lambda f: mk.mode(f, "cmyk.jpg", "CMYK")),
    ImageCase("jpeg-progressive", lambda f: mk.rgb(f, "prog.jpg", progressive=True)),
    *[ImageCase(f"jpeg-exif-{k}", mk.exif_jpeg(k), shape=SIDE_SWAP if k >= 5 else (mk.H, mk.W), pixels=mk.ORIENT[k])
      for k in range(2, 9)],
    ImageCase("png-exif-6", mk.exif_png, shape=SIDE_SWAP, pixels=mk.ORIENT[6]),
    ImageCase("gif-static", lambda f: mk.rgb(f, "still.gif")),
    ImageCase("gif-animated-first-frame", mk.animated_gif),
    ImageCase("bmp-rgb", lambda f: mk.rgb(f, "rgb.bmp"), pixels=lambda a: a),
    ImageCase("bmp-1bit", lambda f: mk.mode(f, "bilevel.bmp", "1")),
    ImageCase("tiff-rgb", lambda f: mk.rgb(f, "rgb.tif"), pixels=lambda a: a),
    ImageCase("tiff-float32", lambda f: mk.mode(f, "float.tif", "F")),
    ImageCase("tiff-int32", lambda f: mk.mode(f, "int.tif", "I")),
    ImageCase("tiff-16bit", lambda f: mk.gray16(f, "gray16.tif")),
    ImageCase("tiff-multipage-first", mk.multipage_tiff, pixels=lambda a: a),
    ImageCase("webp-lossless", lambda f: mk.rgb(f, "rgb.webp", lossless=True), pixels=lambda a: a, needs=mk.HAS_WEBP),
    ImageCase("webp-rgba", lambda f: mk.mode(f, "rgba.webp", "RGBA", lossless=True), needs=mk.HAS_WEBP),
    ImageCase("ppm", lambda f: mk.rgb(f, "rgb.ppm"), pixels=lambda a: a),
    ImageCase("pgm-16bit", mk.pnm16),
    ImageCase("jpeg-named-png", mk.jpeg_named_png),
    # sizes
    ImageCase("1x1", mk.sized(1, 1, "one.png"), shape=(1, 1)),
    ImageCase("1x4096", mk.sized(1, DEMO_MAX_SIDE, "strip4096.png"), shape=(1, DEMO_MAX_SIDE)),
    ImageCase("8192x1", mk.sized(MAX_IMAGE_SIDE, 1, "strip8192.png"), shape=(MAX_IMAGE_SIDE, 1),
              demo=fails(rf"at most {DEMO_MAX_SIDE} pixels")),
    ImageCase("1x8193", mk.sized(1, MAX_IMAGE_SIDE + 1, "strip8193.png"), fails(rf"at most {MAX_IMAGE_SIDE} pixels"),
              demo=fails(rf"at most {DEMO_MAX_SIDE} pixels")),
    # headers that lie: an enormous size declared in a few bytes, refused before decoding
    ImageCase("png-declares-60000x60000", mk.png_declaring(60000, 60000, "bomb.png"), fails(TOO_BIG)),
    ImageCase("png-declares-9000x20", mk.png_declaring(9000, 20, "wide.png"), fails(r"at most \d+ pixels")),
    ImageCase("gif-declares-65535x65535", mk.gif_declaring, fails(TOO_BIG)),
    ImageCase("bmp-declares-30000x30000", mk.bmp_declaring, fails(TOO_BIG)),
    ImageCase("jpeg-declares-60000x60000", mk.jpeg_declaring, fails(TOO_BIG)),
    ImageCase("png-declares-4000x4000-holds-1-row", mk.png_declaring(4000, 4000, "lying.png"), fails(UNREADABLE)),
    # damaged files and non-images
    ImageCase("png-truncated", mk.truncated("half.png", "PNG"), fails(UNREADABLE)),
    ImageCase("jpeg-truncated", mk.truncated("half.jpg", "JPEG"), fails(UNREADABLE)),
    ImageCase("gif-truncated", mk.truncated("half.gif", "GIF"), fails(UNREADABLE)),
    # Pillow does not check the image data's checksum: the pixels, intact, are read as they are
    ImageCase("png-bad-crc", mk.broken_crc, pixels=lambda a: a),
    ImageCase("text-named-png", mk.raw_bytes("notes.png", b"hello, this is text\n"), fails(UNREADABLE)),
    ImageCase("empty-file", mk.raw_bytes("empty.png", b""), fails(UNREADABLE)),
    ImageCase("random-bytes-jpg", mk.raw_bytes("noise.jpg", bytes(range(256)) * 8), fails(UNREADABLE)),
    ImageCase("svg-named-png", mk.raw_bytes("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
              fails(UNREADABLE)),
    ImageCase("png-signature-only", mk.raw_bytes("sig.png", b"\x89PNG\r\n\x1a\n"), fails(UNREADABLE)),
    ImageCase("zip-named-png", mk.raw_bytes("archive.png", b"PK\x03\x04" + b"\x00" * 60), fails(UNREADABLE)),
    ImageCase("missing-file", mk.missing, fails(r"image file not found"), demo=fails(r"the upload .* is gone")),
    ImageCase("a-folder-named-png", mk.directory, fails(r"image file not found")),
]


def _case(c: ImageCase):
    marks = [] if c.needs else [pytest.mark.skip(reason="this Pillow has no codec for it")]
    return pytest.param(c, id=c.id, marks=marks)


PARAMS = [_case(c) for c in CASES]


def _stored_rgb(path: Path) -> np.ndarray:
    """The file's pixels as stored (no EXIF orientation), RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("case", PARAMS)
def test_api(case: ImageCase, tmp_path, tiny_model):
    path = case.make(tmp_path)
    got = check_api(case.expect, lambda: load_image(path), names=path.name)
    if not case.expect.ok:
        with pytest.raises(type(got)) as again:
            Session(tiny_model, path)  # the session's door gives the same refusal
        assert str(again.value) == str(got)
        return
    assert got.shape == (*case.shape, 3) and got.dtype == np.uint8
    if case.pixels is not None:  # exactly what a viewer shows: the stored pixels, oriented
        np.testing.assert_array_equal(got, case.pixels(_stored_rgb(path)))
    if case.id == "gif-animated-first-frame":
        np.testing.assert_array_equal(got, _stored_rgb(path))  # Pillow opens on the first frame
    s = Session(tiny_model, path, max_new_tokens=2)
    r = s.ask("Segment the red circle.", answer="<seg>")
    assert r.masks.shape[1:] == case.shape
    assert s.overlay().size == (case.shape[1], case.shape[0])


@pytest.mark.parametrize("case", PARAMS)
def test_cli_chat(case: ImageCase, tmp_path, capsys, cached_loading):
    path = case.make(tmp_path)
    out = tmp_path / "out"
    res = run_cli(capsys, ["chat", path, "--checkpoint", cached_loading, "--ask", "Segment the red circle.",
                           "--out", out, "--max-new-tokens", "2"])
    check_cli(case.expect, res, names=path.name)
    if case.expect.ok:
        h, w = case.shape
        assert np.asarray(Image.open(out / "round1_mask1.png")).shape == (h, w)
        assert Image.open(out / "round1_overlay.png").size == (w, h)
        coco = json.loads((out / "session.json").read_text())
        assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (h, w)


@pytest.mark.parametrize("case", PARAMS)
def test_demo_upload(case: ImageCase, tmp_path, demo):
    path = case.make(tmp_path)
    expect = case.demo or case.expect
    request = demo_request()
    got = check_demo(expect, lambda: demo.set_image(str(path), request, no_progress), names=path.name)
    if not expect.ok:
        # the conversation goes on: a good image afterwards works in the same browser session
        good = mk.rgb(tmp_path, "after.png")
        assert demo.set_image(str(good), request, no_progress)[3] == f"Image {mk.W}x{mk.H} ready. Ask a question."
        return
    h, w = case.shape
    assert got[3] == f"Image {w}x{h} ready. Ask a question."
    overlay, _, _, status, download = demo.ask("Segment the red circle.", [], request, no_progress)[:5]
    from segllm.demo import display_scale  # imports gradio, which this module does not require

    k = display_scale((h, w))  # small images are shown enlarged by a whole factor
    assert status.startswith("Round 1") and Image.open(overlay).size == (w * k, h * k)
    demo.app.segllm_store.drop(request.session_hash)


# -- what only the Python API takes: arrays and PIL images --------------------------------------
def _lazy_truncated(tmp_path: Path) -> Image.Image:
    return Image.open(mk.truncated("lazy.png", "PNG")(tmp_path))


ARRAYS = [
    ("uint16-array", lambda t: (mk.pattern().astype(np.uint16) * 257), OK),
    ("float-array-0-1", lambda t: mk.pattern().astype(np.float32) / 255, OK),
    ("bool-array", lambda t: mk.pattern()[..., 0] > 128, OK),
    ("rgba-array", lambda t: np.dstack([mk.pattern(), np.full((mk.H, mk.W), 7, np.uint8)]), OK),
    ("pil-I16-image", lambda t: Image.open(mk.gray16(t, "g16.png")), OK),
    ("pil-exif-6-image", lambda t: Image.open(mk.exif_jpeg(6)(t)), OK),
    ("float-array-nan", lambda t: np.full((4, 4, 3), np.nan, np.float32), fails(r"NaN or infinite")),
    ("two-channel-array", lambda t: np.zeros((4, 4, 2), np.uint8), fails(r"array of shape \(4, 4, 2\)")),
    ("empty-array", lambda t: np.zeros((0, 5, 3), np.uint8), fails(r"empty")),
    ("complex-array", lambda t: np.zeros((4, 4), np.complex64), fails(r"unsupported image dtype complex64")),
    ("a-list", lambda t: [[0, 1], [2, 3]], fails(r"cannot use a list as an image")),
    ("pil-lazy-truncated", _lazy_truncated, fails(r"cannot read the image")),
]


@pytest.mark.parametrize("make, expect", [pytest.param(m, e, id=i) for i, m, e in ARRAYS])
def test_api_objects(make, expect, tmp_path, tiny_model):
    obj = make(tmp_path)
    got = check_api(expect, lambda: load_image(obj))
    if expect.ok:
        h, w = (mk.W, mk.H) if isinstance(obj, Image.Image) and obj.getexif().get(mk.EXIF_ORIENTATION) == 6 else (mk.H, mk.W)
        assert got.shape == (h, w, 3) and got.dtype == np.uint8
        r = Session(tiny_model, obj, max_new_tokens=2).ask("Segment the red circle.", answer="<seg>")
        assert r.masks.shape[1:] == (h, w)


def test_16bit_values_scale_to_8_bits(tmp_path):
    """A 16-bit PNG's values are scaled, not clipped: 257 * v reads back as v."""
    got = load_image(mk.gray16(tmp_path, "g16.png"))
    np.testing.assert_array_equal(got[..., 0], mk.pattern()[..., 0])


CASE_COUNT = len(CASES) + len(ARRAYS)
DOOR_COUNT = 3 * len(CASES) + len(ARRAYS)  # file cases: API, CLI, demo; objects: the API only
