import numpy as np
import pytest

from segllm.eval.metrics import RoundMetrics, box_iou, mask_box, mask_scores


def _mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_round_metrics():
    m = RoundMetrics()
    gt1 = _mask(10, 10, 0, 4, 0, 4)  # 16 px
    pred1 = _mask(10, 10, 0, 4, 0, 2)  # 8 px inside: I=8, U=16, IoU .5, box IoU .5 -> miss
    gt2 = _mask(10, 10, 5, 10, 5, 10)  # 25 px
    pred2 = _mask(10, 10, 5, 10, 5, 10)  # exact
    assert m.add(1, pred1, gt1) == pytest.approx(0.5)
    assert m.add(1, pred2, gt2) == pytest.approx(1.0)
    m.add(2, np.zeros((10, 10), bool), gt1)  # empty prediction: IoU 0
    s = m.summary()
    assert s["1"]["cIoU"] == pytest.approx(100 * (8 + 25) / (16 + 25))
    assert s["1"]["mIoU"] == pytest.approx(75.0)
    assert s["1"]["P@0.5"] == pytest.approx(50.0)
    assert s["1"]["n"] == 2
    assert s["2"]["cIoU"] == 0 and s["2"]["P@0.5"] == 0
    assert s["all"]["cIoU"] == pytest.approx(100 * 33 / 57)
    assert s["all"]["n"] == 3


def test_box_helpers():
    assert mask_box(_mask(6, 6, 1, 3, 2, 5)).tolist() == [2, 1, 5, 3]
    assert mask_box(np.zeros((3, 3), bool)).tolist() == [0, 0, 0, 0]
    assert box_iou(np.array([0, 0, 2, 2]), np.array([1, 0, 3, 2])) == pytest.approx(2 / 6)
    assert box_iou(np.zeros(4), np.array([0, 0, 1, 1])) == 0


def test_predicted_box_is_used_when_given():
    m = RoundMetrics()
    gt = _mask(8, 8, 0, 4, 0, 4)
    m.add(1, gt, gt, pred_box=np.array([4, 4, 8, 8]))
    assert m.summary()["1"]["P@0.5"] == 0
    with pytest.raises(ValueError, match="differ in size"):
        m.add(1, gt, np.zeros((4, 4), bool))


def test_grounding_objects_wholes_and_parts():
    from segllm.eval.metrics import grounded, grounding

    a = _mask(10, 10, 0, 4, 0, 4)  # 16 px
    b = _mask(10, 10, 0, 4, 5, 10)  # 20 px, disjoint from a
    house = _mask(10, 10, 6, 10, 0, 6)  # 24 px, a composite...
    roof = _mask(10, 10, 6, 7, 0, 6)  # ...and its 6 px part
    objects = [a, b, house, roof]
    assert grounding(a, 0, objects) == (True, 16, 0)
    # half on a (8 px), more on b (10 px): grounded on neither a nor... b wins
    pred = _mask(10, 10, 0, 2, 0, 4) | _mask(10, 10, 0, 2, 5, 10)
    assert grounding(pred, 0, objects) == (False, 8, 10)
    assert grounded(pred, 1, objects)
    # a sloppy prediction of a, spilling into the background, is still grounded on a
    assert grounded(_mask(10, 10, 0, 6, 0, 5), 0, objects)
    # a tie is not grounded; nothing on the target is not grounded
    tie = _mask(10, 10, 0, 1, 0, 4) | _mask(10, 10, 0, 1, 5, 9)
    assert grounding(tie, 0, objects) == (False, 4, 4)
    assert grounding(np.zeros((10, 10), bool), 0, objects) == (False, 0, 0)
    # wholes and parts: the roof alone is grounded on the roof, the whole house on the house,
    # but the whole house is not a grounded answer for the roof
    assert grounded(roof, 3, objects) and grounded(house, 2, objects)
    assert grounding(house, 3, objects) == (False, 6, 18)
    with pytest.raises(ValueError, match="target index"):
        grounding(a, 4, objects)
    with pytest.raises(ValueError, match="differ in size"):
        grounding(np.zeros((5, 5), bool), 0, objects)


def test_diagnostics_slices():
    from segllm.eval.metrics import Diagnostics

    d = Diagnostics()
    d.add(1, 10, 10, 1.0, True, "attribute", True)
    d.add(4, 0, 20, 0.0, False, "positional", False)
    d.add(4, 5, 10, 0.5, True, "positional", False)
    d.add(5, 3, 10, 0.3, None)  # no scene annotations: counts in IoU, not in grounding
    s = d.summary()
    assert list(s["per_round"]) == ["1", "4", "5", "all"]
    assert s["per_round"]["4"]["grounded"] == pytest.approx(50) and s["per_round"]["4"]["IoU|grounded"] == pytest.approx(50)
    assert s["per_round"]["all"]["n"] == 4 and s["per_round"]["all"]["n_grounding"] == 3
    assert s["per_round"]["all"]["grounded"] == pytest.approx(200 / 3)
    assert s["per_round"]["5"]["grounded"] != s["per_round"]["5"]["grounded"]  # NaN
    assert s["per_family"]["positional"]["cIoU"] == pytest.approx(100 * 5 / 30)
    assert s["text_resolvable"]["true"]["n"] == 1 and s["text_resolvable"]["false"]["n"] == 2
    assert set(s["text_resolvable_late"]) == {"false"}


def test_empty_against_empty_is_iou_1_and_a_hit():
    empty = np.zeros((6, 6), bool)
    m = RoundMetrics()
    assert m.add(1, empty, empty) == 1.0
    s = m.summary()["1"]
    assert s["mIoU"] == 100.0 and s["P@0.5"] == 100.0  # the two metrics agree
    # a predicted box with area on an empty ground truth is still a miss; so is an empty prediction of a real mask
    assert mask_scores(empty, empty, np.array([0, 0, 3, 3]))[3] is False
    full = empty.copy()
    full[1:4, 1:4] = True
    assert mask_scores(empty, full)[2:] == (0.0, False)
    # the released rule (eps): IoU 0, and a miss
    assert mask_scores(empty, empty, eps=1e-4)[2:] == (0.0, False)
