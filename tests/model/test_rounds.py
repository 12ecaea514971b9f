"""The round engine: every door (incremental Session, full-recompute Session, predict, segment)
gives the same round, also for a prompt head that reads its round's tokens (attend_round)."""

import copy

import numpy as np
import pytest
import torch

from segllm.conversation import Conversation, Round
from segllm.model.builder import build_segllm
from segllm.model.rounds import RoundEngine
from segllm.session import Session
from tests.helpers import wake_ref_prior, with_ref_prior
from tests.tolerance import assert_close_scaled

# round 3 refers to round 1 (and round 2 too refers to round 1)
QUESTIONS = ["Segment the red circle.", "Segment the square left of instance 1.", "Segment the one near instance 1."]
ANSWER = "It is <seg>."


def _confident(module, args, out):
    # random weights give logits near 0: spread them and shift them up so every mask is
    # non-empty (later rounds must be able to refer to it)
    out.mask_logits = out.mask_logits * 1000 + 0.5
    return out


@pytest.fixture(params=["attend_round", "plain", "ref_prior"])
def model(request, make_model, tokenizer):
    cfg = copy.deepcopy(make_model().config)
    cfg.prompt_head.attend_round = request.param == "attend_round"
    if request.param == "ref_prior":  # a decoder that also reads the mask the round refers to
        with_ref_prior(cfg)
    torch.manual_seed(5)
    # float64 so the paths' different summation orders (~1e-15) cannot flip a thresholded pixel
    m = build_segllm(cfg, copy.deepcopy(tokenizer)).to(torch.float64).eval()
    if request.param == "ref_prior":
        wake_ref_prior(m)
    m.decoder.register_forward_hook(_confident)
    return m


class Script:
    """Makes greedy decoding answer ``ANSWER`` whatever the weights: a hook on the LM head that
    pushes up the next scripted token; ``restart()`` before each round."""

    def __init__(self, model):
        proc = model.processor
        self.order = proc.text_ids(ANSWER, allow_special=True, mid=True) + [proc.eos_id]
        self.step = 0
        model.llm.get_output_embeddings().register_forward_hook(self)

    def restart(self):
        self.step = 0

    def __call__(self, module, args, logits):
        logits = logits.clone()
        logits[..., self.order[min(self.step, len(self.order) - 1)]] += 1e4
        self.step += 1
        return logits


def _same(a, b):
    assert a.text == b.text
    np.testing.assert_array_equal(a.masks, b.masks)  # exactly: no pixel may differ
    assert_close_scaled(a.scores, b.scores, rel=1e-5, rtol=1e-4)


def _session(model, image, incremental, script=None, answer=None):
    s = Session(model, image, incremental=incremental, max_new_tokens=8)
    for q in QUESTIONS:
        if script is not None:
            script.restart()
        s.ask(q, answer=answer)
    return s


def test_generated_rounds_agree_through_every_door(model, image):
    """Generated answers: incremental == full recompute == predict == predict with the generated
    answer given (so the round context collected while generating is the teacher-forced one)."""
    script = Script(model)
    inc = _session(model, image, True, script)
    full = _session(model, image, False, script)
    assert inc.history[2].refs == (1,)
    for k, (a, b) in enumerate(zip(inc.history, full.history)):
        assert a.text == ANSWER and not a.forced
        _same(a, b)
        conv = inc.conversation
        open_round = Conversation(image, conv.rounds[:k] + [Round(a.question, a.refs)])
        script.restart()
        _same(model.predict(open_round, max_new_tokens=8), a)
        _same(model.predict(open_round, answer=ANSWER), a)
    assert inc._state.cache.get_seq_length() == len(model.processor.encode(inc.conversation))


def test_forced_rounds_agree_with_teacher_forced_segment(model, image):
    """Answers given as "<seg>": incremental == full recompute == predict == segment."""
    inc = _session(model, image, True, answer="<seg>")
    full = _session(model, image, False, answer="<seg>")
    conv = inc.conversation
    segs = model.segment([conv])[0]
    for k, (a, b) in enumerate(zip(inc.history, full.history)):
        _same(a, b)
        _same(model.predict(Conversation(image, conv.rounds[: k + 1]), answer="<seg>"), a)
        masks, scores = segs[k]
        np.testing.assert_array_equal(masks, a.masks)
        assert_close_scaled(scores, a.scores, rel=1e-5, rtol=1e-4)


def test_engine_rounds_on_a_dialogue(model, image):
    """The engine's own interface: encode the image once, open a dialogue, extend it round by
    round (memory read through the mask source, made once); with attend_round the prompt head
    reads the whole user turn before a one-``<seg>`` answer, and what it reads changes the prompt."""
    engine = RoundEngine(model)
    dialogue = engine.open(engine.encode_image(image))
    prefix = dialogue.lengths[0]
    first = engine.extend(dialogue, Conversation(image, [Round(QUESTIONS[0])]), masks=None, answer="<seg>")
    assert dialogue.rounds == 1 and first.masks.shape == (1, 48, 80) and first.frame_masks.shape == (1, 64, 64)
    history = [Round(QUESTIONS[0], (), first.text, list(first.masks))]
    asked = []

    def masks(k, j):
        asked.append((k, j))
        return torch.tensor(first.masks[j]), torch.as_tensor(first.boxes[j])

    captured = {}
    hook = model.prompt_head.register_forward_hook(lambda mod, args, res: captured.update(args=args))
    conv = Conversation(image, history + [Round(QUESTIONS[2], (1,))])
    second = engine.extend(dialogue, conv, masks, answer="<seg>")
    hook.remove()
    assert asked == [(1, 0)] and set(dialogue.memory) == {(1, 0)}
    assert set(dialogue.ref_maps) == ({(1, 0)} if model.uses_ref_masks else set())
    assert dialogue.rounds == 2 and dialogue.cache.get_seq_length() == len(model.processor.encode(conv_with(conv, second)))
    args = captured["args"]
    if not model.config.prompt_head.attend_round:
        assert len(args) == 1  # a plain head reads the state before <seg> only
    else:
        hidden, context, mask = args
        user_turn = len(model.processor.user_ids(conv, 1, dialogue.lengths[1])[0])
        assert context.shape[:2] == mask.shape == (1, user_turn) and mask.all()
        other = context.clone()
        other[:, :-1] = torch.randn_like(other[:, :-1])  # every state but the one before <seg>
        assert not torch.allclose(model.prompt_head(hidden, context, mask), model.prompt_head(hidden, other, mask))
    # undoing round 2 keeps round 1's memory tokens: asking round 2 again reuses them
    dialogue.truncate(1)
    assert dialogue.rounds == 1 and set(dialogue.memory) == {(1, 0)} and dialogue.cache.get_seq_length() > prefix
    again = engine.extend(dialogue, conv, masks, answer="<seg>")
    assert asked == [(1, 0)]
    np.testing.assert_array_equal(again.masks, second.masks)
    assert_close_scaled(again.scores, second.scores, rel=1e-5, rtol=1e-4)
    dialogue.truncate(0)
    assert dialogue.rounds == 0 and not dialogue.memory and not dialogue.ref_maps and dialogue.cache.get_seq_length() == prefix


def conv_with(conv, result):
    last = conv.rounds[-1]
    return Conversation(conv.image, conv.rounds[:-1] + [Round(last.question, last.refs, result.text, list(result.masks))])


def _two_objects(module, args, out):
    # every <seg> marks two squares: the left one at logit 2, the right one (the same size) at 6
    g = out.mask_logits.shape[-1]
    top, bottom, a, b, c, d = (int(g * f) for f in (0.1, 0.3, 0.1, 0.3, 0.6, 0.8))
    logits = torch.full_like(out.mask_logits, -5.0)
    logits[..., top:bottom, a:b] = 2.0
    logits[..., top:bottom, c:d] = 6.0
    out.mask_logits = logits
    return out


def test_most_confident_region_keeps_one_object_through_every_door(make_model, image):
    model = make_model().eval()
    model.decoder.register_forward_hook(_two_objects)
    got = {}
    for region in ("all", "most_confident"):
        model.config.mask_region = region
        inc = _session(model, image, True, answer="<seg>")
        full = _session(model, image, False, answer="<seg>")
        segs = model.segment([inc.conversation])[0]
        for k, (a, b) in enumerate(zip(inc.history, full.history)):
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(segs[k][0], a.masks)
        got[region] = inc.history[0].masks[0]
    both, one = got["all"], got["most_confident"]
    w = image.shape[1]
    assert both[:, : w // 2].any() and both[:, w // 2 :].any()  # "all": both squares
    assert one.any() and not one[:, : w // 2].any()  # the surer, right square alone
    np.testing.assert_array_equal(one, both & (np.arange(w) >= w // 2))


def test_edge_filter_snaps_masks_to_the_image_through_every_door(make_model):
    """With ``edge_filter`` on, every door (incremental, full recompute, segment, batch) gives the
    same masks, and a coarse mask inside a red rectangle settles onto its edges."""
    from segllm.config import EdgeFilterConfig
    from segllm.model.rounds import RoundEngine

    h, w = 48, 80
    image = np.full((h, w, 3), 120, np.uint8)
    image[12:36, 20:60] = (220, 30, 30)
    rect = np.zeros((h, w), bool)
    rect[12:36, 20:60] = True
    lower = np.full((h, w, 3), 120, np.uint8)  # a second image of the same size: its rectangle lower
    lower[15:39, 20:60] = (220, 30, 30)

    def inside(module, args, out):
        # the rectangle in the decoder's output grid (the frame is the image scaled by S/80,
        # padded below), a cell short of its edges
        cell = w / out.mask_logits.shape[-1]  # image pixels per output cell
        logits = torch.full_like(out.mask_logits, -6.0)
        logits[..., int(12 / cell) + 1: int(36 / cell) - 1, int(20 / cell) + 1: int(60 / cell) - 1] = 6.0
        out.mask_logits = logits
        return out

    model = make_model().eval()
    model.decoder.register_forward_hook(inside)
    got = {}
    for on in (False, True):
        # session 18's narrower setting: this tiny model's output cell is several frame pixels,
        # more than the bundled setting (chosen on world validation images) closes in its passes;
        # that one settles a coarse mask in tests/decoders/test_edge_filter.py
        model.config.edge_filter = EdgeFilterConfig(iterations=10 if on else 0, radius=3, sigma_space=2.5, sigma_colour=0.03)
        inc = _session(model, image, True, answer="<seg>")
        full = _session(model, image, False, answer="<seg>")
        segs = model.segment([inc.conversation])[0]
        engine = RoundEngine(model)
        batch = engine.open_batch([image, lower])  # two rows of one frame size, post-processed together
        first = engine.extend_batch(batch, {0: Conversation(image, [Round(QUESTIONS[0])]),
                                            1: Conversation(lower, [Round(QUESTIONS[0])])}, None)
        for k, (a, b) in enumerate(zip(inc.history, full.history)):
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(segs[k][0], a.masks)
        np.testing.assert_array_equal(first[0].masks, inc.history[0].masks)
        alone = Session(model, lower, max_new_tokens=8).ask(QUESTIONS[0], answer="<seg>")
        np.testing.assert_array_equal(first[1].masks, alone.masks)  # each row follows its own image
        assert on == (not np.array_equal(first[0].masks, first[1].masks))
        got[on] = inc.history[0].masks[0]
    iou = {on: (m & rect).sum() / (m | rect).sum() for on, m in got.items()}
    assert iou[False] < 0.75 and iou[True] > 0.9, iou
