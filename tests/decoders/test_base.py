"""Mask helpers of the decoder interface (segllm/decoders/base.py)."""

import pytest
import torch
import torch.nn.functional as F

from segllm.decoders.base import Frame, _block_mean, masks_to_frame, most_confident_region


def test_the_region_with_the_most_probability_mass_is_kept():
    logits = torch.full((3, 12, 12), -4.0)
    logits[0, 1:3, 1:3] = 9.0  # small and sure: mass ~4
    logits[0, 6:11, 6:11] = 1.0  # large and unsure: mass ~18, kept
    logits[1, 1:3, 1:3] = 9.0  # kept
    logits[1, 6:8, 6:8] = 0.5
    keep = most_confident_region(logits)
    assert keep.dtype == torch.bool and keep.shape == logits.shape
    assert torch.equal(keep[0], logits[0] == 1.0)
    assert torch.equal(keep[1], logits[1] == 9.0)
    assert not keep[2].any()  # nothing above the threshold: nothing kept


def test_pixels_touching_at_a_corner_are_one_region_and_a_snake_is_followed_to_its_end():
    logits = torch.full((2, 16, 16), -1.0)
    logits[0, 2, 2] = logits[0, 3, 3] = logits[0, 4, 4] = 3.0  # a diagonal line: 8-connected
    logits[0, 10, 10] = 5.0  # a brighter dot, less mass than the line
    for r in range(0, 16, 4):  # a snake across the whole map, turning at alternate ends
        logits[1, r, :] = 1.0
        if r + 2 < 16:
            logits[1, r + 1 : r + 4, 15 if r % 8 == 0 else 0] = 1.0
    logits[1, 2, 5:8] = 4.0  # a brighter bar inside the loops, apart from the snake
    keep = most_confident_region(logits)
    assert torch.equal(keep[0], logits[0] == 3.0)
    assert torch.equal(keep[1], logits[1] == 1.0)


def test_an_empty_batch():
    assert most_confident_region(torch.zeros(0, 5, 5)).shape == (0, 5, 5)


def _flood_fill_reference(logits):
    """The definition, pixel by pixel: 8-connected regions of logit > 0 by breadth-first search,
    each mask's region with the largest sum of sigmoid(logit); ties to the region met first in
    row-major order."""
    out = torch.zeros(logits.shape, dtype=torch.bool)
    m, h, w = logits.shape
    for k in range(m):
        on = (logits[k] > 0).tolist()
        p = logits[k].sigmoid().double()
        seen, best, best_mass = set(), None, -1.0
        for y in range(h):
            for x in range(w):
                if not on[y][x] or (y, x) in seen:
                    continue
                region, todo = [], [(y, x)]
                seen.add((y, x))
                while todo:
                    cy, cx = todo.pop()
                    region.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and on[ny][nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                todo.append((ny, nx))
                mass = float(sum(p[c] for c in region))
                if mass > best_mass:
                    best, best_mass = region, mass
        for c in best or ():
            out[k][c] = True
    return out


def test_equals_a_pixel_by_pixel_flood_fill_on_random_speckle():
    g = torch.Generator().manual_seed(0)
    for density in (-1.5, -0.5, 0.3):  # sparse speckle to mostly on, many regions per mask
        logits = torch.randn(6, 17, 23, generator=g) * 2 + density
        logits[3] = -1.0  # a mask with nothing on beside others that have regions
        assert torch.equal(most_confident_region(logits), _flood_fill_reference(logits))


def test_regions_do_not_join_across_masks():
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, 3, :] = 2.0  # the last row of mask 0, above the first row of mask 1
    logits[1, 0, :2] = 3.0
    logits[1, 2:, 3] = 1.0
    keep = most_confident_region(logits)
    assert torch.equal(keep[0], logits[0] > 0)
    assert torch.equal(keep[1], logits[1] == 3.0)


def test_a_nan_logit_off_the_mask_does_not_spoil_the_choice():
    logits = torch.full((1, 6, 12), -2.0)
    logits[0, 0, 2:4] = 5.0  # small and sure
    logits[0, 2:5, 6:11] = 1.0  # larger: more mass, kept
    logits[0, 2, 5] = float("nan")  # off (NaN > 0 is false), just left of the larger region
    keep = most_confident_region(logits)
    assert torch.equal(keep[0], logits[0] == 1.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_block_mean_is_area_averaging(k):
    """masks_to_frame's pooling at a whole factor: F.interpolate's area mode, exactly on 0/1 masks
    at a power-of-two factor (the bundled model's 2) and to float rounding otherwise."""
    g = torch.Generator().manual_seed(k)
    soft = torch.rand(3, 1, 12 * k, 12 * k, generator=g)
    binary = (soft > 0.6).float()
    for x, tol in ((binary, 0.0 if k & (k - 1) == 0 else 1e-6), (soft, 1e-6)):
        want = F.interpolate(x, size=(12, 12), mode="area")
        torch.testing.assert_close(_block_mean(x, k), want, atol=tol, rtol=0)
    masks = torch.rand(2, 40, 40, generator=g) > 0.5  # an image of 40 px resized into a 48 px frame, output 16: factor 3
    frame = Frame.fit(40, 40, 48)
    resized = F.interpolate(masks.float()[:, None], size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    want = F.interpolate(resized, size=(16, 16), mode="area")
    torch.testing.assert_close(masks_to_frame(masks, frame, 16), want[:, 0].clamp(0, 1), atol=1e-6, rtol=0)
