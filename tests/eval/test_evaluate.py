import json

import numpy as np
import pytest

from segllm.conversation import Conversation, Round
from segllm.errors import SegLLMError
from segllm.eval.evaluate import evaluate, format_table, read_logs
from segllm.eval.report import write_reports
from segllm.session import Reply
from tests.helpers import ListData


def _mask(y0, y1, x0, x1):
    m = np.zeros((12, 12), bool)
    m[y0:y1, x0:x1] = True
    return m



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
            self.unreadable = [("convs.jsonl:4", "malformed JSON")]  # dropped while reading: no index

        def get(self, i):
            if i == 1:
                self.skipped.add("record 1", "broken")
                return None
            return self.convs[i]

    r = evaluate(Oracle(gts), WithBad([conv, conv, conv]), protocol="oracle")
    assert r.conversations == 2 and r.skipped == [("convs.jsonl:4", "malformed JSON"), ("record 1", "broken")]
    assert r.to_dict()["skipped"] == 2
    # several processes: the dropped lines are counted once, by rank 0
    other = evaluate(Oracle(gts), WithBad([conv, conv, conv]), protocol="oracle", rank=1, world_size=2)
    assert other.skipped == [("record 1", "broken")]
    # ... and the main process's merge of the ranks' logs (segllm eval under two processes) keeps
    # the dropped lines, which no log holds: the same report as one process
    logs = [tmp_path / f"l.rank{k}.jsonl" for k in (0, 1)]
    for k in (0, 1):
        evaluate(Oracle(gts), WithBad([conv, conv, conv]), protocol="oracle", rank=k, world_size=2, log_path=logs[k])
    merged = read_logs(logs, protocol="oracle", dataset=WithBad([conv, conv, conv]))
    assert sorted(merged.skipped) == sorted(r.skipped) and merged.to_dict() == r.to_dict()
    paths = write_reports([r], tmp_path, name="x")
    assert [p.name for p in paths] == ["x.json", "x.csv", "x_ciou.png"]
    assert "oracle,1,100.00" in (tmp_path / "x.csv").read_text()


# -- grounding diagnostics, pick rounds, the union baseline ---------------------------------------


def _pick_data():
    """Objects A (16 px), B (25 px), C (12 px). Round 1: "one of the ..." with A and C valid, C
    recorded; round 2 refers to it (its ground truth assumes C); round 3 asks for B."""
    from segllm.data.records import RoundMeta, SceneAnnotations

    A, B, C = _mask(0, 4, 0, 4), _mask(5, 10, 5, 10), _mask(0, 3, 8, 12)
    img = np.zeros((12, 12, 3), np.uint8)
    conv = Conversation(img, [Round("one of them", (), "<seg>", [C]), Round("near instance 1", (1,), "<seg>", [B]),
                              Round("the big one", (), "<seg>", [B])])
    scene = SceneAnnotations(
        [RoundMeta("pick", "attribute", False, (1, 3)), RoundMeta("query", "positional", False),
         RoundMeta("query", "attribute", True)],
        {1: A, 2: B, 3: C}, [1, 2, 3], [[3], [2], [2]])

    class Data(ListData):
        def scene(self, i):
            return scene

    return Data([conv]), (A, B, C)


class Predicts(Oracle):
    """Answers round k with preds[k-1], whatever the question."""

    def __init__(self, preds):
        super().__init__(preds)

    def segment(self, convs, frame=False):
        return [[(self.gts[n][None], np.ones(1, np.float32)) for n in range(len(c.rounds))] for c in convs]


def test_pick_round_scored_against_best_alternative_and_grounding():
    data, (A, B, C) = _pick_data()
    # round 1 picks A (valid, not the recorded C); round 2 segments A again (wrong); round 3 B
    model = Predicts([A, A, B])
    r = evaluate(model, data, protocol="oracle")
    assert r.metrics["1"]["cIoU"] == pytest.approx(100)  # A is a valid answer of the pick
    assert r.metrics["2"]["cIoU"] == 0
    d = r.diagnostics
    assert [d["per_round"][k]["grounded"] for k in ("1", "2", "3")] == [100, 0, 100]
    assert d["per_round"]["all"]["grounded"] == pytest.approx(200 / 3)
    assert d["per_family"]["attribute"]["grounded"] == 100 and d["per_family"]["positional"]["grounded"] == 0
    assert d["text_resolvable"]["true"]["n"] == 1 and d["text_resolvable"]["false"]["grounded"] == 50
    assert d["per_round"]["1"]["IoU|grounded"] == pytest.approx(100)
    assert "grnd" in format_table([r]) and "not text-resolvable grounded 50.0%" in format_table([r])
    # without scene annotations: no diagnostics, the pick is scored against the recorded mask only
    plain = evaluate(model, ListData(data.convs), protocol="oracle")
    assert plain.diagnostics == {} and plain.metrics["1"]["cIoU"] == 0 and "grnd" not in format_table([plain])


def test_own_protocol_feeds_back_the_recorded_pick():
    data, (A, B, C) = _pick_data()
    sessions = []

    class Keep(FakeSession):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            sessions.append(self)

    model = Oracle([A, B, B])  # the FakeSession answers round n with gts[n-1]: A for the pick
    r = evaluate(model, data, protocol="own", session_factory=Keep)
    assert r.metrics["1"]["cIoU"] == pytest.approx(100)
    hist = sessions[0].history
    assert np.array_equal(hist[0].masks[0], C)  # later rounds saw the recorded choice, not A
    assert list(hist[0].boxes[0]) == [8, 0, 12, 3]
    assert np.array_equal(hist[1].masks[0], B)  # other rounds keep the model's own masks


def test_union_baseline_and_reports(tmp_path):
    import json

    from segllm.errors import SegLLMError
    from segllm.eval.evaluate import evaluate_baseline

    data, (A, B, C) = _pick_data()
    r = evaluate_baseline(data)
    assert r.protocol == "baseline-union" and r.conversations == 1
    union = 16 + 25 + 12
    # round 1: the best alternative is A (16 of 53 px); rounds 2 and 3: B
    assert r.metrics["1"]["mIoU"] == pytest.approx(100 * 16 / union)
    assert r.metrics["3"]["mIoU"] == pytest.approx(100 * 25 / union)
    # the union overlaps B more than anything else, A and C less than B
    assert [r.diagnostics["per_round"][k]["grounded"] for k in ("1", "2", "3")] == [0, 100, 100]
    paths = write_reports([r], tmp_path, name="b")
    js = json.loads(paths[0].read_text())
    assert js["results"][0]["diagnostics"]["per_round"]["2"]["grounded"] == 100
    assert "baseline-union,2," in paths[1].read_text() and ",100.00," in paths[1].read_text()
    with pytest.raises(SegLLMError, match="object annotations"):
        evaluate_baseline(ListData(data.convs))


def test_logs_keep_diagnostics_and_read_old_lines(tmp_path):
    from segllm.eval.evaluate import read_logs

    data, (A, B, C) = _pick_data()
    log = tmp_path / "x.jsonl"
    r = evaluate(Predicts([A, A, B]), data, protocol="oracle", log_path=log)
    back = read_logs([log], protocol="oracle")
    import json

    assert json.dumps(back.diagnostics) == json.dumps(r.diagnostics)  # NaN-safe comparison
    assert back.metrics == r.metrics and back.diagnostics["per_round"]["2"]["grounded"] == 0
    old = tmp_path / "old.jsonl"  # a log written before the diagnostics existed
    old.write_text('{"index": 0, "masks": [[1, 4, 8, 0.5, true]], "empty_refs": 0, "no_seg_answers": 0}\n')
    res = read_logs([old], protocol="oracle")
    assert res.metrics["1"]["mIoU"] == pytest.approx(50) and res.diagnostics == {}


@pytest.mark.parametrize("frame", ["original", "released"])
def test_own_protocol_in_batches_equals_one_session_per_conversation(confident_model, tmp_path, frame):
    """The own protocol plays conversations ``batch_size`` at a time (RoundEngine.extend_batch):
    every logged mask is what one Session per conversation gives (world conversations: pick
    rounds, references, generated answers, masks forced where an answer has none)."""
    from segllm.data.records import WorldConversations
    from segllm.session import Session

    data = WorldConversations("test", 5, seed=0, max_rounds=4)
    batched = evaluate(confident_model, data, protocol="own", batch_size=3, frame=frame, max_new_tokens=4, log_path=tmp_path / "b.jsonl")
    single = evaluate(confident_model, data, protocol="own", frame=frame, max_new_tokens=4, log_path=tmp_path / "s.jsonl",
                      session_factory=Session)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "s.jsonl").read_text().splitlines() and len(lines) == 5
    import json  # (NaN where a group is empty: compared as written)

    for part in ("metrics", "diagnostics"):
        assert json.dumps(getattr(batched, part), sort_keys=True) == json.dumps(getattr(single, part), sort_keys=True)


@pytest.mark.parametrize("protocol", ["own", "oracle"])
def test_lanes_log_what_one_lane_logs(confident_model, tmp_path, protocol, monkeypatch):
    """Two lanes (batches on two threads at once) log the same lines in the same order as one,
    and read the dataset on the calling thread only (the world keeps its last sample)."""
    import json
    import threading

    from segllm.data.records import WorldConversations

    data = WorldConversations("test", 7, seed=0, max_rounds=3)
    main, readers = threading.get_ident(), set()
    get, scene = data.get, data.scene

    def read(i):  # conversation 3 unusable: its line keeps its place among the batches in flight
        readers.add(threading.get_ident())
        if i == 3:
            data.skipped.add(data.where(i), "broken on purpose")
            return None
        return get(i)
    monkeypatch.setattr(data, "get", read)
    monkeypatch.setattr(data, "scene", lambda i: (readers.add(threading.get_ident()), scene(i))[1])
    one = evaluate(confident_model, data, protocol=protocol, batch_size=2, max_new_tokens=4, log_path=tmp_path / "1.jsonl")
    two = evaluate(confident_model, data, protocol=protocol, batch_size=2, max_new_tokens=4, log_path=tmp_path / "2.jsonl",
                   lanes=2)
    lines = (tmp_path / "1.jsonl").read_text().splitlines()
    assert (tmp_path / "2.jsonl").read_text().splitlines() == lines and len(lines) == 7
    got = {json.loads(x)["index"]: json.loads(x) for x in lines}
    # in index order: the unusable record 3 after conversation 2, which was still waiting for
    # its batch's second conversation when 3 was read
    assert [json.loads(x)["index"] for x in lines] == list(range(7))
    assert "skipped" in got[3] and "masks" in got[2]
    for part in ("metrics", "diagnostics", "skipped"):
        assert json.dumps(getattr(one, part), sort_keys=True) == json.dumps(getattr(two, part), sort_keys=True)
    assert readers == {main}


def test_a_lanes_error_reaches_the_caller_and_earlier_lines_stay(confident_model, tmp_path, monkeypatch):
    """A batch that fails on a lane raises in ``evaluate`` (as it would with one lane); the
    batches before it are logged, so ``resume`` continues from there."""
    from segllm.data.records import WorldConversations
    from segllm.eval import evaluate as ev

    data = WorldConversations("test", 8, seed=0, max_rounds=2)
    orig = ev._Scorer.batch

    def batch(self, items, protocol, max_new_tokens):
        if items[0][0] == 4:
            raise SegLLMError("batch 3 broke")
        return orig(self, items, protocol, max_new_tokens)
    monkeypatch.setattr(ev._Scorer, "batch", batch)
    log = tmp_path / "l.jsonl"
    with pytest.raises(SegLLMError, match="batch 3 broke"):
        evaluate(confident_model, data, protocol="oracle", batch_size=2, log_path=log, lanes=2)
    assert [json.loads(x)["index"] for x in log.read_text().splitlines()] == [0, 1, 2, 3]
    monkeypatch.undo()
    res = evaluate(confident_model, data, protocol="oracle", batch_size=2, log_path=log, lanes=2, resume=True)
    assert res.metrics["all"]["n"] > 0 and len(log.read_text().splitlines()) == 8


@pytest.mark.slow
def test_own_protocol_in_batches_on_the_miniature_released_checkpoint(tmp_path):
    """The released checkpoints' path (HIPIE's multi-level image features batched, memory crops
    in the 1024 frame, the decoder's own boxes) in batches logs what one Session per conversation
    logs, up to float32 rounding at the 1024 frame (a pixel in half a million)."""
    import json

    from segllm.session import Session
    from tests.helpers import miniature_released_model

    model = miniature_released_model()
    rng = np.random.default_rng(0)
    convs = []
    for h, w in [(96, 128), (120, 90), (96, 128)]:
        gts = [np.zeros((h, w), bool) for _ in range(3)]
        gts[0][10:40, 10:50], gts[1][50:80, 20:60], gts[2][5:30, 60:80] = True, True, True
        convs.append(Conversation(rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
                                  [Round("Segment the cat.", (), "<seg>", [gts[0]]), Round("Segment the thing near it.", (1,), "<seg>", [gts[1]]),
                                   Round("And the one left of instance 2.", (2,), "<seg>", [gts[2]])]))
    evaluate(model, ListData(convs), protocol="own", batch_size=3, frame="released", max_new_tokens=8, log_path=tmp_path / "b.jsonl")
    evaluate(model, ListData(convs), protocol="own", frame="released", max_new_tokens=8, log_path=tmp_path / "s.jsonl", session_factory=Session)
    batched, single = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("b.jsonl", "s.jsonl"))
    assert len(batched) == len(single) == 3
    for b, s in zip(batched, single):
        assert len(b["masks"]) == len(s["masks"]) == 3 and b["empty_refs"] == s["empty_refs"]
        for mb, ms in zip(b["masks"], s["masks"]):
            assert mb[0] == ms[0]
            for got, want in zip(mb[1:3], ms[1:3]):  # intersection, union (pixels of the 1024 frame)
                assert abs(got - want) <= 1e-5 * max(got, want, 1)


def test_log_rows_reads_scored_conversations_only(tmp_path):
    """``log_rows``: unusable records and a line cut short are left out, a conversation logged
    twice keeps its first line, older rows are padded with None, a missing file is named."""
    from segllm.eval.evaluate import log_rows

    a, b = tmp_path / "a.rank0.jsonl", tmp_path / "a.rank1.jsonl"
    a.write_text('{"index": 0, "masks": [[1, 5, 10, 0.5, true, true, "attribute", false]]}\n'
                 '{"index": 1, "skipped": ["convs.jsonl:2", "broken"]}\n'
                 '{"index": 2, "masks": [[1, 3, 4, 0.75, true]]}\n'
                 '{"index": 4, "masks": [[1, 1')
    b.write_text('{"index": 0, "masks": [[1, 0, 9, 0.0, false, false, "attribute", false]]}\n'
                 '{"index": 3, "masks": []}\n')
    rows = log_rows([a, b])
    assert sorted(rows) == [0, 2, 3]
    assert rows[0] == [(1, 5, 10, 0.5, True, True, "attribute", False)]
    assert rows[2] == [(1, 3, 4, 0.75, True, None, None, None)] and rows[3] == []
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        log_rows([tmp_path / "missing.jsonl"])
