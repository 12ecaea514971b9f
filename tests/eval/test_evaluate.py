import numpy as np
import pytest

from segllm.conversation import Conversation, Round
from segllm.eval.evaluate import evaluate, format_table
from segllm.eval.report import write_reports
from segllm.session import Reply


def _mask(y0, y1, x0, x1):
    m = np.zeros((12, 12), bool)
    m[y0:y1, x0:x1] = True
    return m


class ListData:
    def __init__(self, convs):
        self.convs = convs

    def __len__(self):
        return len(self.convs)

    def get(self, i):
        return self.convs[i]


class Oracle:
    """A stand-in model that answers with the ground truth, or with an empty mask in round 1."""

    training = False

    def __init__(self, gts, empty_round1=False):
        self.gts, self.empty_round1 = gts, empty_round1
        self.seen_refs = []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def segment(self, convs, frame=False):
        assert not frame
        return [[(np.stack(r.masks), np.ones(len(r.masks), np.float32)) for r in c.rounds] for c in convs]


class FakeSession:
    """Plays the stand-in model's answers round by round, as segllm.session.Session does."""

    def __init__(self, model, image, max_new_tokens=16):
        self.model, self.history = model, []

    def ask(self, question, refs=(), *, answer=None, exact_refs=False):
        assert exact_refs
        n = len(self.history) + 1
        self.model.seen_refs.append(tuple(refs))
        gt = self.model.gts[n - 1]
        frame = gt
        if self.model.empty_round1 and n == 1:
            # empty at image resolution; the decoder frame keeps pixels in its padding
            gt, frame = np.zeros_like(gt), np.ones_like(gt)
        reply = Reply(n, question, tuple(refs), "<seg>", gt[None], np.zeros((1, 4), np.float32), np.ones(1, np.float32), frame_masks=frame[None])
        self.history.append(reply)
        return reply

    def undo(self):
        return self.history.pop()

    def referable(self, k):  # a model without frame memory: the image-resolution masks decide
        return bool(self.history[k - 1].masks.any())


def _conv():
    img = np.zeros((12, 12, 3), np.uint8)
    gts = [_mask(0, 4, 0, 4), _mask(5, 9, 5, 9), _mask(0, 3, 8, 12)]
    rounds = [Round("a", (), "<seg>", [gts[0]]), Round("b instance 1", (1,), "<seg>", [gts[1]]), Round("c", (2,), "<seg>", [gts[2]])]
    return Conversation(img, rounds), gts


def test_perfect_model_scores_100_under_both_protocols():
    conv, gts = _conv()
    for protocol in ("oracle", "own"):
        r = evaluate(Oracle(gts), ListData([conv, conv]), protocol=protocol, session_factory=FakeSession)
        assert r.conversations == 2
        assert r.metrics["all"]["cIoU"] == pytest.approx(100)
        assert [r.metrics[k]["n"] for k in ("1", "2", "3")] == [2, 2, 2]
    assert "own cIoU" in format_table([r])


def test_own_protocol_uses_own_masks_and_drops_empty_refs():
    conv, gts = _conv()
    model = Oracle(gts, empty_round1=True)
    r = evaluate(model, ListData([conv]), protocol="own", session_factory=FakeSession)
    assert r.empty_refs == 1  # round 2 refers to round 1, whose own mask is empty
    assert model.seen_refs == [(), (), (2,)]
    assert r.metrics["1"]["cIoU"] == 0 and r.metrics["2"]["cIoU"] == pytest.approx(100)


def test_skipped_records_are_reported(tmp_path):
    conv, gts = _conv()

    class WithBad(ListData):
        def __init__(self, convs):
            super().__init__(convs)
            from segllm.data.records import Skipped

            self.skipped = Skipped()

        def get(self, i):
            if i == 1:
                self.skipped.add("record 1", "broken")
                return None
            return self.convs[i]

    r = evaluate(Oracle(gts), WithBad([conv, conv, conv]), protocol="oracle")
    assert r.conversations == 2 and r.skipped == [("record 1", "broken")]
    paths = write_reports([r], tmp_path, name="x")
    assert [p.name for p in paths] == ["x.json", "x.csv", "x_ciou.png"]
    assert "oracle,1,100.00" in (tmp_path / "x.csv").read_text()
