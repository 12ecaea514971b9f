"""Scoring rounds with several targets: each target matched to one predicted mask, and the
unions (segllm.eval.metrics.score_targets), through evaluate() and its logs. Every expected
number is counted by hand from the masks below."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segllm.conversation import Conversation, Round
from segllm.eval.evaluate import evaluate, format_table, read_logs
from segllm.eval.metrics import mask_box, match_targets, released_frame_gt, score_targets
from segllm.session import Reply
from tests.helpers import ListData


def _mask(y0, y1, x0, x1, shape=(10, 10)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


A = _mask(0, 2, 0, 5)  # target A: 10 px
B = _mask(5, 10, 5, 10)  # target B: 25 px
P_B = _mask(5, 10, 5, 9)  # 20 px inside B: IoU 20/25 with B, 0 with A
P_A = _mask(0, 2, 0, 4)  # 8 px inside A: IoU 8/10 with A, 0 with B
P_X = _mask(0, 2, 6, 10)  # 8 px on no target


def test_masks_in_the_other_order_are_matched():
    # the answer lists them right to left: position would give IoU 0 twice, matching 0.8 twice
    r = score_targets([P_B, P_A], [A, B])
    assert r.match == [1, 0]
    assert [s[:3] for s in r.per_target] == [(8, 10, pytest.approx(0.8)), (20, 25, pytest.approx(0.8))]
    assert (r.union_inter, r.union_union) == (28, 35)  # 8 + 20 of 10 + 25
    assert (r.missing, r.extra) == (0, 0)


def test_a_missing_mask_scores_an_empty_prediction():
    r = score_targets([P_B], [A, B])
    assert r.match == [None, 0]
    assert [s[:3] for s in r.per_target] == [(0, 10, 0.0), (20, 25, pytest.approx(0.8))]
    assert r.per_target[0][3] is False  # no box: no P@0.5 hit
    assert (r.union_inter, r.union_union) == (20, 35)
    assert (r.missing, r.extra) == (1, 0)


def test_an_extra_mask_costs_only_the_union():
    r = score_targets([P_B, P_A, P_X], [A, B])
    assert r.match == [1, 0]
    assert [s[:2] for s in r.per_target] == [(8, 10), (20, 25)]
    assert (r.union_inter, r.union_union) == (28, 43)  # P_X's 8 px join the union's U
    assert (r.missing, r.extra) == (0, 1)


def test_exact_matching_beats_greedy():
    # one row of 20 px: X = [0, 10), Y = [10, 20); p = [0, 12) IoU 10/12 with X, 2/20 with Y;
    # q = [0, 8) IoU 8/10 with X, 0 with Y. Greedy takes X-p (0.83) and leaves Y-q (0): 0.83;
    # the best pairing is X-q + Y-p: 0.8 + 0.1 = 0.9
    row = lambda a, b: _mask(0, 1, a, b, (1, 20))  # noqa: E731
    X, Y, p, q = row(0, 10), row(10, 20), row(0, 12), row(0, 8)
    assert match_targets([p, q], [X, Y]) == [1, 0]
    r = score_targets([p, q], [X, Y])
    assert [s[:2] for s in r.per_target] == [(8, 10), (2, 20)]
    # more targets than masks: the one mask goes where it fits best
    assert match_targets([p], [Y, X]) == [None, 0]


def test_ties_keep_the_answers_order_and_many_masks_match_greedily():
    empty = np.zeros((4, 4), bool)
    assert match_targets([empty, empty], [empty, empty]) == [0, 1]
    # 9 targets (beyond the exact search): each its own column, masks given in reverse
    cols = [_mask(0, 3, i, i + 1, (3, 9)) for i in range(9)]
    assert match_targets(cols[::-1], cols) == list(range(8, -1, -1))



class _Answers:
    """A stand-in model whose round k answers with masks[k-1] (any number of them)."""

    training = False

    def __init__(self, masks):
        self.masks = masks

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def segment(self, convs, frame=False):
        return [[(np.stack(self.masks[n]), np.ones(len(self.masks[n]), np.float32)) for n in range(len(c.rounds))]
                for c in convs]


class _Session:
    """Plays _Answers round by round, as segllm.session.Session does."""

    def __init__(self, model, image, max_new_tokens=16):
        self.model, self.history = model, []

    def ask(self, question, refs=(), *, answer=None, exact_refs=False):
        n = len(self.history) + 1
        masks = np.stack(self.model.masks[n - 1])
        text = " ".join(["<seg>"] * len(masks))
        reply = Reply(n, question, tuple(refs), text, masks, np.zeros((len(masks), 4), np.float32),
                      np.ones(len(masks), np.float32), frame_masks=masks)
        self.history.append(reply)
        return reply

    def undo(self):
        return self.history.pop()

    def referable(self, k):
        return bool(self.history[k - 1].masks.any())


def _conv():
    C = _mask(3, 5, 0, 3)  # round 1's one target: 6 px
    img = np.zeros((10, 10, 3), np.uint8)
    return Conversation(img, [Round("the one", (), "<seg>", [C]),
                              Round("all of them", (), "From left to right: <seg> and <seg>.", [A, B])]), C


@pytest.mark.parametrize("protocol", ["oracle", "own"])
def test_evaluate_reports_matched_and_union(protocol, tmp_path):
    conv, C = _conv()
    # round 1 exact; round 2 answers with one mask only (inside B): A missing
    model = _Answers([[C], [P_B]])
    log = tmp_path / "log.jsonl"
    r = evaluate(model, ListData([conv]), protocol=protocol, session_factory=_Session, log_path=log)
    m = r.multi_target
    assert (m["rounds"], m["targets"], m["missing"], m["extra"]) == (1, 2, 1, 0)
    assert m["matched cIoU"] == pytest.approx(100 * 20 / 35)  # (0 + 20) / (10 + 25)
    assert m["matched mIoU"] == pytest.approx(100 * (0 + 0.8) / 2)
    assert m["union cIoU"] == pytest.approx(100 * 20 / 35)
    # the targets enter the per-round numbers as matched: round 2 holds 2 masks
    assert r.metrics["2"]["n"] == 2 and r.metrics["2"]["cIoU"] == pytest.approx(100 * 20 / 35)
    assert r.metrics["all"]["cIoU"] == pytest.approx(100 * (6 + 20) / (6 + 35))
    assert r.no_seg_answers == 0  # a several-target round is never re-asked
    assert "matched cIoU 57.1" in format_table([r]) and "union cIoU 57.1" in format_table([r])
    assert r.to_dict()["multi_target"] == m
    # the log keeps them: read back, the same numbers
    back = read_logs([log], protocol=protocol)
    assert back.multi_target == m and back.metrics == r.metrics


def test_union_differs_from_matched_when_masks_overlap_targets_across():
    # two masks each covering half of both targets: matched pairs score low, the union high
    left, right = _mask(0, 10, 0, 5), _mask(0, 10, 5, 10)
    top, bottom = _mask(0, 5, 0, 10), _mask(5, 10, 0, 10)
    r = score_targets([left, right], [top, bottom])
    assert [s[:2] for s in r.per_target] == [(25, 75), (25, 75)]  # each pair: 25 shared of 75
    assert (r.union_inter, r.union_union) == (100, 100)


class _FrameAnswers(_Answers):
    """As _Answers, in the released frame: the frame masks are the answers, the image-resolution
    ones empty (so a score that used them would be 0)."""

    class decoder:  # noqa: N801 (stands in for model.decoder)
        image_size = 20

    def segment(self, convs, frame=False):
        assert frame
        out = []
        for c in convs:
            rounds = []
            for n in range(len(c.rounds)):
                f = np.stack([released_frame_gt(m, 20) for m in self.masks[n]])
                boxes = np.stack([mask_box(m) for m in f])
                rounds.append((np.zeros((len(f), 10, 10), bool), np.ones(len(f), np.float32), f, boxes))
            out.append(rounds)
        return out


def test_released_frame_scores_the_frame_masks():
    conv, C = _conv()
    r = evaluate(_FrameAnswers([[C], [B]]), ListData([conv]), protocol="oracle", frame="released")
    a, b = released_frame_gt(A, 20).sum(), released_frame_gt(B, 20).sum()
    assert a > 0 and b > 0
    m = r.multi_target
    assert (m["missing"], m["extra"]) == (1, 0)
    assert m["matched cIoU"] == pytest.approx(100 * b / (a + b))  # B exact, A missing
    assert m["union cIoU"] == pytest.approx(100 * b / (a + b))
    assert m["matched mIoU"] == pytest.approx(100 * (0 + b / (b + 1e-4)) / 2)  # the released IoU: I / (U + 1e-4)


def test_a_pick_round_answered_with_several_masks_keeps_them_with_the_target_assumed():
    # own protocol: a pick round's history holds the recorded target; a model that answered it
    # "From left to right: <seg>, <seg>" keeps two masks (its answer has two <seg>), the one
    # closest to the target replaced by it (previously: one mask for two <seg>, and the next
    # round failed to validate)
    from types import SimpleNamespace

    from segllm.eval.evaluate import _assume_recorded
    from segllm.session import Reply

    left, right, target = (np.zeros((8, 8), bool) for _ in range(3))
    left[1:4, 0:3] = True
    right[1:4, 5:8] = True
    target[1:5, 5:8] = True
    own = np.stack([left, right])
    reply = Reply(2, "Segment one of the red objects.", (), "From left to right: <seg> and <seg>.", own, np.zeros((2, 4)), np.ones(2), frame_masks=own.copy())
    session = SimpleNamespace(history=[reply])
    _assume_recorded(session.history, [target])
    got = session.history[-1]
    assert got.masks.shape == (2, 8, 8) and got.text.count("<seg>") == 2
    assert np.array_equal(got.masks[0], left) and np.array_equal(got.masks[1], target)
    assert got.boxes[1].tolist() == [5, 1, 8, 5] and np.array_equal(got.frame_masks[0], left)
    # one mask for one target: replaced outright, as before
    one = Reply(2, "q", (), "<seg>", own[:1], np.zeros((1, 4)), np.ones(1))
    session = SimpleNamespace(history=[one])
    _assume_recorded(session.history, [target])
    assert np.array_equal(session.history[-1].masks, target[None])


def test_the_longest_world_answer_fits_the_generation_budget():
    # under the own protocol the model writes its answer; a budget shorter than an answer with
    # four <seg> cut the fourth off (session 43: 16 tokens, where such an answer takes up to 26)
    import inspect

    from transformers import AutoTokenizer

    from segllm.data.world.language import MAX_TARGETS, all_answer
    from segllm.session import Session

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "segllm" / "assets" / "default_model")
    answers = {all_answer(MAX_TARGETS, np.random.default_rng(seed)) for seed in range(64)}
    assert len(answers) >= 3 and all(a.count("<seg>") == MAX_TARGETS for a in answers)
    longest = max(len(tok(a, add_special_tokens=False).input_ids) for a in answers) + 1  # and the end token
    for budget in (inspect.signature(evaluate).parameters["max_new_tokens"].default,
                   inspect.signature(Session.__init__).parameters["max_new_tokens"].default):
        assert longest <= budget, (longest, budget)
