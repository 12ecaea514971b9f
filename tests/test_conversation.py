import numpy as np
import pytest
from PIL import Image

from segllm.conversation import Conversation, Round, load_image, parse_refs
from segllm.errors import ConversationError, ImageError, MaskError
from tests.conftest import box_mask


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
