"""The colour-guided edge filter: masks a pixel or two off an object's edge settle onto it."""

import dataclasses

import pytest
import torch

from segllm.config import EdgeFilterConfig, SegLLMConfig
from segllm.decoders import edge_filter
from segllm.decoders.edge_filter import colour_guided_filter
from segllm.errors import ConfigError

SETTINGS = {"iterations": 10, "radius": 3, "sigma_space": 2.5, "sigma_colour": 0.03, "margin": 6}


def _scene():
    """A 64 x 64 grey image with a red 20 x 28 rectangle (rows 20-39, columns 16-43) and a thin
    red bar attached to its right side (rows 28-31, columns 44-51); the object's mask."""
    image = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    obj = torch.zeros(64, 64, dtype=torch.bool)
    obj[20:40, 16:44] = True
    obj[28:32, 44:52] = True
    image[:, obj] = torch.tensor([220, 30, 30], dtype=torch.uint8)[:, None]
    return image, obj


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_a_coarse_mask_settles_onto_the_object():
    image, obj = _scene()
    # the decoder's coarse answer: the rectangle with rounded, shrunk edges, the thin bar missed,
    # and a pixel of spill onto the background at the top
    coarse = torch.zeros(64, 64, dtype=torch.bool)
    coarse[22:38, 18:42] = True
    coarse[19, 25:35] = True
    logits = torch.where(coarse, 4.0, -4.0)[None]
    got = colour_guided_filter(logits, image, **SETTINGS)[0] > 0
    before, after = _iou(coarse, obj), _iou(got, obj)
    assert before < 0.8 and after > 0.95, (before, after)
    assert not (got & ~obj).any()  # the spill onto the grey background is gone
    assert got[20:40, 16:44].all()  # the rectangle to its edges; the thin bar only its first pixel
    assert got[28:32, 44].all() and not got[28:32, 46:].any()


def test_the_bundled_setting_settles_a_coarse_mask_too():
    from segllm.default import DEFAULT_EDGE_PASSES

    image, obj = _scene()
    coarse = torch.zeros(64, 64, dtype=torch.bool)
    coarse[22:38, 18:42] = True
    coarse[19, 25:35] = True
    bundled = dataclasses.asdict(EdgeFilterConfig(iterations=DEFAULT_EDGE_PASSES))
    got = colour_guided_filter(torch.where(coarse, 4.0, -4.0)[None], image, **bundled)[0] > 0
    assert _iou(got, obj) > 0.95 and not (got & ~obj).any()


def test_only_each_masks_box_changes_and_per_mask_images():
    image, obj = _scene()
    other = torch.full((3, 64, 64), 128, dtype=torch.uint8)  # a plain grey image: nothing to follow
    coarse = torch.zeros(2, 64, 64, dtype=torch.bool)
    coarse[:, 22:38, 18:42] = True
    logits = torch.where(coarse, 4.0, -4.0)
    logits[:, 0, 0] = -9.0  # far outside the masks' boxes (grown by the margin): kept as given
    got = colour_guided_filter(logits, torch.stack([image, other]), **SETTINGS)
    assert torch.equal(got[:, :10], logits[:, :10]) and torch.equal(got[:, 50:], logits[:, 50:])
    assert _iou(got[0] > 0, obj) > 0.95  # its own image: the object
    assert _iou(got[1] > 0, obj) < 0.8  # a featureless image: the filter only blurs its corners
    single = colour_guided_filter(logits[:1], image, **SETTINGS)
    torch.testing.assert_close(single[0], got[0])


def test_off_empty_and_bad_shapes():
    image, _ = _scene()
    logits = torch.randn(3, 64, 64)
    assert colour_guided_filter(logits, image, **{**SETTINGS, "iterations": 0}) is logits
    empty = torch.full((1, 64, 64), -3.0)  # no pixel above 0: left as it is
    assert torch.equal(colour_guided_filter(empty, image, **SETTINGS), empty)
    assert colour_guided_filter(torch.zeros(0, 64, 64), image, **SETTINGS).shape == (0, 64, 64)
    with pytest.raises(ValueError, match="same M and S"):
        colour_guided_filter(logits, image[:, :32, :32], **SETTINGS)
    with pytest.raises(ValueError, match="same M and S"):
        colour_guided_filter(logits, image[None].expand(2, -1, -1, -1), **SETTINGS)
    half = colour_guided_filter(logits.half(), image, **SETTINGS)
    assert half.dtype == torch.float16


def test_config_is_off_by_default_checked_and_saved():
    assert not SegLLMConfig().edge_filter.on
    cfg = SegLLMConfig(edge_filter=EdgeFilterConfig(iterations=10))
    assert cfg.edge_filter.on
    assert SegLLMConfig.from_dict(cfg.to_dict()).edge_filter == cfg.edge_filter
    old = cfg.to_dict()
    del old["edge_filter"]  # a checkpoint saved before the filter existed: off
    assert not SegLLMConfig.from_dict(old).edge_filter.on
    for bad in ({"iterations": -1}, {"radius": 0}, {"sigma_colour": 0.0}, {"margin": -2}):
        with pytest.raises(ConfigError, match="edge_filter"):
            dataclasses.replace(EdgeFilterConfig(), **bad)


def _direct(logits, image, *, iterations, radius, sigma_space, sigma_colour, margin):
    """The filter's definition pixel by pixel (slow; small frames only): each mask's box, its
    border repeated outward, every pass a weighted mean of the neighbours' probabilities."""
    out = logits.clone()
    s = logits.shape[-1]
    colours = image.double() / 255.0
    for i in range(logits.shape[0]):
        ys, xs = (logits[i] > 0).nonzero(as_tuple=True)
        if ys.numel() == 0:
            continue
        y0, y1 = max(0, int(ys.min()) - margin), min(s, int(ys.max()) + 1 + margin)
        x0, x1 = max(0, int(xs.min()) - margin), min(s, int(xs.max()) + 1 + margin)
        p = logits[i, y0:y1, x0:x1].double().sigmoid()
        h, w = p.shape
        c = colours[:, y0:y1, x0:x1]
        weights = {}
        for y in range(h):
            for x in range(w):
                row = []
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        ny, nx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
                        d2 = float(((c[:, y, x] - c[:, ny, nx]) ** 2).sum())
                        row.append((ny, nx, torch.exp(torch.tensor(-(dy * dy + dx * dx) / (2 * sigma_space**2) - d2 / (2 * sigma_colour**2)))))
                total = sum(float(wt) for _, _, wt in row)
                weights[y, x] = [(ny, nx, float(wt) / total) for ny, nx, wt in row]
        for _ in range(iterations):
            p = torch.tensor([[sum(wt * float(p[ny, nx]) for ny, nx, wt in weights[y, x]) for x in range(w)] for y in range(h)], dtype=torch.float64)
        out[i, y0:y1, x0:x1] = torch.logit(p.clamp(1e-6, 1 - 1e-6)).float()
    return out


def test_equals_the_filters_definition_at_the_frames_borders_and_edges():
    # masks touching the frame's corner and side (neighbours repeated at the box's border) and
    # one in the middle, on an image with a colour edge through them
    g = torch.Generator().manual_seed(3)
    image = torch.full((3, 20, 20), 90, dtype=torch.uint8)
    image[:, :, 9:] = torch.tensor([200, 60, 20], dtype=torch.uint8)[:, None, None]
    image += torch.randint(0, 6, (3, 20, 20), generator=g, dtype=torch.uint8)  # slight texture
    logits = torch.full((3, 20, 20), -3.0) + torch.randn(3, 20, 20, generator=g)
    logits[0, :5, :6] = 3.0
    logits[1, 8:13, 15:] = 2.5
    logits[2, 7:12, 6:12] = 3.5
    settings = {**SETTINGS, "iterations": 3, "margin": 2}
    want, got = _direct(logits, image, **settings), colour_guided_filter(logits, image, **settings)
    torch.testing.assert_close(got.sigmoid(), want.sigmoid(), rtol=0, atol=1e-5)
    assert torch.equal(got > 0, want > 0)


def test_masks_filtered_in_several_groups_equal_one_group(monkeypatch):
    image, _ = _scene()
    logits = torch.full((3, 64, 64), -4.0)
    logits[0, 22:38, 18:42] = 4.0
    logits[1, 5:15, 5:15] = 3.0
    logits[2, 40:60, 30:60] = 2.0
    whole = colour_guided_filter(logits, image, **SETTINGS)
    monkeypatch.setattr(edge_filter, "_GROUP_ENTRIES", 1)  # every mask its own sparse matrix
    torch.testing.assert_close(colour_guided_filter(logits, image, **SETTINGS), whole)


def test_the_gather_passes_equal_the_sparse_ones(monkeypatch):
    # what a device without sparse CSR products (Apple's MPS) runs
    image, _ = _scene()
    logits = torch.full((2, 64, 64), -4.0)
    logits[0, 22:38, 18:42] = 4.0
    logits[1, 5:15, 5:15] = 3.0
    sparse = colour_guided_filter(logits, image, **SETTINGS)
    monkeypatch.setattr(edge_filter, "_sparse_ok", lambda device: False)
    torch.testing.assert_close(colour_guided_filter(logits, image, **SETTINGS), sparse)


def test_reused_workspaces_give_the_fresh_results_and_are_per_thread(monkeypatch):
    # the group arrays come from a per-thread workspace: results do not depend on what an earlier
    # call (of another size) left there, nor on filtering in two threads at once
    import threading

    image, _ = _scene()
    small, big = torch.full((1, 64, 64), -4.0), torch.full((2, 64, 64), -4.0)
    small[0, 30:36, 30:36] = 3.0
    big[0, 10:50, 10:55] = 4.0
    big[1, 5:15, 5:15] = 3.0
    monkeypatch.setattr(edge_filter, "_WORKSPACE_BYTES", 0)  # every call new memory
    fresh = [colour_guided_filter(x, image, **SETTINGS) for x in (big, small, big)]
    monkeypatch.undo()
    edge_filter._WORKSPACES.__dict__.pop("buffers", None)
    again = [colour_guided_filter(x, image, **SETTINGS) for x in (big, small, big)]  # grows, then reuses
    for a, b in zip(fresh, again):
        assert torch.equal(a, b)
    buffers = edge_filter._WORKSPACES.buffers
    cols = buffers["cols", torch.int32]
    assert cols.numel() >= 55 * 52 * 49  # the big mask's box (50 x 57 minus the frame) x 7 x 7
    got, seen = {}, {}

    def work(name, x):
        for _ in range(5):
            got[name] = colour_guided_filter(x, image, **SETTINGS)
        seen[name] = edge_filter._WORKSPACES.__dict__.get("buffers", {}).get(("cols", torch.int32))

    threads = [threading.Thread(target=work, args=(n, x)) for n, x in (("big", big), ("small", small))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert torch.equal(got["big"], fresh[0]) and torch.equal(got["small"], fresh[1])
    assert seen["big"] is not None and seen["small"] is not None and seen["big"].data_ptr() != seen["small"].data_ptr() != cols.data_ptr()
