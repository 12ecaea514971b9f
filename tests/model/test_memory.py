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


def test_box_of_a_host_mask_is_its_tight_box():
    """box_of's host path (numpy) gives mask_boxes' box: scattered pixels, one pixel, edges, empty."""
    enc = MaskMemoryEncoder(MemoryConfig(), 8)
    rng = np.random.default_rng(3)
    masks = [torch.from_numpy(rng.random((9, 13)) > 0.93) for _ in range(20)]
    masks += [torch.zeros(9, 13, dtype=torch.bool), torch.ones(9, 13, dtype=torch.bool)]
    masks[0] = torch.zeros(9, 13, dtype=torch.bool)
    masks[0][8, 12] = True
    for m in masks:
        assert enc.box_of(m).tolist() == mask_boxes(m[None])[0].tolist()


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
