import numpy as np
import pytest
import torch

from segllm.config import MemoryConfig
from segllm.errors import MaskError
from segllm.model.memory import MaskMemoryEncoder, mask_boxes


def test_mask_boxes_exclusive_end():
    m = torch.zeros(2, 6, 8, dtype=torch.bool)
    m[0, 2, 3] = True
    m[1, 1:4, 2:7] = True
    assert mask_boxes(m).tolist() == [[3, 2, 4, 3], [2, 1, 7, 4]]
    assert mask_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


def test_mask_boxes_are_tight_boxes_on_the_host():
    """mask_boxes' host path (numpy) against the boxes' definition, pixel by pixel: scattered
    pixels, one pixel at the far corner, full and empty masks, several at once; box_of uses it."""
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(rng.random((22, 9, 13)) > 0.93)
    masks[0] = False
    masks[0, 8, 12] = True
    masks[1], masks[2] = False, True
    want = []
    for m in masks.numpy():
        ys, xs = np.nonzero(m)
        want.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [0, 0, 0, 0])
    assert mask_boxes(masks).tolist() == want
    enc = MaskMemoryEncoder(MemoryConfig(), 8)
    assert [enc.box_of(m).tolist() for m in masks] == want


def test_crop_masks_background_and_pads_square():
    enc = MaskMemoryEncoder(MemoryConfig(), 8)
    img = torch.full((3, 10, 12), 200, dtype=torch.uint8)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True  # 3 rows x 6 cols
    mask[2, 3] = False
    crop = enc.crop(img, mask)
    assert crop.shape == (3, 6, 6)
    assert crop[:, 0, 0].tolist() == [0, 0, 0]  # background inside the box is zeroed
    assert crop[:, 0, 1].tolist() == [200] * 3
    assert crop[:, 3:].sum() == 0  # padding below
    with pytest.raises(MaskError, match="empty"):
        enc.crop(img, torch.zeros(10, 12, dtype=torch.bool))
    with pytest.raises(MaskError, match="does not fit"):
        enc.crop(img, torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("order,norm,expected", [("xyxy", 0.0, [3 / 12, 2 / 12, 9 / 12, 5 / 12]), ("yxyx", 1024.0, [2 / 1024, 3 / 1024, 5 / 1024, 9 / 1024])])
def test_normalised_boxes(order, norm, expected):
    enc = MaskMemoryEncoder(MemoryConfig(box_order=order, box_norm=norm), 8)
    mask = torch.zeros(1, 10, 12, dtype=torch.bool)
    mask[0, 2:5, 3:9] = True
    np.testing.assert_allclose(enc.normalised_boxes(mask)[0].numpy(), expected, rtol=1e-6)
    assert enc.encode_boxes(enc.normalised_boxes(mask)).shape == (1, 8)
