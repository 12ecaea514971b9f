"""Rounds whose answer has several ``<seg>`` (one mask per target) in batch assembly and the
training objective: each ``<seg>`` gets its own target mask, in the answer's order, and training
on such rounds lowers their mask loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segllm.conversation import Conversation, Round
from segllm.data.records import WorldConversations
from segllm.data.world import WorldConfig
from segllm.decoders.base import SEG
from segllm.losses import bce_loss
from segllm.train.objective import training_loss
from segllm.train.recipe import TrainRecipe
from segllm.train.trainer import train
from tests.helpers import box_mask


def _two_targets(image) -> Conversation:
    h, w = image.shape[:2]
    a, b = box_mask(h, w, 5, 20, 5, 25), box_mask(h, w, 25, 45, 50, 75)
    return Conversation(image, [
        Round("Segment all the red objects.", (), "From left to right: <seg> and <seg>.", [a, b]),
        Round("Segment the first of instance 1 from the left.", (1,), "It is <seg>.", [a]),
    ])


def test_each_seg_of_a_round_gets_its_own_target_in_order(make_model, image) -> None:
    model = make_model().train()
    conv = _two_targets(image)
    batch = model.prepare([conv])
    out = model.decoder.output_size
    assert batch.seg_targets.shape == (3, out, out)
    assert batch.seg_batch.tolist() == [0, 0, 0]
    # the two <seg> of round 1 and the one of round 2, in token order, each its own position
    assert batch.seg_pos.tolist() == sorted(set(batch.seg_pos.tolist()))
    ids = batch.input_ids[0, batch.seg_pos].tolist()
    assert len(set(ids)) == 1 and ids[0] == model.tokenizer.convert_tokens_to_ids("<seg>")
    t = batch.seg_targets
    # each target is its own mask: round 1's two differ, round 2's is round 1's first
    assert not torch.equal(t[0], t[1])
    assert torch.equal(t[2], t[0])
    # the left mask lies left in the decoder frame, the right one right
    cols = torch.arange(out, dtype=torch.float32)
    centre = [float((m.sum(0) * cols).sum() / m.sum()) for m in t[:2]]
    assert centre[0] < out / 2 < centre[1]
    # round 2 refers to round 1: its [REF] target is round 1's first mask; round 1 has none
    assert batch.has_ref.tolist() == [False, False, True]
    assert torch.equal(batch.ref_targets[2], t[0])
    losses = training_loss(model, batch)
    assert losses.mask_logits.shape[0] == 3 and torch.isfinite(losses.loss)


def _multi_rows(convs) -> torch.Tensor:
    """[S] bool: which <seg> rows (in batch order) belong to rounds with several masks."""
    rows: list[bool] = []
    for c in convs:
        for rnd in c.rounds:
            rows += [len(rnd.masks) > 1] * rnd.num_seg
    return torch.tensor(rows, dtype=torch.bool)


def test_training_on_multi_target_world_data_lowers_their_loss(make_model) -> None:
    cfg = WorldConfig(image_size=64, min_objects=3, max_objects=5, min_rounds=2, max_rounds=3,
                      multi_target_prob=1.0)
    data = WorldConversations("train", 12, seed=3, config=cfg)
    convs = [c for c in (data[i] for i in range(12)) if any(len(r.masks) > 1 for r in c.rounds)][:2]
    assert len(convs) == 2
    model = make_model(seed=1).train()
    batch = model.prepare(convs)
    multi = _multi_rows(convs)
    assert multi.numel() == batch.seg_targets.shape[0]
    assert int(multi.sum()) >= 4  # at least two targets in each conversation's all round

    def multi_mask_loss() -> float:
        with torch.no_grad():
            out = training_loss(model, batch)
            logits = out.mask_logits[multi][:, SEG]
            return float(bce_loss(logits, batch.seg_targets[multi]))

    before = multi_mask_loss()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = last = None
    for _ in range(15):
        opt.zero_grad()
        loss = training_loss(model, batch).loss
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    after = multi_mask_loss()
    assert last < 0.8 * first, (first, last)
    assert after < 0.8 * before, (before, after)
    print(f"loss {first:.3f} -> {last:.3f}; multi-target rows mask BCE {before:.3f} -> {after:.3f}")
    # the rows' targets differ (one object each), so no single shared mask fits them all
    t = batch.seg_targets[multi]
    assert any(not torch.equal(t[i], t[i + 1]) for i in range(len(t) - 1))


def test_trainer_runs_on_multi_target_world_data_and_logs_both_scores(tmp_path) -> None:
    recipe = TrainRecipe.load(Path(__file__).resolve().parents[2] / "configs" / "test_tiny.toml", {
        "output_dir": str(tmp_path / "run"), "steps": 2, "eval_every": 2, "eval_size": 4, "save_every": 0,
        "data.world": {"multi_target_prob": 1.0}})
    train(recipe, progress=False)
    entry = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    m = entry["oracle_multi_target"]
    assert set(m) == {"matched_cIoU", "union_cIoU"}
    assert all(0.0 <= v <= 100.0 for v in m.values())
