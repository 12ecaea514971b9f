"""Incremental sessions give what full recomputation gives, round after round."""

import numpy as np
import pytest

from segllm.errors import ContextTooLongError, ConversationError, MaskError
from segllm.session import Session
from tests.tolerance import assert_close_scaled

QUESTIONS = [
    "Segment the red circle.",
    "Segment the square left of instance 1.",
    "Can you segment the blue star?",
    "the one near instance 2",
    "Where is the table? [REF:1]",
    "Segment the red circle near instance 3.",
    "It is next to instance 5 and instance 1.",
    "Segment the star left of instance 7.",
]


@pytest.fixture
def model(confident_model):
    return confident_model


def _run(model, image, incremental, script):
    s = Session(model, image, incremental=incremental, max_new_tokens=5)
    out = []
    for step in script:
        if step == "undo":
            s.undo()
        else:
            q, answer = step
            out.append(s.ask(q, answer=answer))
    return s, out


def _same(a, b):
    assert a.text == b.text
    assert a.refs == b.refs
    np.testing.assert_array_equal(a.masks, b.masks)
    assert_close_scaled(a.scores, b.scores, rel=1e-5, rtol=1e-4)


@pytest.mark.parametrize("forced", [False, True])
def test_eight_rounds_incremental_equals_full(model, image, forced):
    script = [(q, "It is <seg>." if forced else None) for q in QUESTIONS]
    s_inc, inc = _run(model, image, True, script)
    s_full, full = _run(model, image, False, script)
    assert len(inc) == 8
    for a, b in zip(inc, full):
        _same(a, b)
    assert inc[4].refs == (1,) and inc[6].refs == (1, 5)
    # the cache holds exactly the rendered conversation
    enc = model.processor.encode(s_inc.conversation)
    assert s_inc._state.cache.get_seq_length() == len(enc)


def test_undo_in_the_middle(model, image):
    script = [(q, None) for q in QUESTIONS[:4]] + ["undo", "undo"] + [(q, None) for q in QUESTIONS[2:]]
    s_inc, inc = _run(model, image, True, script)
    s_full, full = _run(model, image, False, script)
    assert [r.round for r in s_inc.history] == list(range(1, 9))
    for a, b in zip(s_inc.history, s_full.history):
        _same(a, b)
    # and the same as a session that never asked the undone rounds
    fresh = Session(model, image, max_new_tokens=5)
    for q in QUESTIONS:
        fresh.ask(q)
    for a, b in zip(s_inc.history, fresh.history):
        _same(a, b)


def test_reset_and_set_image(model, image):
    s = Session(model, image, max_new_tokens=3)
    first = s.ask(QUESTIONS[0])
    s.ask(QUESTIONS[1])
    s.reset()
    assert s.history == []
    _same(s.ask(QUESTIONS[0]), first)
    s.set_image(image[::-1].copy())
    assert s.history == [] and s.ask(QUESTIONS[0]).round == 1


def test_bad_input_leaves_the_session_usable(model, image):
    s = Session(model, image, max_new_tokens=3)
    s.ask(QUESTIONS[0])
    length = s._state.cache.get_seq_length()
    with pytest.raises(ConversationError, match="refers to round 9"):
        s.ask("Segment it [REF:9]")
    with pytest.raises(ConversationError, match="empty"):
        s.ask("   ")
    with pytest.raises(ConversationError, match="empty"):
        s.ask("[REF:1]")
    assert len(s.history) == 1 and s._state.cache.get_seq_length() == length
    second = s.ask(QUESTIONS[1])
    ref = Session(model, image, max_new_tokens=3)
    ref.ask(QUESTIONS[0])
    _same(second, ref.ask(QUESTIONS[1]))
    with pytest.raises(ConversationError, match="no image"):
        Session(model).ask("hello")


def test_reference_to_empty_mask(model, image):
    s = Session(model, image, max_new_tokens=3)
    r = s.ask(QUESTIONS[0])
    r.masks[:] = False  # as if round 1 found nothing
    with pytest.raises(MaskError, match="mask is empty"):
        s.ask("near instance 1")


def test_forced_mask_when_no_seg(model, image):
    eos = model.processor.eos_id

    def no_seg(module, args, logits):
        logits = logits.clone()
        logits[..., eos] += 1e4  # answer with nothing at all
        return logits

    h = model.llm.get_output_embeddings().register_forward_hook(no_seg)
    try:
        for inc in (True, False):
            s = Session(model, image, incremental=inc)
            r = s.ask(QUESTIONS[0])
            assert r.forced and r.text == "<seg>" and r.masks.shape[0] == 1
            s2 = Session(model, image, incremental=inc, force_mask=False)
            assert s2.ask(QUESTIONS[0]).masks.shape[0] == 0
    finally:
        h.remove()


def test_context_limit(model, image):
    s = Session(model, image, max_new_tokens=3)
    with pytest.raises(ContextTooLongError):
        for _ in range(200):
            s.ask("Segment the red circle near the blue star, please, thanks.", answer="<seg>")
    n = len(s.history)
    assert n > 5
    s.undo()
    s.ask("Segment the red circle.", answer="<seg>")  # still usable after the error
    assert len(s.history) == n


def test_referable_says_what_ask_accepts(model, image):
    """A mask only in the decoder frame's padding is empty at image resolution: such a round
    cannot be referred to, and referable() says so before ask() raises."""
    s = Session(model, image, max_new_tokens=5)
    s.ask("Segment the red circle.", answer="<seg>")
    assert s.referable(1)
    s.history[0].masks[:] = False  # as if the model's mask fell wholly into the padding
    assert s.history[0].frame_masks.any() and not s.referable(1)
    with pytest.raises(MaskError, match="round 1, whose mask is empty"):
        s.ask("the one near [REF:1]", answer="<seg>")
