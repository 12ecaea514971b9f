"""Batched rounds that generate their answers (``RoundEngine.extend_batch`` with ``answers``
None) give what one ``Session`` per conversation gives, token for token and mask for mask, one
mask forced where an answer has none; ``BatchDialogue.undo`` takes a row's round back as
``Session.undo`` does."""

import dataclasses

import numpy as np
import pytest
import torch

from segllm.conversation import Conversation, Round
from segllm.model.rounds import RoundEngine
from segllm.session import Session
from tests.helpers import varied_answers

# (question, rounds it refers to); rows stop after 4, 2, 3 and 4 rounds
QUESTIONS = [("Segment the red circle.", ()), ("Segment the square left of instance 1.", (1,)),
             ("the one near instance 2", (2,)), ("and the blue star beside instance 1", (1,))]
ROUNDS = [4, 2, 3, 4]
SIZES = [(48, 80), (64, 64), (30, 50), (48, 80)]


@pytest.fixture(params=["plain", "ref_prior", "attend_round"])
def model(request):
    """A confident tiny model (float64: the batch's padding cannot flip a token or a pixel) whose
    answers vary (``varied_answers``). The third reads each ``<seg>``'s round context
    (prompt_head.attend_round) beside ref_prior."""
    import copy

    if request.param == "attend_round":
        from segllm.model.builder import build_segllm
        from tests.conftest import _confident
        from tests.helpers import wake_ref_prior

        cfg = copy.deepcopy(request.getfixturevalue("ref_prior_confident_model").config)
        cfg.prompt_head = dataclasses.replace(cfg.prompt_head, attend_round=True)
        torch.manual_seed(4)
        m = wake_ref_prior(build_segllm(cfg, copy.deepcopy(request.getfixturevalue("tokenizer")))).to(torch.float64).eval()
        m.decoder.register_forward_hook(_confident)
    else:
        m = copy.deepcopy(request.getfixturevalue("confident_model" if request.param == "plain" else "ref_prior_confident_model"))
    return varied_answers(m)


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _referable(result) -> bool:
    return result.masks.shape[0] > 0 and all(m.any() for m in result.masks)


def _so_far(image, history, ask: Round) -> Conversation:
    return Conversation(image, [Round(q.question, q.refs, r.text, list(r.masks)) for q, r in history] + [ask])


def test_generated_rounds_in_a_batch_answer_as_sessions(model, images):
    max_new_tokens = 3
    engine = RoundEngine(model)
    dialogue = engine.open_batch(images)
    history = [[] for _ in images]

    def memory(b, k, j):
        r = history[b][k - 1][1]
        return torch.tensor(r.masks[j]), torch.as_tensor(r.boxes[j])

    for n in range(max(ROUNDS)):
        asked = {}
        for b, image in enumerate(images):
            if n < ROUNDS[b]:
                q, refs = QUESTIONS[n]
                refs = tuple(k for k in refs if _referable(history[b][k - 1][1]))
                asked[b] = _so_far(image, history[b], Round(q, refs))
        got = engine.extend_batch(dialogue, asked, memory, answers={b: None for b in asked}, max_new_tokens=max_new_tokens, force_mask=True)
        for b, r in got.items():
            history[b].append((asked[b].rounds[-1], r))
        dialogue.end({b for b in range(len(images)) if n + 1 >= ROUNDS[b]})
    kinds = set()
    for b, image in enumerate(images):
        s = Session(model, image, max_new_tokens=max_new_tokens)
        for q, r in history[b]:
            want = s.ask(q.question, q.refs, exact_refs=True)
            assert (r.text, r.forced) == (want.text, want.forced)
            assert r.masks.shape == want.masks.shape
            np.testing.assert_array_equal(r.masks, want.masks)
            np.testing.assert_array_equal(r.frame_masks, want.frame_masks)
            # the decoder's scores read the <seg> states: float64, equal to rounding
            np.testing.assert_allclose(r.scores, want.scores, rtol=1e-9, atol=0)
            kinds.add((r.forced, r.masks.shape[0]))
    # answers of one generated mask, of three (the budget spent on <seg>) and forced ones
    assert {(False, 1), (False, 3), (True, 1)} <= kinds


def test_undo_takes_a_rows_round_back_as_a_session_does(model, images):
    engine = RoundEngine(model)
    dialogue = engine.open_batch(images[:2])
    first = {b: Conversation(images[b], [Round("Segment the red circle.", ())]) for b in range(2)}
    got = engine.extend_batch(dialogue, first, None, answers={0: None, 1: None}, max_new_tokens=4, force_mask=True)
    dialogue.undo([0])  # row 0 answers round 1 again, with two masks; row 1 keeps its answer
    got.update(engine.extend_batch(dialogue, {0: first[0]}, None, answers={0: "<seg> and <seg>"}))
    assert got[0].masks.shape[0] == 2
    second = {b: _so_far(images[b], [(first[b].rounds[0], got[b])], Round("Segment the square left of instance 1.", (1,))) for b in range(2)}

    def memory(b, k, j):
        return torch.tensor(got[b].masks[j]), torch.as_tensor(got[b].boxes[j])

    again = engine.extend_batch(dialogue, second, memory)
    for b in range(2):
        s = Session(model, images[b], max_new_tokens=4)
        want = s.ask("Segment the red circle.", exact_refs=True)
        if b == 0:
            s.undo()
            want = s.ask("Segment the red circle.", answer="<seg> and <seg>", exact_refs=True)
        np.testing.assert_array_equal(got[b].masks, want.masks)
        want2 = s.ask("Segment the square left of instance 1.", (1,), answer="<seg>", exact_refs=True)
        assert again[b].text == want2.text
        np.testing.assert_array_equal(again[b].masks, want2.masks)
        np.testing.assert_allclose(again[b].scores, want2.scores, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="nothing to undo"):
        dialogue.undo([0, 0])
