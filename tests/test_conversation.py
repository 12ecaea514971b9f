import numpy as np
import pytest
from PIL import Image

from segllm.conversation import Conversation, Round, image_size, load_image, parse_refs
from segllm.errors import ConversationError, ImageError, MaskError
from tests.helpers import box_mask, png_declaring


def test_parse_refs_macro_and_instance():
    text, refs = parse_refs("Segment the bag that instance 3 is carrying. [REF:1][REF: 3]")
    assert text == "Segment the bag that instance 3 is carrying."
    assert refs == (1, 3)
    assert parse_refs("Segment the dog.") == ("Segment the dog.", ())
    assert parse_refs("near instance 2", instance_mentions=False) == ("near instance 2", ())


def test_load_image_conversions(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert load_image(gray).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    out = load_image(rgba)
    assert out.shape == (3, 4, 3) and out[0, 0, 0] == 200
    sixteen = np.full((2, 2), 65535, np.uint16)
    assert load_image(sixteen)[0, 0, 0] == 255
    assert load_image(np.full((2, 2, 3), 0.5, np.float32))[0, 0, 0] == 128
    Image.fromarray(np.full((5, 6), 40000, np.uint16)).save(tmp_path / "g16.png")
    im = load_image(tmp_path / "g16.png")
    assert im.shape == (5, 6, 3) and im.dtype == np.uint8 and abs(int(im[0, 0, 0]) - 156) <= 1
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (5, 6, 3)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ImageError, match="at most 16"):
        load_image(np.zeros((10, 20, 3), np.uint8), max_side=16)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((2, 2), np.nan))


def _conv(image, *rounds):
    return Conversation(image, list(rounds))


def test_decompression_bomb_is_an_image_error_naming_the_file(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 60000, 60000)  # 3.6 gigapixels declared in ~60 bytes
    with pytest.raises(ImageError, match=r"bomb\.png.*too large to decode safely"):
        load_image(bomb)
    # a limit above Pillow's own still gets the package's error, never Pillow's
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(bomb, max_side=100_000)


def test_size_limit_is_checked_from_the_header_before_decoding(tmp_path, recwarn):
    # the file declares 9000 x 2 but holds one short row: decoding it would fail as truncated, so
    # the size error proves the limit was applied before any pixel was decoded
    liar = png_declaring(tmp_path / "wide.png", 9000, 2)
    with pytest.raises(ImageError, match=r"wide\.png is 9000x2; the longest side may be at most 8192"):
        load_image(liar)
    with pytest.raises(ImageError, match=r"cannot read image .*wide\.png"):  # within the limit: the truncation
        load_image(liar, max_side=9000)
    # an image over Pillow's warning threshold but within max_side reads without Pillow's warning
    png_declaring(tmp_path / "many.png", 10000, 10000)
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "many.png", max_side=10000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _exif_jpeg(path, orientation: int) -> np.ndarray:
    """A 4 x 8 JPEG (left half dark, right half bright) with an EXIF orientation tag."""
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, 4:] = 250
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)
    return pixels


def test_exif_orientation_is_applied(tmp_path):
    stored = _exif_jpeg(tmp_path / "photo.jpg", 6)  # 6: shown rotated 90 degrees clockwise
    shown = load_image(tmp_path / "photo.jpg")
    assert shown.shape == (8, 4, 3)
    # rotated clockwise, the stored left (dark) half is on top and the right (bright) half below
    assert shown[:3].mean() < 30 and shown[5:].mean() > 220
    assert stored.shape == (4, 8, 3)
    with Image.open(tmp_path / "photo.jpg") as im:  # a PIL image given directly: the same
        assert load_image(im).shape == (8, 4, 3)
    _exif_jpeg(tmp_path / "upright.jpg", 1)
    assert load_image(tmp_path / "upright.jpg").shape == (4, 8, 3)
    # the header-only size agrees with what load_image returns
    assert image_size(tmp_path / "photo.jpg") == (8, 4) and image_size(tmp_path / "upright.jpg") == (4, 8)
    with pytest.raises(ImageError, match="bomb"):
        image_size(png_declaring(tmp_path / "bomb.png", 60000, 60000))


def test_validate_errors(image):
    h, w = image.shape[:2]
    m = box_mask(h, w, 1, 5, 1, 5)
    with pytest.raises(ConversationError, match="refers to round 2"):
        _conv(image, Round("a", (), "<seg>", [m]), Round("b", (2,), "<seg>", [m])).validate()
    with pytest.raises(ConversationError, match="refers to round 3"):
        _conv(image, Round("a", (), "<seg>", [m]), Round("b", (3,))).validate(allow_open_last=True)
    with pytest.raises(ConversationError, match="round 1 refers to round 0|no earlier round"):
        _conv(image, Round("a", (0,), "<seg>", [m])).validate()
    with pytest.raises(ConversationError, match="question is empty"):
        _conv(image, Round("  ", (), "<seg>", [m])).validate()
    with pytest.raises(MaskError, match="zero area"):
        _conv(image, Round("a", (), "<seg>", [np.zeros((h, w), bool)]), Round("b", (1,))).validate(allow_open_last=True)
    with pytest.raises(MaskError, match="differs from the image"):
        _conv(image, Round("a", (), "<seg>", [np.ones((3, 3), bool)])).validate()
    with pytest.raises(MaskError, match="2 <seg> but 1 mask"):
        _conv(image, Round("a", (), "<seg> <seg>", [m])).validate()
    with pytest.raises(ConversationError, match="has no answer"):
        _conv(image, Round("a"), Round("b")).validate(allow_open_last=True)


def test_referenced_masks(three_rounds):
    refs = three_rounds.referenced_masks(2)
    assert [k for k, _ in refs] == [1]
    assert refs[0][1] is three_rounds.rounds[0].masks[0]
