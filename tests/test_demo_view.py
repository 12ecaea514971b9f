"""The demo's view helpers without a browser: which round the view shows, the legend's HTML,
boxes from two clicks, and the displayed image (overlay, enlargement, a pending corner)."""

import numpy as np
import pytest

pytest.importorskip("gradio")
from segllm.demo import (  # noqa: E402
    SHOW_ALL,
    box_from_corners,
    display_image,
    legend_html,
    paint_canvas,
    painted_mask,
    parse_show,
    show_choices,
)
from segllm.errors import ConversationError, MaskError, SegLLMError  # noqa: E402
from segllm.session import Session  # noqa: E402
from segllm.viz import colour  # noqa: E402


@pytest.fixture
def session(confident_model, image):
    """Three rounds on the 48x80 test image: a box region, a question, a point region."""
    s = Session(confident_model, image, max_new_tokens=5)
    s.add_region(box=(4, 6, 20, 30), label="the <b>cup</b>")
    s.ask("Segment the one right of instance 1.", answer="It is <seg>.")
    s.add_region(point=(60, 10))
    return s


def test_show_choices_and_parse_show():
    assert show_choices(0) == [("All rounds", SHOW_ALL)]
    assert show_choices(2) == [("All rounds", SHOW_ALL), ("Round 1", "1"), ("Round 2", "2")]
    assert parse_show(SHOW_ALL, 3) is None and parse_show(None, 3) is None and parse_show("", 3) is None
    assert parse_show("2", 3) == 2 and parse_show(3, 3) == 3
    assert parse_show("4", 3) is None and parse_show("0", 3) is None  # a round undone meanwhile: every round
    with pytest.raises(SegLLMError, match="cannot show 'two'"):
        parse_show("two", 3)


def test_box_from_corners_holds_both_clicked_pixels():
    assert box_from_corners((10, 20), (4, 3)) == (4, 3, 11, 21)
    assert box_from_corners((4, 3), (10, 20)) == (4, 3, 11, 21)
    assert box_from_corners((7, 7), (7, 7)) == (7, 7, 8, 8)  # one pixel


def test_legend_marks_the_round_shown_alone(session):
    every = legend_html(session)
    assert every.count('class="segllm-round"') == 3 and "data-shown" not in every
    assert 'data-round="1"' in every and "(your region)" in every and "refers to 1" in every
    assert "&lt;b&gt;cup&lt;/b&gt;" in every and "<b>cup</b>" not in every  # the user's label is escaped
    assert "&lt;seg&gt;" not in every and every.count('class="segllm-mask"') == 3  # a chip per mask
    one = legend_html(session, 2)
    assert one.count('data-shown="true"') == 1 and one.count('data-shown="false"') == 2
    assert 'data-round="2" data-shown="true"' in one and 'title="show every round"' in one
    assert 'title="show round 1 alone"' in one


def test_display_image_shows_one_round_alone_or_every_round(session, image):
    h, w = image.shape[:2]
    region1 = session.history[0].masks[0]
    region3 = session.history[2].masks[0]
    every = np.asarray(display_image(session))
    assert every.shape == (h, w, 3)
    np.testing.assert_array_equal(every, np.asarray(session.overlay()))
    alone = np.asarray(display_image(session, show=3))
    np.testing.assert_array_equal(alone, np.asarray(session.overlay([3])))
    # round 1's box is tinted in the combined view and untouched when round 3 is shown alone
    inside1 = region1 & ~region3
    assert not np.array_equal(every[inside1], image[inside1])
    np.testing.assert_array_equal(alone[inside1], image[inside1])
    # round 3's disk is tinted towards its colour in both
    centre = (10, 60)
    assert region3[centre]
    for shown in (every, alone):
        assert np.abs(shown[centre].astype(int) - colour(3)).sum() < np.abs(image[centre].astype(int) - colour(3)).sum()
    # pixels outside every mask (and away from the number labels) are the image's
    outside = ~np.any([m for r in session.history for m in r.masks], axis=0)
    outside[:12] = False
    np.testing.assert_array_equal(alone[outside], image[outside])


def test_display_image_enlarges_with_crisp_pixels_and_marks_a_pending_corner(session):
    small = np.asarray(display_image(session, show=1))
    big = np.asarray(display_image(session, show=1, scale=4))
    assert big.shape == (4 * small.shape[0], 4 * small.shape[1], 3)
    np.testing.assert_array_equal(big[::4, ::4], small)  # nearest neighbour: every pixel a 4x4 block
    marked = np.asarray(display_image(session, show=1, scale=4, corner=(40, 30)))
    changed = np.argwhere(np.any(marked != big, axis=2))
    assert len(changed) > 0
    # the cross sits on the clicked pixel's centre, (40.5, 30.5) * 4, and nowhere else
    cy, cx = changed.mean(axis=0)
    assert abs(cx - 162) <= 1 and abs(cy - 122) <= 1
    assert changed[:, 1].min() >= 162 - 9 and changed[:, 1].max() <= 162 + 9


def test_session_overlay_of_chosen_rounds(session):
    np.testing.assert_array_equal(np.asarray(session.overlay([1, 2, 3])), np.asarray(session.overlay()))
    assert not np.array_equal(np.asarray(session.overlay([1])), np.asarray(session.overlay([2])))
    with pytest.raises(ConversationError, match="no round 4: the conversation has 3"):
        session.overlay([4])


def test_painted_mask_is_every_image_pixel_a_stroke_touches():
    layer = np.zeros((12, 16, 4), np.uint8)  # a 3x4 image shown 4x enlarged
    layer[5, 9, 3] = 255  # one canvas pixel in image pixel (row 1, column 2)
    layer[0:2, 0:2] = (255, 0, 255, 40)  # a faint stroke still counts
    other = np.zeros_like(layer)
    other[11, 15, 3] = 1
    m = painted_mask([layer, other], (3, 4))
    expected = np.zeros((3, 4), bool)
    expected[1, 2] = expected[0, 0] = expected[2, 3] = True
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(painted_mask([layer[:3, :4]], (3, 4)), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(MaskError, match="nothing is painted"):
        painted_mask([np.zeros_like(layer)], (3, 4))
    with pytest.raises(MaskError, match="nothing is painted"):
        painted_mask(None, (3, 4))
    with pytest.raises(MaskError, match="the painted layer is 12x12, not a canvas of the 4x3 image"):
        painted_mask([np.zeros((12, 12, 4), np.uint8)], (3, 4))


def test_paint_canvas_enlarges_small_images_and_shrinks_large_ones():
    small = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)
    big = paint_canvas(small, 4)
    assert big.shape == (12, 16, 3)
    np.testing.assert_array_equal(big[::4, ::4], small)
    mid = np.zeros((600, 900, 3), np.uint8)
    assert paint_canvas(mid) is mid  # within the limit: as it is
    large = np.zeros((1500, 3000, 3), np.uint8)
    canvas = paint_canvas(large)
    assert canvas.shape == (512, 1024, 3)
    # a stroke on the shrunk canvas covers the image pixels under it
    layer = np.zeros((512, 1024, 4), np.uint8)
    layer[100:110, 200:300, 3] = 255
    m = painted_mask([layer], (1500, 3000))
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max() + 1) == (293, 322) and (xs.min(), xs.max() + 1) == (586, 879)
    assert m.sum() == (322 - 293) * (879 - 586)
