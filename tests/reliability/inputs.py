"""Bad and unusual inputs, made at test time in a temp folder (nothing large is committed).

Each maker writes one file (or folder) under the folder it is given and returns its path. The
images share one asymmetric pattern (:func:`pattern`), so a test can tell a rotated, flipped or
transposed reading from the displayed one.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, features
from pycocotools import mask as mask_utils

H, W = 24, 40  # the stored size of most test images: not square, so a swap of sides shows

EXIF_ORIENTATION = 0x0112
# what each EXIF orientation asks a viewer to do to the stored pixels, as numpy ops ([H, W, C])
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def pattern(h: int = H, w: int = W) -> np.ndarray:
    """An RGB uint8 image whose every row and column differs (a gradient plus a corner block)."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    a[: max(1, h // 4), : max(1, w // 4)] = (250, 20, 20)  # top-left marker
    return a


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, rows: bytes, *, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG from raw filtered scanlines (each row: filter byte 0 + samples)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


# -- images ------------------------------------------------------------------------------------
def _save(folder: Path, name: str, im: Image.Image, **kw) -> Path:
    path = folder / name
    im.save(path, **kw)
    return path


def rgb(folder: Path, name: str, fmt: str | None = None, **kw) -> Path:
    return _save(folder, name, Image.fromarray(pattern()), format=fmt, **kw)


def mode(folder: Path, name: str, m: str, **kw) -> Path:
    """The pattern converted to Pillow mode ``m`` (1, L, P, LA, RGBA, CMYK, I, F)."""
    im = Image.fromarray(pattern())
    if m in ("I", "F"):
        im = im.convert("L").convert(m)
    elif m == "LA":
        im = im.convert("L").convert("LA")
    else:
        im = im.convert(m)
    return _save(folder, name, im, **kw)


def gray16(folder: Path, name: str, **kw) -> Path:
    """A 16-bit grayscale image (Pillow mode I;16), values over the whole 16-bit range."""
    a = pattern()[..., 0].astype("<u2") * 257
    return _save(folder, name, Image.frombytes("I;16", (W, H), a.tobytes()), **kw)


def png16_rgb(folder: Path, name: str = "rgb16.png") -> Path:
    """A 16-bit-per-channel RGB PNG (48 bits a pixel), which Pillow cannot write itself."""
    a = pattern().astype(">u2") * 257
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(H))
    path = folder / name
    path.write_bytes(png_bytes(W, H, rows, bit_depth=16, colour=2))
    return path


def palette_transparent(folder: Path, name: str = "p_trns.png") -> Path:
    im = Image.fromarray(pattern()).convert("P")
    return _save(folder, name, im, transparency=0)


def exif_jpeg(orientation: int) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        return _save(folder, f"exif{orientation}.jpg", Image.fromarray(pattern()), quality=95, exif=exif.tobytes())

    return make


def exif_png(folder: Path) -> Path:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _save(folder, "exif6.png", Image.fromarray(pattern()), exif=exif.tobytes())


def animated_gif(folder: Path) -> Path:
    first = Image.fromarray(pattern()).convert("P")
    second = Image.fromarray(255 - pattern()).convert("P")
    return _save(folder, "anim.gif", first, save_all=True, append_images=[second], duration=100, loop=0)


def multipage_tiff(folder: Path) -> Path:
    first = Image.fromarray(pattern())
    second = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    return _save(folder, "pages.tif", first, save_all=True, append_images=[second])


def sized(h: int, w: int, name: str) -> Callable[[Path], Path]:
    """A PNG of ``h`` x ``w`` pixels (a real one, all pixels present)."""

    def make(folder: Path) -> Path:
        return _save(folder, name, Image.fromarray(np.full((h, w, 3), 90, np.uint8)))

    return make


def pnm16(folder: Path) -> Path:
    """A 16-bit PGM (maxval 65535)."""
    a = (pattern()[..., 1].astype(">u2") * 257)
    path = folder / "gray16.pgm"
    path.write_bytes(f"P5 {W} {H} 65535\n".encode() + a.tobytes())
    return path


def png_declaring(width: int, height: int, name: str) -> Callable[[Path], Path]:
    """A few-byte PNG whose header declares ``width`` x ``height`` but holds one short row."""

    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(png_bytes(width, height, b"\x00" + b"\x00" * 3 * min(width, 16)))
        return path

    return make


def gif_declaring(folder: Path) -> Path:
    """A GIF whose logical screen and only frame declare 65535 x 65535 pixels; the data is tiny."""
    head = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    path = folder / "huge.gif"
    path.write_bytes(head + frame + b"\x3b")
    return path


def bmp_declaring(folder: Path) -> Path:
    """A BMP header declaring 30000 x 30000 24-bit pixels, followed by a few bytes of data."""
    info = struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54)
    path = folder / "huge.bmp"
    path.write_bytes(head + info + b"\x00" * 64)
    return path


def jpeg_declaring(folder: Path) -> Path:
    """A small real JPEG whose frame header (SOF0) is patched to declare 60000 x 60000 pixels."""
    buf = io.BytesIO()
    Image.fromarray(pattern()).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    path = folder / "huge.jpg"
    path.write_bytes(bytes(data))
    return path


def truncated(name: str, fmt: str) -> Callable[[Path], Path]:
    """The first half of a real image file."""

    def make(folder: Path) -> Path:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
        path = folder / name
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return path

    return make


def broken_crc(folder: Path) -> Path:
    """A PNG whose image data chunk fails its checksum."""
    rows = b"".join(b"\x00" + pattern()[y].tobytes() for y in range(H))
    data = bytearray(png_bytes(W, H, rows))
    idat = data.index(b"IDAT")
    n = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + n] ^= 0xFF  # the CRC's first byte
    path = folder / "badcrc.png"
    path.write_bytes(bytes(data))
    return path


def raw_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def jpeg_named_png(folder: Path) -> Path:
    return rgb(folder, "actually_a_jpeg.png", "JPEG", quality=95)


def directory(folder: Path) -> Path:
    path = folder / "folder.png"
    path.mkdir()
    return path


def missing(folder: Path) -> Path:
    return folder / "no_such_image.png"


HAS_WEBP = features.check("webp")


# -- conversation records (the package's own dataset folder) -----------------------------------
@dataclass
class Folder:
    """A dataset folder: one image, COCO annotations and conversation lines (raw text allowed)."""

    anns: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    annotations_text: str | None = None  # replaces annotations.json's content when given


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def good_folder() -> Folder:
    """Two objects on a 24 x 40 image and one valid two-round conversation referring back."""
    a = np.zeros((H, W), bool)
    a[2:10, 3:15] = True
    b = np.zeros((H, W), bool)
    b[12:22, 20:36] = True
    anns = [{"id": i, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(m.sum()), "bbox": [0, 0, 1, 1],
             "segmentation": _rle(m)} for i, m in ((1, a), (2, b))]
    record = {"id": "ok", "image": "img.png", "image_id": 1, "rounds": [
        {"question": "Segment the red circle.", "refs": [], "answer": "<seg>", "mask_ids": [1]},
        {"question": "Segment the square left of instance 1.", "refs": [1], "answer": "It is <seg>.", "mask_ids": [2]},
    ]}
    return Folder(anns, [json.dumps(record)])


def write_folder(folder: Path, spec: Folder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern()).save(folder / "img.png")
    coco = {"images": [{"id": 1, "file_name": "img.png", "height": H, "width": W}], "annotations": spec.anns,
            "categories": [{"id": 1, "name": "thing"}]}
    (folder / "annotations.json").write_text(spec.annotations_text if spec.annotations_text is not None else json.dumps(coco))
    (folder / "conversations.jsonl").write_text("\n".join(spec.lines) + "\n")
    return folder


def with_record(change: Callable[[dict], dict | str | list]) -> Folder:
    """The good folder plus one more line: the good record changed by ``change`` (a dict is
    written as JSON, a string as is)."""
    spec = good_folder()
    rec = change(json.loads(spec.lines[0]))
    spec.lines.append(rec if isinstance(rec, str) else json.dumps(rec))
    return spec


def with_annotation(change: Callable[[dict], None]) -> Folder:
    """The good folder plus annotation 3 (a copy of 2 changed in place by ``change``) and a
    second record whose round 2 uses it."""
    spec = good_folder()
    bad = json.loads(json.dumps(spec.anns[1]))
    bad["id"] = 3
    change(bad)
    spec.anns.append(bad)
    rec = json.loads(spec.lines[0])
    rec["id"], rec["rounds"][1]["mask_ids"] = "bad", [3]
    spec.lines.append(json.dumps(rec))
    return spec
