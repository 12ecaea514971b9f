"""Mask helpers of the decoder interface (segllm/decoders/base.py)."""

import torch

from segllm.decoders.base import most_confident_region


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
