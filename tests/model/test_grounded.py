"""The grounded design's parts: convolutional encoders, dense attribute heads, per-part clipping."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from segllm.config import DenseConfig, SamDecoderConfig, VisionConfig
from segllm.conversation import Conversation
from segllm.decoders.convnet import ConvBackbone, coordinate_channels
from segllm.errors import ConfigError, ConversationError
from segllm.model.builder import build_segllm
from segllm.model.dense_head import IGNORE_LABEL, target_labels
from segllm.model.segllm import SegLLM
from segllm.presets import tiny_config
from segllm.train.objective import selection_loss, training_loss
from tests.tolerance import assert_close_scaled

GROUPS = {"colour": 3, "shape": 4}


def tiny_grounded(vocab: int):
    cfg = tiny_config(vocab)
    cfg.vision = VisionConfig(
        hf_config={"model_type": "segllm_conv", "image_size": 64, "stride": 16, "width": 16, "depth": 1, "hidden_size": 32},
        image_size=64,
    )
    cfg.decoder = SamDecoderConfig(image_size=64, patch_size=8, encoder="conv", encoder_dim=16, encoder_depth=1, dim=32, depth=1, heads=2, mlp_dim=64)
    cfg.dense = DenseConfig(groups=dict(GROUPS))
    return cfg


@pytest.fixture
def grounded(tokenizer):
    torch.manual_seed(0)
    return build_segllm(tiny_grounded(len(tokenizer)), copy.deepcopy(tokenizer))


def with_dense(conv: Conversation) -> Conversation:
    """The conversation with dense maps: colour 1 and shape 2 inside round 1's mask, colour 2
    inside round 2's; background 0 elsewhere."""
    h, w = conv.size
    colour = np.zeros((h, w), np.int16)
    shape = np.zeros((h, w), np.int16)
    colour[conv.rounds[0].masks[0]] = 1
    shape[conv.rounds[0].masks[0]] = 2
    colour[conv.rounds[1].masks[0]] = 2
    return Conversation(conv.image, conv.rounds, dense={"colour": colour, "shape": shape})


def test_conv_backbone_grid_and_position_awareness():
    torch.manual_seed(0)
    net = ConvBackbone(64, 8, 16, 1, 24)
    out = net(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 24, 8, 8)
    # a blank image still gives different features in different places: coordinates are an input
    assert not torch.allclose(out[0, :, 0, 0], out[0, :, 7, 7])
    xy = coordinate_channels(1, 4, 4, device="cpu", dtype=torch.float32)
    assert xy[0, 0, 0, 0] < xy[0, 0, 0, 3] and xy[0, 1, 0, 0] < xy[0, 1, 3, 0]  # x grows rightwards, y downwards
    with pytest.raises(ValueError, match="stride"):
        ConvBackbone(64, 32, 16, 1, 24)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        net(torch.zeros(1, 3, 32, 32))


def test_conv_vision_tower_tokens_and_pool(grounded):
    v = grounded.vision
    assert v.num_tokens == 16  # 64 px at stride 16 -> 4x4, the pooled token dropped
    x = torch.randn(2, 3, 64, 64)
    assert v(x).shape == (2, 16, 32)
    pooled = v.pool(x)
    assert pooled.shape == (2, 32)
    assert_close_scaled(pooled, v(x).mean(dim=1), rel=1e-5)  # its "CLS" is the mean token


def test_bad_conv_vision_config_names_the_key(tokenizer):
    cfg = tiny_grounded(len(tokenizer))
    cfg.vision.hf_config = {**cfg.vision.hf_config, "colour": 3}
    with pytest.raises(ConfigError, match="segllm_conv"):
        build_segllm(cfg, copy.deepcopy(tokenizer))
    with pytest.raises(ConfigError, match="dense.on"):
        DenseConfig(groups=GROUPS, on=("llm",))
    with pytest.raises(ConfigError, match="class count"):
        DenseConfig(groups={"colour": 1})
    DenseConfig(groups={"colour": 2**15})  # ids 0 .. 32,767: the int16 class maps hold them
    with pytest.raises(ConfigError, match="int16"):
        DenseConfig(groups={"colour": 2**15 + 1})


def test_dense_loss_is_part_of_the_loss_and_trains_the_encoders(grounded, three_rounds):
    model = grounded.train()
    conv = with_dense(three_rounds)
    batch = model.prepare([conv])
    assert batch.dense_vision.shape == (1, 2, 64, 64) and batch.dense_decoder.shape == (1, 2, 64, 64)
    # the 48x80 image is padded at the bottom in the decoder's square frame: unsupervised there
    assert (batch.dense_decoder[0, :, 40:, :] == IGNORE_LABEL).all()
    assert (batch.dense_decoder[0, :, :38, :] != IGNORE_LABEL).all()
    # small integers, not int64: the maps are most of what a data-loader worker hands over
    assert batch.dense_vision.dtype == batch.dense_decoder.dtype == torch.int16
    out = training_loss(model, batch)
    assert out.dense_loss is not None and out.dense_loss > 0
    w = model.config.loss
    rest = w.lm * out.lm_loss + w.mask_weight * out.mask_loss + w.dice_weight * out.dice_loss + w.ref_weight * out.ref_loss + w.iou_weight * out.iou_loss
    assert torch.allclose(out.loss, rest + w.dense_weight * out.dense_loss)
    model.zero_grad()
    out.dense_loss.backward()
    groups = model.part_parameters()
    for part in ("vision", "decoder_encoder", "dense_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[part]), part
    # without dense maps (inference data, other datasets) the model trains as before
    plain = training_loss(model, model.prepare([three_rounds]))
    assert plain.dense_loss is None


def test_dense_heads_learn_the_labels(grounded, three_rounds):
    """A few steps on the dense loss alone bring it well down: the heads and encoders fit it."""
    model = grounded.train()
    batch = model.prepare([with_dense(three_rounds)])
    params = [p for part in ("vision", "decoder_encoder", "dense_head") for p in model.part_parameters()[part]]
    opt = torch.optim.Adam(params, lr=3e-3)
    first = None
    for _ in range(30):
        loss = training_loss(model, batch).dense_loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_target_labels_are_the_most_common_object_class_under_the_mask():
    dense = {"colour": np.array([[0, 1, 1], [2, 2, 2]]), "shape": np.zeros((2, 3), np.int16)}
    masks = [np.array([[1, 1, 1], [1, 1, 1]], bool), np.array([[1, 1, 0], [0, 0, 0]], bool), np.zeros((2, 3), bool)]
    got = target_labels(dense, masks, ["colour", "shape"])
    # colour 2 (3 pixels) beats 1 (2) and background; the second mask is 1 pixel of background and
    # 1 of colour 1; shape is background everywhere and the empty mask covers nothing: unknown
    assert got.tolist() == [[2, IGNORE_LABEL], [1, IGNORE_LABEL], [IGNORE_LABEL, IGNORE_LABEL]]


def test_the_target_head_teaches_each_prompt_its_object(tokenizer, three_rounds):
    cfg = tiny_grounded(len(tokenizer))
    cfg.dense = DenseConfig(groups=dict(GROUPS), on=("decoder", "target"))
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer)).train()
    batch = model.prepare([with_dense(three_rounds)])
    # round 1's target has colour 1 and shape 2; round 2's colour 2 and no shape; round 3's target
    # lies in round 1's box corner only partly: whatever covers most of it
    assert batch.seg_attrs.shape == (3, 2)
    assert batch.seg_attrs[0].tolist() == [1, 2] and batch.seg_attrs[1].tolist() == [2, IGNORE_LABEL]
    only_image = copy.deepcopy(model)
    only_image.config.dense = DenseConfig(groups=dict(GROUPS), on=("decoder",))
    with_target, without = training_loss(model, batch).dense_loss, training_loss(only_image, only_image.prepare([with_dense(three_rounds)])).dense_loss
    assert with_target > without  # the target term is added
    # with the target head alone, the dense loss is the target term: the prompts learn it
    only_target = copy.deepcopy(model)
    only_target.config.dense = DenseConfig(groups=dict(GROUPS), on=("target",))
    params = [p for part in ("llm", "prompt_head", "dense_head") for p in only_target.part_parameters()[part]]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = training_loss(only_target, batch).dense_loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


def test_missing_label_group_is_named(grounded, three_rounds):
    conv = with_dense(three_rounds)
    conv.dense.pop("shape")
    with pytest.raises(ConversationError, match="shape"):
        grounded.prepare([conv])


def test_grounded_checkpoint_round_trip(grounded, three_rounds, tmp_path):
    model = grounded.eval()
    grounded.save_pretrained(tmp_path / "m")
    again = SegLLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.dense.groups == GROUPS and again.config.decoder.encoder == "conv"
    a = model.segment([three_rounds])[0]
    b = again.segment([three_rounds])[0]
    for (ma, sa), (mb, sb) in zip(a, b):
        assert np.array_equal(ma, mb)
        assert_close_scaled(sa, sb, rel=1e-5, rtol=1e-4)


def with_candidates(conv: Conversation, alternatives=None) -> Conversation:
    """Candidates: each round's target, plus one distractor object."""
    h, w = conv.size
    from tests.helpers import box_mask

    masks = [r.masks[0] for r in conv.rounds] + [box_mask(h, w, 30, 45, 0, 20)]
    return Conversation(conv.image, conv.rounds, candidates=np.stack(masks), candidate_groups=np.zeros(len(masks), np.int64),
                        alternatives=alternatives)


def test_selection_loss_picks_the_target_among_the_images_objects(make_model, three_rounds):
    model = make_model().train()
    model.config.loss.select_weight = 1.0
    conv = with_candidates(three_rounds)
    batch = model.prepare([conv, conv.truncated(1)])
    assert batch.cand_masks.shape[0] == 8 and batch.seg_pool.shape == (4, 8)
    # each <seg> chooses among its own image's 4 candidates; the right one is its round's mask
    assert batch.seg_pool.sum(dim=1).tolist() == [4, 4, 4, 4]
    assert batch.seg_valid.nonzero().tolist() == [[0, 0], [1, 1], [2, 2], [3, 4]]
    out = training_loss(model, batch)
    assert out.select_loss is not None and out.select_loss > 0
    w = model.config.loss
    rest = w.lm * out.lm_loss + w.mask_weight * out.mask_loss + w.dice_weight * out.dice_loss + w.ref_weight * out.ref_loss + w.iou_weight * out.iou_loss
    assert torch.allclose(out.loss, rest + out.select_loss)
    # off by default, and without candidates
    model.config.loss.select_weight = 0.0
    assert model.prepare([conv]).seg_pool is None


def test_selection_loss_by_hand(make_model, three_rounds):
    model = make_model().train()
    model.config.loss.select_weight = 1.0
    batch = model.prepare([with_candidates(three_rounds.truncated(1), alternatives={0: [0, 1]})])
    h = w = model.decoder.output_size
    logits = torch.full((1, h, w), -5.0)
    cand = batch.cand_masks
    logits[0][cand[1] > 0.5] = 3.0  # the model prefers candidate 1, also a right answer here
    loss, targets = selection_loss(logits, batch.seg_targets, batch)
    scores = (logits.flatten(1) @ cand.flatten(1).T) / cand.flatten(1).sum(1)
    p = scores.softmax(dim=1)[0]
    assert loss.item() == pytest.approx(-torch.log(p[0] + p[1]).item(), rel=1e-5)
    assert torch.equal(targets[0], cand[1])  # the pixel losses follow the right answer it chose


def test_prompt_head_reads_its_rounds_tokens(make_model, three_rounds, tokenizer):
    cfg_model = make_model()
    cfg = copy.deepcopy(cfg_model.config)
    cfg.prompt_head.attend_round = True
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer)).train()
    batch = model.prepare([three_rounds, three_rounds.truncated(2)])
    enc = batch.encoded[0]
    # each <seg> reads its own round from the round's first token up to the state before it
    first = batch.seg_context[0]
    start = enc.round_spans[0][0]
    assert first[first >= 0].tolist() == list(range(start, enc.segs[0].pos))
    assert batch.seg_context.shape[0] == 5
    out = training_loss(model, batch)
    out.mask_loss.backward()
    assert model.prompt_head.kv.weight.grad.abs().sum() > 0  # the round's states reach the masks
    # what a round says changes its prompt even where the state before <seg> would not see it
    hidden = torch.randn(1, 4, model.prompt_head.mlp[0].in_features)
    ctx_mask = torch.tensor([[True, True, False, False]])
    a = model.prompt_head(hidden[:, 0], hidden, ctx_mask)
    b = model.prompt_head(hidden[:, 0], torch.cat([hidden[:, :2], torch.randn(1, 2, hidden.shape[-1])], 1), ctx_mask)
    assert torch.allclose(a, b)  # padding is not read
    with pytest.raises(ValueError, match="attend_round"):
        model.prompt_head(hidden[:, 0])
    segs = model.eval().segment([three_rounds])[0]
    assert [m.shape for m, _ in segs] == [(1, 48, 80)] * 3


def test_the_direct_decoders_attribute_matching_trains_from_dense_and_named_labels(tokenizer, three_rounds):
    from segllm.decoders.direct import DirectDecoderConfig

    cfg = tiny_grounded(len(tokenizer))
    cfg.decoder = DirectDecoderConfig(image_size=64, stride=4, encoder_width=16, encoder_depth=1, dim=32, fuse_dim=16, context_grid=4, heads=2, attributes=dict(GROUPS))
    cfg.dense = DenseConfig(groups=dict(GROUPS), on=("vision",))
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer)).train()
    conv = with_dense(three_rounds)
    conv.named = [{"colour": 1, "shape": 2}, {"colour": 2}, {}]  # round 3 names nothing
    batch = model.prepare([conv])
    assert batch.seg_named.tolist() == [[1, 2], [2, 0], [0, 0]]
    out = training_loss(model, batch)
    # the attribute terms come on top of the vision tower's dense term
    assert out.dense_loss > model.dense_head.loss("vision", *_vision_features(model, batch))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = out.dense_loss.item()
    for _ in range(30):
        loss = training_loss(model, batch).dense_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    # a config whose decoder groups differ from the dense labels is refused
    cfg.decoder.attributes = {"colour": 3}
    with pytest.raises(ConfigError, match="dense.groups"):
        build_segllm(cfg, copy.deepcopy(tokenizer))


def _vision_features(model, batch):
    patches = model.vision(batch.vision_input())
    g = int(round(patches.shape[1] ** 0.5))
    return patches.reshape(patches.shape[0], g, g, -1), batch.dense_vision


def test_decoder_maps_are_built_only_where_a_loss_reads_them(tokenizer, grounded, three_rounds):
    cfg = tiny_grounded(len(tokenizer))
    cfg.dense = DenseConfig(groups=dict(GROUPS), on=("vision",))
    torch.manual_seed(0)
    model = build_segllm(cfg, copy.deepcopy(tokenizer)).train()
    conv = with_dense(three_rounds)
    batch = model.prepare([conv])
    assert batch.dense_decoder is None and batch.dense_vision.shape == (1, 2, 64, 64)
    # the vision maps do not depend on whether the decoder's are built too
    both = grounded.prepare([conv])
    assert both.dense_decoder is not None and torch.equal(batch.dense_vision, both.dense_vision)
    assert set(batch.dense_vision[0, 0].unique().tolist()) == {0, 1, 2}  # squashed: no padding
    out = training_loss(model, batch)
    assert out.dense_loss is not None and torch.isfinite(out.dense_loss) and out.dense_loss > 0


def test_group_loss_is_the_mean_cross_entropy_over_supervised_labels_per_group():
    from segllm.model.dense_head import group_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 3 + 4)
    labels = torch.tensor([[0, 1], [2, IGNORE_LABEL], [IGNORE_LABEL, 3], [1, 0], [IGNORE_LABEL, IGNORE_LABEL], [0, 2]], dtype=torch.int16)
    want = []
    for i, (lo, n) in enumerate([(0, 3), (3, 4)]):
        keep = labels[:, i] != IGNORE_LABEL
        want.append(torch.nn.functional.cross_entropy(logits[keep, lo : lo + n], labels[keep, i].long()))
    assert_close_scaled(group_loss(GROUPS, logits, labels), (want[0] + want[1]) / 2)
    # a group with no supervised label adds nothing (and no NaN)
    none = labels.clone()
    none[:, 1] = IGNORE_LABEL
    assert_close_scaled(group_loss(GROUPS, logits, none), want[0] / 2)
    assert group_loss(GROUPS, logits, torch.full_like(labels, IGNORE_LABEL)) == 0


def test_a_dense_map_two_fields_share_moves_once(grounded, three_rounds):
    # where both frames hold the image as it is (the world's square images) the batch carries one
    # dense map for both fields (a batch of 256 world conversations: 42 MB); moving the batch
    # keeps it one
    batch = grounded.prepare([with_dense(three_rounds)])
    assert batch.dense_decoder is not batch.dense_vision  # not square here: two maps
    moved = batch.to("meta")
    assert moved.dense_decoder is not moved.dense_vision and moved.dense_decoder.shape == batch.dense_decoder.shape
    shared = dataclasses.replace(batch, dense_decoder=batch.dense_vision).to("meta")
    assert shared.dense_decoder is shared.dense_vision and shared.dense_vision.device.type == "meta"
    assert shared.input_ids.device.type == "meta"
