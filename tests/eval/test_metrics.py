import numpy as np
import pytest

from segllm.eval.metrics import RoundMetrics, box_iou, mask_box


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
