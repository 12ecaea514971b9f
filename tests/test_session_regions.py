"""A region the user gives is a round: later rounds refer to it and its mask feeds the memory."""

import json

import numpy as np
import pytest

from segllm.errors import MaskError
from segllm.session import REGION_LABEL, Session
from tests.helpers import box_mask


@pytest.fixture
def model(confident_model):
    return confident_model


def _play(model, image, incremental, region, question="Segment the square left of instance 1."):
    s = Session(model, image, incremental=incremental, max_new_tokens=5)
    s.ask("Segment the red circle.", answer="<seg>")
    user = s.add_region(mask=region, label="the cup")
    later = s.ask(question, answer="It is <seg>.")
    return s, user, later


def test_a_region_round_is_recorded_as_given(model, image):
    region = box_mask(*image.shape[:2], 10, 30, 20, 50)
    s, user, later = _play(model, image, True, region)
    assert user.round == 2 and user.user and user.question == "Segment the cup." and user.refs == ()
    np.testing.assert_array_equal(user.masks[0], region)
    np.testing.assert_array_equal(user.boxes[0], [20, 10, 50, 30])
    assert later.round == 3 and later.refs == (1,)
    assert s.conversation.rounds[1].masks[0] is not None and s.conversation.rounds[1].answer == "<seg>"


def test_incremental_equals_full_recompute_with_a_region(model, image):
    region = box_mask(*image.shape[:2], 10, 30, 20, 50)
    q = "Segment the one near instance 2."
    _, _, inc = _play(model, image, True, region, q)
    _, _, full = _play(model, image, False, region, q)
    assert inc.refs == full.refs == (2,)
    np.testing.assert_array_equal(inc.masks, full.masks)


def test_the_memory_reads_the_users_mask(model, image):
    """A later round that refers to the region answers differently for a different region; one
    that does not refer to it is the same whatever the region (its text is the same)."""
    h, w = image.shape[:2]
    a, b = box_mask(h, w, 10, 30, 20, 50), box_mask(h, w, 40, 60, 0, 20)
    scores = {}
    for name, region in (("a", a), ("b", b)):
        for q in ("Segment the one near instance 2.", "Segment the blue star."):
            scores[name, q] = _play(model, image, True, region, q)[2].scores
    assert not np.allclose(scores["a", "Segment the one near instance 2."], scores["b", "Segment the one near instance 2."], rtol=1e-9, atol=0)
    np.testing.assert_array_equal(scores["a", "Segment the blue star."], scores["b", "Segment the blue star."])


def test_box_and_point_regions(model, image):
    h, w = image.shape[:2]
    s = Session(model, image)
    r = s.add_region(box=(5.0, 8.0, 25.0, 20.0))
    assert r.question == f"Segment {REGION_LABEL}."
    assert r.masks[0].sum() == 20 * 12 and r.masks[0][8:20, 5:25].all()
    np.testing.assert_allclose(r.boxes[0], [5, 8, 25, 20])
    clipped = s.add_region(box=(-10, -10, 4, 3))  # clipped to the image
    np.testing.assert_allclose(clipped.boxes[0], [0, 0, 4, 3])
    p = s.add_region(point=(30, 40), point_radius=3)
    m = p.masks[0]
    assert m[40, 30] and not m[40, 34] and m.sum() == pytest.approx(np.pi * 9, rel=0.35)
    default = s.add_region(point=(0, 0)).masks[0]
    assert default[0, 0] and default.sum() == 3  # a quarter of the radius-2 disk (pixel centres within 2 px)
    assert [r.round for r in s.history] == [1, 2, 3, 4]
    s.undo()
    assert len(s.history) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of mask, box or point; got none"),
        ({"box": (0, 0, 5, 5), "point": (1, 1)}, "got box, point"),
        ({"mask": np.zeros((3, 3), bool)}, "region mask is 3x3 but the image is"),
        ({"mask": "zeros"}, "region mask is"),
        ({"box": (500, 500, 600, 600)}, "covers no pixel"),
        ({"box": (1, 2, 3)}, "four numbers"),
        ({"point": (-1, 5)}, "outside the"),
        ({"point": "middle"}, "two numbers"),
    ],
)
def test_bad_regions_are_refused_and_leave_the_session_usable(model, image, kwargs, message):
    s = Session(model, image)
    with pytest.raises(MaskError, match=message):
        s.add_region(**kwargs)
    with pytest.raises(MaskError, match="empty"):
        s.add_region(mask=np.zeros(image.shape[:2], bool))
    assert s.history == []
    assert s.ask("Segment the red circle.", answer="<seg>").round == 1


def test_session_json_marks_user_rounds(model, image):
    s, _, _ = _play(model, image, True, box_mask(*image.shape[:2], 10, 30, 20, 50))
    anns = json.loads(json.dumps(s.to_coco()))["annotations"]
    assert [a["user"] for a in anns] == [False, True, False]
    assert anns[1]["bbox"] == [20.0, 10.0, 30.0, 20.0] and anns[1]["score"] == 1.0


def test_a_region_for_a_model_whose_memory_reads_the_decoder_frame(model, image):
    """The released memory path: the crop is cut in the decoder's square frame, so the region
    is kept there too (padding included) and a later round refers to it."""
    model.config.memory.crop_frame = "decoder"
    region = box_mask(*image.shape[:2], 10, 30, 20, 50)
    s, user, later = _play(model, image, True, region, "Segment the one near instance 2.")
    size = model.decoder.image_size
    assert user.frame_masks.shape == (1, size, size) and user.frame_masks.any()
    scale = size / max(image.shape[:2])
    ys, xs = np.nonzero(user.frame_masks[0])
    assert abs(xs.min() - 20 * scale) <= 1 and abs(ys.max() + 1 - 30 * scale) <= 1
    assert later.refs == (2,) and s.referable(2)
