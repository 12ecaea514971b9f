"""Training on the model's own earlier masks (``loss.own_ref_prob``): the decoder's referenced-mask
input becomes the model's own prediction of that mask for the share of ``<seg>`` asked, the
rest keep the ground truth, and the option is off at inference and by default."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from segllm.config import LossConfig
from segllm.conversation import Conversation, Round
from segllm.decoders.base import SEG
from segllm.errors import ConfigError
from segllm.model.builder import build_segllm
from segllm.train.objective import own_ref_masks, referenced_seg_rows, training_loss
from tests.helpers import box_mask, wake_ref_prior, with_ref_prior


@pytest.fixture
def ref_model(make_model, tokenizer):
    cfg = with_ref_prior(copy.deepcopy(make_model().config))
    torch.manual_seed(3)
    return wake_ref_prior(build_segllm(cfg, copy.deepcopy(tokenizer))).train()


def _conversations(image) -> list[Conversation]:
    h, w = image.shape[:2]
    a, b, c = box_mask(h, w, 5, 20, 10, 30), box_mask(h, w, 25, 40, 40, 70), box_mask(h, w, 0, 10, 0, 10)
    first = Conversation(image, [
        Round("Segment the red circle.", (), "<seg>", [a]),
        Round("Segment the square left of instance 1.", (1,), "It is <seg>.", [b]),
        Round("Segment the one near instance 2.", (2,), "Sure, <seg>.", [c]),
    ])
    second = Conversation(image, [
        Round("Segment all the red objects.", (), "From left to right: <seg> and <seg>.", [a, b]),
        Round("Segment the second of instance 1 from the left.", (1,), "It is <seg>.", [b]),
    ])
    return [first, second]


def _decoder_refs(model, batch) -> list[torch.Tensor]:
    """The referenced masks the decoder receives during ``training_loss`` (one per decoding)."""
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["ref_masks"].clone()), with_kwargs=True)
    try:
        training_loss(model, batch)
    finally:
        hook.remove()
    return seen


def test_rows_point_at_the_seg_that_answered_the_referenced_mask(ref_model, image):
    batch = ref_model.prepare(_conversations(image))
    # conversation 1: rows 0, 1, 2 (round 2 refers to round 1, round 3 to round 2);
    # conversation 2: rows 3, 4 answer round 1's two masks; row 5 refers to round 1, whose
    # referenced mask is its first (a round that refers to a several-mask round reads the first)
    assert referenced_seg_rows(batch.encoded).tolist() == [-1, 0, 1, -1, -1, 3]


def test_own_masks_replace_the_ground_truth_for_the_share_asked(ref_model, image):
    batch = ref_model.prepare(_conversations(image))
    gt = batch.ref_masks.clone()
    with torch.no_grad():
        hidden = ref_model.hidden_states(batch)
        own = ref_model.decode_segs(hidden, batch)[0].mask_logits[:, SEG] > 0
    rows = torch.tensor([-1, 0, 1, -1, -1, 3])
    assert not torch.equal(own[rows[rows >= 0]], gt[rows >= 0].bool())  # a random model's masks are not the truth

    # off by default: the decoder reads the ground truth once
    assert ref_model.config.loss.own_ref_prob == 0
    (refs,) = _decoder_refs(ref_model, batch)
    assert torch.equal(refs, gt)

    # all of them: a gradient-free decoding first (with the truth) of only the answers referred
    # to (rows 0, 1 and 3), then the own masks
    ref_model.config.loss = dataclasses.replace(ref_model.config.loss, own_ref_prob=1.0)
    first, second = _decoder_refs(ref_model, batch)
    assert torch.equal(first, gt[[0, 1, 3]])
    expected = gt.clone()
    expected[rows >= 0] = own[rows[rows >= 0]].to(gt.dtype)
    assert torch.equal(second, expected)
    assert torch.equal(batch.ref_masks, gt)  # the batch itself is left as it was

    # half of them, drawn from torch's generator: the same draw gives the same rows
    out = []
    for _ in range(2):
        torch.manual_seed(11)
        out.append(own_ref_masks(ref_model, hidden, batch, ref_model.encode_decoder_image(batch.decoder_input()), 0.5).ref_masks)
    assert torch.equal(out[0], out[1])
    replaced = [(not torch.equal(out[0][i], gt[i])) for i in range(len(gt))]
    assert not any(replaced[i] for i in (0, 3, 4))  # rows that refer to no answered mask never change
    assert 0 < sum(replaced[i] for i in (1, 2, 5)) < 3, replaced  # this draw replaces some, not all

    # a reference to a pick round keeps the ground truth (its later targets assume the recorded pick)
    convs = _conversations(image)
    convs[0] = dataclasses.replace(convs[0], alternatives={1: [0, 1]})  # round 2 was a pick round
    picked = ref_model.prepare(convs)
    assert picked.ref_pick.tolist() == [False, False, True, False, False, False]
    first, second = _decoder_refs(ref_model, picked)
    expected[2] = gt[2]
    assert torch.equal(second, expected)

    # in eval mode (inference) the option does nothing
    ref_model.eval()
    (refs,) = _decoder_refs(ref_model, batch)
    assert torch.equal(refs, gt)


def test_own_ref_prob_must_be_a_probability():
    with pytest.raises(ConfigError, match="own_ref_prob"):
        LossConfig(own_ref_prob=1.5)
