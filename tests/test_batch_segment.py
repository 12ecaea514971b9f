"""Batch segmentation answers what one Session per image answers, resumes, and reports errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segllm.batch_segment import Item, batch_order, merge_results, read_items, segment_items
from segllm.cli import main
from segllm.default import EXAMPLES, load_model
from segllm.errors import ConversationError
from segllm.export import from_rle
from segllm.session import Session

QUESTIONS = ["Segment the red circle.", "Segment the square left of instance 1.", "Can you segment the blue star?", "the one near instance 2"]


@pytest.fixture
def model(confident_model):
    return confident_model


@pytest.fixture(params=["plain", "ref_prior"])
def each_model(request):
    return request.getfixturevalue("confident_model" if request.param == "plain" else "ref_prior_confident_model")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(48, 80), (64, 64), (30, 50), (80, 40), (48, 80)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


# batch size 5: im0 and im4 (one size) share a batch, so their rows are post-processed together
@pytest.mark.parametrize("batch_size", [3, 5])
def test_batches_answer_what_one_session_per_image_answers(each_model, images, tmp_path, batch_size):
    model = each_model
    items = read_items(images, _questions(tmp_path))
    summary = segment_items(model, items, tmp_path / "out", batch_size=batch_size, progress=False)
    assert summary.images == 5 and summary.rounds == 20 and not summary.errors
    _assert_as_sessions(model, items, tmp_path / "out")


def test_conversations_of_different_lengths_answer_as_sessions(model, images, tmp_path):
    # reordered by length (batch_order) and finishing at different rounds, each still answers
    # what its own Session answers
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": str(images / f"im{i}.png"), "questions": QUESTIONS[:n]})
                               for i, n in enumerate([1, 4, 2, 4, 3])) + "\n")
    items = read_items(None, jsonl)
    # one lane: the file's lines then come in the batch order
    summary = segment_items(model, items, tmp_path / "out", batch_size=5, progress=False, lanes=1)
    assert summary.rounds == 14 and not summary.errors
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / "results.rank0.jsonl").read_text().splitlines()]
    assert ids == ["2", "4", "5", "3", "1"]
    _assert_as_sessions(model, items, tmp_path / "out")


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_answer_what_one_lane_answers(model, images, tmp_path, lanes, monkeypatch):
    import segllm.batch_segment as bs

    items = read_items(images, _questions(tmp_path))
    segment_items(model, items, tmp_path / "one", batch_size=2, progress=False, lanes=1)
    seen = []  # (thread name, torch threads, keys) of each batch
    run_batch = bs._segment_batch

    def spy(model_, engine, batch, *args):
        import threading

        seen.append((threading.current_thread().name, torch.get_num_threads(), [it.key for it in batch]))
        return run_batch(model_, engine, batch, *args)

    monkeypatch.setattr(bs, "_segment_batch", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        summary = segment_items(model, items, tmp_path / "lanes", batch_size=2, progress=False, lanes=lanes)
        assert torch.get_num_threads() == 4  # given back
    finally:
        torch.set_num_threads(threads)
    assert summary.images == 5 and summary.rounds == 20 and not summary.errors
    assert len({name for name, _, _ in seen}) == lanes and all(name.startswith("segllm-lane") for name, _, _ in seen)
    assert {n for _, n, _ in seen} == {4 // lanes}  # the torch threads shared out
    # every lane takes every n-th image of the batch order
    order = [it.key for it in batch_order(items)]
    by_lane: dict[str, list[str]] = {}
    for name, _, keys in seen:
        by_lane.setdefault(name, []).extend(keys)
    assert sorted(map(tuple, by_lane.values())) == sorted(tuple(order[i::lanes]) for i in range(lanes))
    one, many = (_records(tmp_path / d) for d in ("one", "lanes"))
    assert one.keys() == many.keys()
    for key in one:
        for a, b in zip(one[key]["rounds"], many[key]["rounds"], strict=True):
            assert a["masks"] == b["masks"] and a["boxes"] == b["boxes"] and a["answer"] == b["answer"]
    _assert_as_sessions(model, items, tmp_path / "lanes")


def test_a_failing_lane_raises_and_the_other_lanes_stop(model, images, tmp_path, monkeypatch):
    import segllm.batch_segment as bs

    items = read_items(images, _questions(tmp_path)) * 4  # 20 items, 10 batches of 2
    for i, it in enumerate(items):
        it.key = str(i)
    calls = []

    def failing(model_, engine, batch, *args):
        calls.append(batch[0].key)
        if len(calls) == 2:
            raise RuntimeError("lane broke")
        return [{"id": it.key, "image": it.image, "rounds": []} for it in batch]

    monkeypatch.setattr(bs, "_segment_batch", failing)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="lane broke"):
        segment_items(model, items, tmp_path / "out", batch_size=2, progress=False, lanes=2)
    assert torch.get_num_threads() == threads
    assert len(calls) < 10  # the other lane stopped after its batch in flight


def test_an_interrupted_run_stops_its_lanes(model, images, tmp_path, monkeypatch):
    # Ctrl-C while the lanes work: they end after their batch in flight instead of finishing the
    # whole list (the pool would otherwise wait for them), and the interrupt goes on up
    import threading

    import segllm.batch_segment as bs

    items = read_items(images, _questions(tmp_path)) * 4
    for i, it in enumerate(items):
        it.key = str(i)
    calls, both = [], threading.Barrier(3)

    def slow(model_, engine, batch, *args):
        calls.append(batch[0].key)
        if len(calls) <= 2:
            both.wait(5)  # both lanes are in their first batch
            threading.Event().wait(0.3)  # still working when the interrupt comes
        return [{"id": it.key, "image": it.image, "rounds": []} for it in batch]

    def interrupted(futures, return_when):
        both.wait(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(bs, "_segment_batch", slow)
    monkeypatch.setattr(bs, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        segment_items(model, items, tmp_path / "out", batch_size=2, progress=False, lanes=2)
    assert len(calls) == 2  # each lane's batch in flight, not the 10 batches
    lines = (tmp_path / "out" / "results.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the batches in flight were written


def test_default_lanes(model, monkeypatch):
    import segllm.lanes as lanes

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lanes.default_lanes(model, 0) == 2 and lanes.default_lanes(model, 3) == 3
        monkeypatch.setattr(model.decoder, "compiled", True, raising=False)
        assert lanes.default_lanes(model, 0) == 1  # a compiled decoder: one lane
        monkeypatch.undo()
        monkeypatch.setattr(lanes, "_LANES_MAX_PARAMETERS", sum(p.numel() for p in model.parameters()))
        assert lanes.default_lanes(model, 0) == 1  # a large model: one lane
        monkeypatch.undo()
        torch.set_num_threads(1)
        assert lanes.default_lanes(model, 0) == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="lanes"):
        lanes.default_lanes(model, -1)


def _records(out):
    return {rec["id"]: rec for rec in map(json.loads, (out / "results.rank0.jsonl").read_text().splitlines())}


def test_batch_order_puts_conversations_of_one_length_together():
    items = [Item("1", "a", ["q"]), Item("2", "b", ["q", "q"]), Item("3", "c", ["q", "longer q"]), Item("4", "d", ["q"]), Item("5", "e", ["q", "q"])]
    assert [it.key for it in batch_order(items)] == ["3", "2", "5", "1", "4"]


def _assert_as_sessions(model, items, out):
    recs = {rec["id"]: rec for rec in map(json.loads, (out / "results.rank0.jsonl").read_text().splitlines())}
    assert sorted(recs) == sorted(it.key for it in items)
    for it in items:
        s = Session(model, it.image)
        rounds = recs[it.key]["rounds"]
        assert len(rounds) == len(it.questions)
        for q, got in zip(it.questions, rounds):
            want = s.ask(q, answer="<seg>")
            assert got["refs"] == list(want.refs) and got["answer"] == want.text
            np.testing.assert_array_equal(from_rle(got["masks"][0]), want.masks[0])
            np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-3, atol=0)
            np.testing.assert_allclose(got["boxes"], want.boxes.round(2), atol=1e-6)


def test_resume_skips_what_is_done_and_drops_a_cut_line(model, images, tmp_path):
    items = read_items(images, _questions(tmp_path))
    segment_items(model, items[:2], tmp_path / "out", progress=False)
    path = tmp_path / "out" / "results.rank0.jsonl"
    path.write_text(path.read_text() + '{"id": "3", "ima')  # a line cut by a kill
    summary = segment_items(model, items, tmp_path / "out", resume=True, progress=False)
    assert summary.resumed == 2 and summary.images == 3
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == ["1", "2", "3", "4", "5"]


def test_errors_are_recorded_and_the_rest_goes_on(model, images, tmp_path):
    (images / "broken.png").write_bytes(b"not an image")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(images / "im0.png"), "questions": ["Segment the red circle.", "the one near instance 5"]},
        {"image": str(images / "broken.png"), "questions": ["Segment it."]},
        {"id": "x", "image": "imgs/im1.png", "questions": ["Segment the star.", "near instance 1"]},
    ]) + "\n")
    items = read_items(None, jsonl)
    summary = segment_items(model, items, tmp_path / "out", progress=False)
    assert summary.images == 3 and summary.rounds == 3
    errors = dict(summary.errors)
    assert "refers to round 5" in errors["1"] and "cannot read" in errors["2"]
    data = json.loads(merge_results(tmp_path / "out", png=True).read_text())
    assert [im["key"] for im in data["images"]] == ["1", "x"]
    assert [(a["image_id"], a["round"]) for a in data["annotations"]] == [(1, 1), (2, 1), (2, 2)]
    assert {e["id"] for e in data["errors"]} == {"1", "2"}
    assert (tmp_path / "out" / "masks" / "x" / "round2_mask1.png").is_file()


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no questions"), ('{"image": "a.png"}\n', "line 1: not a record"), ('{"image": "a.png", "questions": []}\n', "line 1")],
)
def test_bad_work_lists(tmp_path, content, message):
    q = tmp_path / ("q.jsonl" if content.startswith("{") else "q.txt")
    q.write_text(content)
    with pytest.raises(ConversationError, match=message):
        read_items(tmp_path, q)


def test_cli_segment_end_to_end_on_the_bundled_model(tmp_path, capsys):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(3):  # a bundled example scene, turned: the bundled model finds objects there
        Image.open(EXAMPLES / "scene2.png").rotate(90 * i).save(folder / f"s{i}.png")
    q = tmp_path / "q.txt"  # its first three questions; the third refers to round 2
    q.write_text("\n".join(json.loads((EXAMPLES / "scene2.json").read_text())["questions"][:3]) + "\n")
    rc = main(["segment", "--images", str(folder), "--questions", str(q), "--out", str(tmp_path / "o"), "--batch-size", "2", "--png"])
    captured = capsys.readouterr()
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    done = len(data["annotations"])
    # a round that refers to an empty mask is an error for that image (named), not a crash
    assert (rc == 0) == (not data["errors"]) and done + len(data["errors"]) == 9
    assert f"3 image(s), {done} round(s)" in captured.out
    assert len(data["images"]) == 3 and len(list((tmp_path / "o" / "masks").rglob("*.png"))) == done
    # --generate: the bundled model's own answers ("Sure, <seg>.", "<seg> is the one." and the like:
    # on these questions not a bare "<seg>", so an ignored --generate fails), each what `segllm chat`
    # (one Session) answers on that image
    assert main(["segment", "--images", str(folder), "--questions", str(q), "--out", str(tmp_path / "g"), "--generate"]) in (0, 1)
    gen = json.loads((tmp_path / "g" / "results.json").read_text())
    files = {im["id"]: im["file_name"] for im in gen["images"]}
    answers: dict[str, dict[int, str]] = {}
    for a in gen["annotations"]:
        answers.setdefault(files[a["image_id"]], {})[a["round"]] = a["answer"]
    said = [a for rounds in answers.values() for a in rounds.values()]
    assert said and all("<seg>" in a for a in said) and any(a != "<seg>" for a in said)
    model = load_model()
    for name, rounds in answers.items():
        s = Session(model, str(folder / Path(name).name))
        for k, question in enumerate(q.read_text().splitlines()[: max(rounds)], start=1):
            assert s.ask(question).text == rounds[k], (name, k)
    assert main(["segment", "--images", str(tmp_path / "none"), "--questions", str(_questions(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert "images not found" in capsys.readouterr().err


def _questions(tmp_path):
    q = tmp_path / "questions.txt"
    q.write_text("# every image gets these rounds\n" + "\n".join(QUESTIONS) + "\n")
    return q


def test_item_keys_are_the_order_in_the_list(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/im3.png\nimgs/im1.png\n")
    items = read_items(listing, _questions(tmp_path))
    assert [(i.key, i.image.endswith(n)) for i, n in zip(items, ["im3.png", "im1.png"])] == [("1", True), ("2", True)]
    assert isinstance(items[0], Item)


def test_ended_rows_leave_the_cache_and_cannot_be_asked_again(model, images):
    from segllm.conversation import Conversation, Round, load_image
    from segllm.model.rounds import RoundEngine

    engine = RoundEngine(model.eval())
    imgs = [load_image(p) for p in sorted(images.iterdir())[:3]]
    dialogue = engine.open_batch(imgs)
    first = engine.extend_batch(dialogue, {b: Conversation(imgs[b], [Round(QUESTIONS[0], ())]) for b in range(3)}, masks=None)
    dialogue.end([1])  # a conversation in the middle of the batch is over
    second = {b: Conversation(imgs[b], [Round(QUESTIONS[0], (), "<seg>", list(first[b].masks)), Round(QUESTIONS[2], ())]) for b in (0, 2)}
    got = engine.extend_batch(dialogue, second, masks=None)
    assert sorted(got) == [0, 2] and dialogue.cached == [0, 2]
    assert dialogue.attention.shape[0] == 2 and dialogue.cache.layers[0].keys.shape[0] == 2
    for b in (0, 2):  # what a Session asks of the same image
        s = Session(model, imgs[b])
        s.ask(QUESTIONS[0], answer="<seg>")
        np.testing.assert_array_equal(s.ask(QUESTIONS[2], answer="<seg>").masks, got[b].masks)
    with pytest.raises(ValueError, match="ended"):
        engine.extend_batch(dialogue, {1: second[0]}, masks=None)


def test_an_llm_with_eager_attention_computes_what_sdpa_computes(model, images, tmp_path):
    # the 4-D boolean mask is for SDPA only (eager attention adds a float mask): with eager
    # attention the batch and the session leave the mask to transformers, and every LLM state
    # of both paths equals SDPA's (eager takes its softmax in float32: float32's tolerance)
    items = read_items(images, _questions(tmp_path))
    states = {}
    for impl in ("sdpa", "eager"):
        model.llm.set_attn_implementation(impl)
        got = states[impl] = []
        hook = model.llm.get_decoder().register_forward_hook(lambda mod, args, out, got=got: got.append(out.last_hidden_state))
        try:
            segment_items(model, items, tmp_path / impl, batch_size=5, progress=False, lanes=1)  # states in call order
            s = Session(model, items[0].image)
            for q in items[0].questions:
                s.ask(q, answer="<seg>")
        finally:
            hook.remove()
            model.llm.set_attn_implementation("sdpa")
    assert len(states["sdpa"]) == len(states["eager"]) > 5
    for a, b in zip(states["sdpa"], states["eager"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_generated_answers_are_what_sessions_answer(confident_model, images, tmp_path):
    """--generate: the model writes each answer (one or several masks, one forced where it has
    none), all rows at once; each image's rounds are what its own Session answers."""
    import copy

    from tests.helpers import varied_answers

    model = varied_answers(copy.deepcopy(confident_model))
    items = read_items(images, _questions(tmp_path))
    segment_items(model, items, tmp_path / "out", batch_size=5, progress=False, generate=True, max_new_tokens=3)
    recs = {rec["id"]: rec for rec in map(json.loads, (tmp_path / "out" / "results.rank0.jsonl").read_text().splitlines())}
    counts = set()
    for it in items:
        s = Session(model, it.image, max_new_tokens=3)
        for q, got in zip(it.questions, recs[it.key]["rounds"], strict=True):
            want = s.ask(q)
            assert got["answer"] == want.text and len(got["masks"]) == len(want.masks)
            for rle, mask in zip(got["masks"], want.masks):
                np.testing.assert_array_equal(from_rle(rle), mask)
            counts.add(len(want.masks))
    assert counts >= {1, 3}  # answers with one mask and with three (the budget spent on <seg>)


@pytest.mark.slow
def test_the_miniature_released_checkpoint_in_batches(tmp_path):
    """A released checkpoint (HIPIE, memory crops in its 1024 frame) batches too: the masks are
    one Session's per image, up to float32 rounding (at most a pixel)."""
    from tests.helpers import miniature_released_model

    model = miniature_released_model()
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(96, 128), (120, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        items.append(Item(str(i + 1), str(tmp_path / f"{i}.png"), ["Segment the cat.", "Segment the thing near instance 1."]))
    summary = segment_items(model, items, tmp_path / "out", batch_size=2, progress=False)
    assert summary.rounds == 4 and not summary.errors
    recs = {rec["id"]: rec for rec in map(json.loads, (tmp_path / "out" / "results.rank0.jsonl").read_text().splitlines())}
    for it in items:
        s = Session(model, it.image)
        for q, got in zip(it.questions, recs[it.key]["rounds"], strict=True):
            want = s.ask(q, answer="<seg>").masks[0]
            assert want.any() and int((from_rle(got["masks"][0]) != want).sum()) <= 1
