import numpy as np
import pytest
import torch

from segllm.conversation import Conversation, Round
from segllm.errors import ContextTooLongError, ConversationError, MaskError, PlaceholderMismatchError
from segllm.train.objective import training_loss
from tests.helpers import box_mask
from tests.tolerance import assert_close_scaled


def test_training_forward_shapes_and_losses(make_model, three_rounds):
    model = make_model().train()
    batch = model.prepare([three_rounds, three_rounds.truncated(1)])
    assert batch.input_ids.shape[0] == 2
    assert batch.image_pos.shape == (2, model.vision.num_tokens)
    assert batch.memory_inputs(model.vision).shape == (2, 3, 64, 64)  # two references in the 3-round conversation
    assert batch.seg_targets.shape == (4, model.decoder.output_size, model.decoder.output_size)
    assert batch.has_ref.tolist() == [False, True, True, False]
    out = training_loss(model, batch)
    assert out.mask_logits.shape == (4, 2, model.decoder.output_size, model.decoder.output_size)
    assert out.iou_scores.shape == (4, 2)
    for name in ("loss", "lm_loss", "mask_loss", "dice_loss", "ref_loss", "iou_loss"):
        v = getattr(out, name)
        assert v.ndim == 0 and torch.isfinite(v), name
    assert out.lm_loss > 0 and out.ref_loss > 0 and out.mask_loss > 0
    w = model.config.loss
    total = w.lm * out.lm_loss + w.mask_weight * out.mask_loss + w.dice_weight * out.dice_loss + w.ref_weight * out.ref_loss + w.iou_weight * out.iou_loss
    assert torch.allclose(out.loss, total)


def test_no_reference_means_no_ref_loss(make_model, three_rounds):
    model = make_model().train()
    out = training_loss(model, model.prepare([three_rounds.truncated(1)]))
    assert out.ref_loss == 0


@pytest.mark.parametrize(
    "parts",
    [("prompt_head", "decoder"), ("projector", "memory"), ("llm",), ("embeddings", "decoder_encoder"), ("vision",)],
)
def test_gradients_reach_exactly_the_trainable_parts(make_model, three_rounds, parts):
    model = make_model()
    model.set_trainable(parts)
    model.train()
    training_loss(model, model.prepare([three_rounds])).loss.backward()
    groups = model.part_parameters()
    for name, params in groups.items():
        has_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
        if name in parts:
            # the vision tower's last layer is unused (features come from layer -2)
            need = 0.5 if name == "vision" else 0.8
            assert sum(has_grad) >= need * len(params), f"{name}: only {sum(has_grad)}/{len(params)} params got gradients"
        else:
            assert not any(p.grad is not None for p in params), f"{name} is frozen but got gradients"


def test_every_parameter_belongs_to_one_part(make_model):
    model = make_model()
    groups = model.part_parameters()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_placeholder_count_mismatch_raises(make_model, three_rounds):
    model = make_model()
    batch = model.prepare([three_rounds])
    extra = batch.input_ids.clone()
    extra[0, -2] = model.processor.image_id  # a stray placeholder no feature fills
    batch.input_ids = extra
    with pytest.raises(PlaceholderMismatchError, match="placeholder token"):
        model.embed(batch)
    batch = model.prepare([three_rounds])
    batch.memory_pos = batch.memory_pos[:1]
    batch.memory_batch = batch.memory_batch[:1]
    batch.box_pos = batch.box_pos[:1]
    batch.memory_pixels = batch.memory_inputs(model.vision)[:1]
    batch.memory_boxes = batch.memory_boxes[:1]
    with pytest.raises(PlaceholderMismatchError):
        model.embed(batch)
    batch = model.prepare([three_rounds])
    batch.memory_pos = batch.memory_pos + 1  # slot shifted off its placeholder
    with pytest.raises(PlaceholderMismatchError, match="no placeholder"):
        model.embed(batch)


def test_memory_crops_go_as_uint8_and_are_preprocessed_as_one_by_one(make_model, three_rounds):
    """Training batches carry the memory crops small and uint8 and preprocess them together on
    the model's device; that gives what the vision tower's preprocessing of each crop gives (the
    path a Session takes), crops of different sides in one product."""
    model = make_model().eval()
    later = Round("Segment the one below instance 2.", (2,), "<seg>", [three_rounds.rounds[0].masks[0]])
    convs = [three_rounds, Conversation(three_rounds.image, [*three_rounds.rounds, later])]  # round 2's mask is larger
    batch = model.prepare(convs)
    assert batch.memory_pixels is None and batch.memory_crops.dtype == torch.uint8
    assert len(set(batch.memory_sides.tolist())) > 1  # crops of several sides, padded to the largest
    assert batch.memory_crops.shape[-1] == max(batch.memory_sides.tolist()) < model.config.vision.image_size
    image = torch.tensor(three_rounds.image).permute(2, 0, 1)
    want = torch.stack([
        model.memory.inputs(image, torch.tensor(conv.rounds[it.ref_round - 1].masks[it.mask_index]), vision=model.vision)[0]
        for conv in convs for it in model.processor.encode(conv).memory
    ])
    assert_close_scaled(batch.memory_inputs(model.vision), want, rel=1e-5)
    assert batch.to("cpu").memory_sides is batch.memory_sides  # stays on the host: read there


def test_images_at_the_inputs_size_go_as_uint8_and_give_the_same_inputs(make_model, three_rounds):
    """A batch whose images are all at the vision tower's and the decoder's input size carries
    them uint8; the inputs made from them are exactly the preprocessed ones (the same operations),
    and a batch with another size carries the preprocessed inputs as before."""
    model = make_model().eval()
    s = model.config.vision.image_size
    rng = np.random.default_rng(5)
    convs = [Conversation(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), three_rounds.rounds[:1]) for _ in range(2)]
    for c in convs:
        c.rounds[0] = Round(c.rounds[0].question, (), "<seg>", [box_mask(s, s, 5, 20, 10, 30)])
    batch = model.prepare(convs)
    assert batch.image_pixels is None and batch.decoder_pixels is None and batch.images.dtype == torch.uint8
    pixels = [torch.tensor(c.image).permute(2, 0, 1) for c in convs]
    assert torch.equal(batch.vision_input(), torch.stack([model.vision.preprocess(p) for p in pixels]))
    assert torch.equal(batch.decoder_input(), torch.stack([model.decoder.preprocess(p)[0] for p in pixels]))
    assert batch.frames == [model.decoder.preprocess(p)[1] for p in pixels]
    other = model.prepare([three_rounds])  # 48 x 80: resized and padded on the host
    assert other.images is None and other.vision_input() is other.image_pixels and other.decoder_input() is other.decoder_pixels


def test_features_land_in_their_slots(make_model, three_rounds):
    model = make_model().eval()
    batch = model.prepare([three_rounds])
    with torch.no_grad():
        embeds = model.embed(batch)
        tokens = model.llm.get_input_embeddings()(batch.input_ids)
        img = model.projector(model.vision(batch.vision_input()))
        mem = model.projector(model.vision.pool(batch.memory_inputs(model.vision)))
        box = model.memory.encode_boxes(batch.memory_boxes)
    torch.testing.assert_close(embeds[0, batch.image_pos[0]], img[0])
    torch.testing.assert_close(embeds[0, batch.memory_pos], mem)
    torch.testing.assert_close(embeds[0, batch.box_pos], box)
    text = torch.ones(embeds.shape[1], dtype=torch.bool)
    text[batch.image_pos[0]] = False
    text[batch.memory_pos] = False
    text[batch.box_pos] = False
    torch.testing.assert_close(embeds[0, text], tokens[0, text])


def test_add_injection_mode(make_model, three_rounds):
    model = make_model().eval()
    model.config.inject = "add"
    batch = model.prepare([three_rounds])
    with torch.no_grad():
        embeds = model.embed(batch)
        tokens = model.llm.get_input_embeddings()(batch.input_ids)
        img = model.projector(model.vision(batch.vision_input()))
    torch.testing.assert_close(embeds[0, batch.image_pos[0]], tokens[0, batch.image_pos[0]] + img[0])


def test_memory_changes_the_answer_only_through_the_referenced_mask(make_model, three_rounds):
    """Round 3's prompt depends on round 1's mask (which it references), not on round 2's mask."""
    model = make_model().eval()
    img = three_rounds.image
    h, w = img.shape[:2]
    base = model.predict(three_rounds.truncated(2).__class__(img, three_rounds.rounds[:2] + [Round("near instance 1", (1,))]), answer="<seg>")

    def with_masks(m1, m2):
        r = three_rounds.rounds
        rounds = [Round(r[0].question, (), r[0].answer, [m1]), Round(r[1].question, (1,), r[1].answer, [m2]), Round("near instance 1", (1,))]
        return model.predict(Conversation(img, rounds), answer="<seg>")

    moved2 = with_masks(three_rounds.rounds[0].masks[0], box_mask(h, w, 0, 48, 0, 5))
    moved1 = with_masks(box_mask(h, w, 30, 48, 60, 80), three_rounds.rounds[1].masks[0])
    # masks of round 2 are not in the input at all (round 2 is not referenced by round 3, and
    # round 2's own reference is round 1): the answer is unchanged
    assert np.array_equal(base.masks, moved2.masks) and np.allclose(base.scores, moved2.scores)
    assert not np.allclose(base.scores, moved1.scores)


def test_three_round_conversation_end_to_end(make_model, three_rounds):
    """Round 3 references round 1, answered by generation and by teacher forcing."""
    model = make_model().eval()
    img = three_rounds.image
    conv = Conversation(img, three_rounds.rounds[:2] + [Round("Segment the one near instance 1.", (1,))])
    pred = model.predict(conv, max_new_tokens=6)
    assert pred.round == 3
    assert len(pred.token_ids) <= 6
    assert pred.masks.shape == (pred.text.count("<seg>"), 48, 80)
    forced = model.predict(conv, answer="It is <seg>.")
    assert forced.text == "It is <seg>."
    assert forced.masks.shape == (1, 48, 80) and forced.masks.dtype == bool
    assert forced.boxes.shape == (1, 4) and forced.scores.shape == (1,)
    if forced.masks[0].any():
        ys, xs = np.nonzero(forced.masks[0])
        assert forced.boxes[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_several_seg_give_several_masks(make_model, three_rounds):
    model = make_model().eval()
    conv = Conversation(three_rounds.image, three_rounds.rounds[:1] + [Round("both near instance 1", (1,))])
    pred = model.predict(conv, answer="<seg> and <seg>")
    assert pred.masks.shape == (2, 48, 80)
    assert pred.scores.shape == (2,)


def test_generation_matches_teacher_forcing(make_model, three_rounds):
    """Whatever greedy decoding produced, forcing that text gives the same masks."""
    model = make_model(seed=3).eval()
    conv = Conversation(three_rounds.image, three_rounds.rounds[:2] + [Round("Segment the one near instance 1.", (1,))])
    proc = model.processor
    steps = []

    def script(module, args, logits):
        # first step <seg>, then " ." , then the end token: a known answer, whatever the weights
        order = [proc.seg_id, proc.text_ids(".")[0], proc.eos_id]
        logits = logits.clone()
        logits[..., order[min(len(steps), 2)]] += 1e4
        steps.append(1)
        return logits

    model.llm.get_output_embeddings().register_forward_hook(script)
    gen = model.predict(conv, max_new_tokens=4)
    forced = model.predict(conv, answer=gen.text)
    assert gen.text == forced.text == "<seg>."
    assert gen.token_ids == forced.token_ids
    np.testing.assert_array_equal(gen.masks, forced.masks)
    assert_close_scaled(gen.scores, forced.scores, rel=1e-5, rtol=1e-4)


def test_bad_input_errors(make_model, three_rounds):
    model = make_model().eval()
    img = three_rounds.image
    r1 = three_rounds.rounds[0]
    with pytest.raises(ConversationError, match="refers to round 9"):
        model.predict(Conversation(img, [r1, Round("near instance 9", (9,))]))
    with pytest.raises(ConversationError, match="empty"):
        model.predict(Conversation(img, [r1, Round("   ")]))
    empty = Round(r1.question, (), "<seg>", [np.zeros(img.shape[:2], bool)])
    with pytest.raises(MaskError, match="zero area"):
        model.predict(Conversation(img, [empty, Round("near instance 1", (1,))]))
    with pytest.raises(ConversationError, match="no rounds"):
        model.predict(Conversation(img, []))
    long = Conversation(img, [r1] * 40 + [Round("and again", ())])
    with pytest.raises(ContextTooLongError, match=r"context holds \d+; about \d+ rounds"):
        model.predict(long)


def test_box_head_and_box_loss(make_model, three_rounds):
    from segllm.model.builder import build_segllm
    from segllm.presets import tiny_config

    base = make_model()
    cfg = tiny_config(len(base.tokenizer))
    cfg.decoder.box_head = True
    cfg.loss.box_weight = 1.0
    torch.manual_seed(0)
    model = build_segllm(cfg, base.tokenizer).train()
    out = training_loss(model, model.prepare([three_rounds]))
    assert out.box_loss > 0
    w = cfg.loss
    total = w.lm * out.lm_loss + w.mask_weight * out.mask_loss + w.dice_weight * out.dice_loss + w.ref_weight * out.ref_loss + w.iou_weight * out.iou_loss + out.box_loss
    assert torch.allclose(out.loss, total)
    out.loss.backward()
    assert model.decoder.box_head.layers[-1].weight.grad.abs().sum() > 0
    assert training_loss(base, base.prepare([three_rounds])).box_loss == 0  # no head: no term


def test_box_loss_values():
    from segllm.losses import box_loss

    b = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    assert float(box_loss(b, b, 100)) == pytest.approx(0.0, abs=1e-6)
    far = torch.tensor([[50.0, 50.0, 60.0, 60.0]])
    assert float(box_loss(far, b, 100)) > 1.0


def test_mask_targets_are_each_rounds_mask_in_the_output_frame(make_model, three_rounds):
    from segllm.decoders.base import masks_to_frame

    model = make_model().train()
    convs = [three_rounds, three_rounds.truncated(2)]
    batch = model.prepare(convs)
    out = model.decoder.output_size
    want_seg, want_ref = [], []
    for c, fr in zip(convs, batch.frames):
        for rnd in c.rounds:
            want_seg.append(masks_to_frame(torch.from_numpy(rnd.masks[0])[None], fr, out)[0])
            want_ref.append(masks_to_frame(torch.from_numpy(c.rounds[rnd.refs[0] - 1].masks[0])[None], fr, out)[0]
                            if rnd.refs else torch.zeros(out, out))
    assert torch.equal(batch.seg_targets, torch.stack(want_seg))
    assert torch.equal(batch.ref_targets, torch.stack(want_ref))
    assert batch.has_ref.tolist() == [False, True, True, False, True]


def test_memory_without_box_tokens_injects_only_mask_tokens(tokenizer, three_rounds):
    import copy

    from segllm.config import MemoryConfig
    from segllm.model.builder import build_segllm
    from segllm.presets import tiny_config

    cfg = tiny_config(len(tokenizer))
    cfg.memory = MemoryConfig(enabled=True, use_box=False)
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer)).train()
    batch = model.prepare([three_rounds])
    assert (batch.box_pos == -1).all() and batch.memory_pos.numel() == 2
    assert model.processor.box_id not in batch.input_ids.tolist()[0]
    out = training_loss(model, batch)
    assert torch.isfinite(out.loss)
    # the box encoder is not used at all: no box token anywhere in the input
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.memory.box_head.parameters())


def test_losses_from_the_batchs_precomputed_rows_equal_the_boolean_selections(make_model, three_rounds):
    import dataclasses

    model = make_model().train()
    batch = model.prepare([three_rounds, three_rounds.truncated(2)])
    assert batch.ref_index.tolist() == [1, 2, 4]
    from segllm.processor import IGNORE

    assert torch.equal(batch.lm_index, torch.nonzero((batch.labels[:, 1:] != IGNORE).reshape(-1)).view(-1))
    torch.manual_seed(0)
    new = training_loss(model, batch)
    torch.manual_seed(0)
    old = training_loss(model, dataclasses.replace(batch, ref_index=None, lm_index=None))
    for name in ("loss", "lm_loss", "ref_loss", "mask_loss"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
