"""Conversation data through the Python API and the CLI: the package's own dataset folders
(``segllm eval --data``), released-format conversation files (``segllm eval --benchmark
released``), chat scripts (``segllm chat --script``) and questions (API, CLI, demo).

A bad record is skipped with its file, line (or index) and reason, and counted in eval's
"skipped N" summary; a file that cannot be used at all is one error naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segllm.data.records import ConversationFolder
from segllm.data.released import ReleasedConversations
from segllm.errors import ContextTooLongError
from segllm.session import Session
from tests.released_layout import IMG1, turn
from tests.reliability import inputs as mk
from tests.reliability.doors import (
    OK,
    Expect,
    check_api,
    check_cli,
    check_demo,
    demo_request,
    fails,
    no_progress,
    run_cli,
)


@dataclass
class DataCase:
    id: str
    make: Callable  # -> the data (a Folder spec, or a list of released records / raw text)
    expect: Expect = OK  # the whole file: read, or refused with one error
    skipped: str | None = None  # one record skipped with this reason (regex); the good one still read


def _drop(key: str, where: str = "round") -> Callable[[dict], dict]:
    def change(r: dict) -> dict:
        (r["rounds"][0] if where == "round" else r).pop(key)
        return r

    return change


def _set_round(n: int, **fields) -> Callable[[dict], dict]:
    def change(r: dict) -> dict:
        r["rounds"][n - 1].update(fields)
        return r

    return change


def _empty_mask(a: dict) -> None:
    a["segmentation"] = mk._rle(np.zeros((mk.H, mk.W), bool))


FOLDER_CASES = [
    DataCase("valid-folder", mk.good_folder),
    DataCase("malformed-json-line", lambda: mk.with_record(lambda r: '{"id": "cut", "rounds": ['), skipped=r"malformed JSON"),
    DataCase("json-list-line", lambda: mk.with_record(lambda r: "[1, 2]"), skipped=r"not a JSON object"),
    DataCase("record-without-rounds", lambda: mk.with_record(_drop("rounds", "record")), skipped=r"record has no rounds"),
    DataCase("record-empty-rounds", lambda: mk.with_record(lambda r: {**r, "rounds": []}), skipped=r"record has no rounds"),
    DataCase("round-not-an-object", lambda: mk.with_record(lambda r: {**r, "rounds": ["hi"]}), skipped=r"round 1 is not an object"),
    DataCase("round-without-answer", lambda: mk.with_record(_drop("answer")), skipped=r"round 1: missing or malformed field 'answer'"),
    DataCase("question-not-text", lambda: mk.with_record(_set_round(1, question=5)), skipped=r"question and answer must be text"),
    DataCase("empty-question", lambda: mk.with_record(_set_round(1, question="  ")), skipped=r"round 1: the question is empty"),
    DataCase("ref-to-a-later-round", lambda: mk.with_record(_set_round(2, refs=[3])),
             skipped=r"round 2 refers to round 3, which does not exist"),
    DataCase("ref-to-round-0", lambda: mk.with_record(_set_round(2, refs=[0])), skipped=r"round 2 refers to round 0"),
    DataCase("ref-not-a-number", lambda: mk.with_record(_set_round(2, refs=["first"])), skipped=r"round 2: missing or malformed field"),
    DataCase("mask-ids-not-a-list", lambda: mk.with_record(_set_round(1, mask_ids=5)), skipped=r"round 1: missing or malformed field"),
    DataCase("seg-count-differs", lambda: mk.with_record(_set_round(1, answer="<seg> and <seg>")),
             skipped=r"2 <seg> in the answer but 1 mask id"),
    DataCase("unknown-mask-id", lambda: mk.with_record(_set_round(1, mask_ids=[999])), skipped=r"mask id 999 is not in annotations.json"),
    DataCase("missing-image", lambda: mk.with_record(lambda r: {**r, "image": "nope.png"}), skipped=r"image file not found"),
    DataCase("image-not-an-image", lambda: mk.with_record(lambda r: {**r, "image": "conversations.jsonl"}), skipped=r"cannot read image"),
    DataCase("rle-garbage-counts", lambda: mk.with_annotation(lambda a: a["segmentation"].update(counts="}}}}not-rle")),
             skipped=r"mask id 3: unreadable segmentation in annotations.json"),
    DataCase("rle-wrong-size", lambda: mk.with_annotation(lambda a: a["segmentation"].update(size=[5, 5])),
             skipped=r"mask id 3: unreadable segmentation in annotations.json"),
    DataCase("rle-empty-mask", lambda: mk.with_annotation(_empty_mask), skipped=r"round 2: mask 3 is empty"),
    DataCase("polygon-odd-coordinates", lambda: mk.with_annotation(lambda a: a.update(segmentation=[[1, 2, 3]])),
             skipped=r"mask id 3"),
    DataCase("annotations-not-json", lambda: mk.Folder(mk.good_folder().anns, mk.good_folder().lines, "{not json"),
             fails(r"cannot read .*annotations.json")),
    DataCase("annotations-a-list", lambda: mk.Folder(mk.good_folder().anns, mk.good_folder().lines, "[]"),
             fails(r"cannot read .*annotations.json")),
    DataCase("no-usable-line", lambda: mk.Folder(mk.good_folder().anns, ["{oops", "", "[]"]),
             fails(r"conversations.jsonl has no usable conversation records")),
]


def _released_ok() -> list:
    """A valid record: round 2's ``ind: [-1]`` without MASK-ENCODE means "no reference"."""
    return [{"task": "segmentation", "base": None, "conversations": [
        turn("human", f"[IMAGE256:{IMG1}] Segment the dog."),
        turn("gpt", f"[MASK-DECODE:{IMG1}|refcoco|101]."),
        turn("human", "Segment the cup.", ind=[-1]),
        turn("gpt", f"[MASK-DECODE:{IMG1}|refcoco|103]."),
    ]}]


def _released_plus(change: Callable[[dict], object]) -> Callable[[], list]:
    def make() -> list:
        good = _released_ok()
        return good + [change(json.loads(json.dumps(good[0])))]

    return make


def _turns(**kw) -> Callable[[dict], dict]:
    def change(r: dict) -> dict:
        r.update(kw)
        return r

    return change


def _human(n: int, value: str, ind=None) -> Callable[[dict], dict]:
    def change(r: dict) -> dict:
        r["conversations"][2 * (n - 1)] = turn("human", value, ind)
        return r

    return change


def _gpt(n: int, value: str) -> Callable[[dict], dict]:
    def change(r: dict) -> dict:
        r["conversations"][2 * n - 1] = turn("gpt", value)
        return r

    return change


RELEASED_CASES = [
    DataCase("released-ind-minus-one", _released_ok),
    DataCase("released-ind-names-a-later-round",
             _released_plus(_human(2, f"[MASK-ENCODE:{IMG1}|refcoco|101] Segment the cup.", ind=[2])),
             skipped=r"'ind' names round 2, which is not an earlier round"),
    DataCase("released-unknown-dataset", _released_plus(_gpt(1, f"[MASK-DECODE:{IMG1}|foo_dataset|101].")),
             skipped=r"unknown dataset name 'foo_dataset'"),
    DataCase("released-malformed-macro", _released_plus(_gpt(1, "[MASK-DECODE:a:b:c]")), skipped=re.escape("[MASK-DECODE:a:b:c]")),
    DataCase("released-no-gpt-answer", _released_plus(lambda r: {**r, "conversations": r["conversations"][:3]}),
             skipped=r"the last human turn has no gpt answer"),
    DataCase("released-other-task", _released_plus(_turns(task="any2any")), skipped=r"only 'segmentation' records hold masks"),
    DataCase("released-missing-image", _released_plus(_gpt(1, "[MASK-DECODE:coco/train2014/gone.jpg|refcoco|101].")),
             skipped=r"gone.jpg"),
    DataCase("released-unknown-mask-id", _released_plus(_gpt(1, f"[MASK-DECODE:{IMG1}|refcoco|999].")),
             skipped=r"annotation id 999 not found"),
    DataCase("released-empty-mask", _released_plus(_gpt(1, f"[MASK-DECODE:{IMG1}|refcoco|104].")), skipped=r"is empty"),
    DataCase("released-record-not-an-object", _released_plus(lambda r: "just text"), skipped=r"record is a str, not an object"),
    DataCase("released-no-conversations-key", _released_plus(lambda r: {"task": "segmentation"}),
             skipped=r"record has no 'conversations' list"),
    DataCase("released-file-a-dict", lambda: {"records": []}, fails(r"expected a JSON list of conversation records")),
    DataCase("released-file-not-json", lambda: "[{oops", fails(r"cannot read .*convs.json")),
]


def _write_released(folder: Path, data) -> Path:
    path = folder / "convs.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _eval_args(ckpt: str, out: Path) -> list:
    return ["--checkpoint", ckpt, "--protocol", "oracle", "--out", out, "--name", "t", "--batch-size", "1"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FOLDER_CASES])
def test_folder_api(case: DataCase, tmp_path):
    folder = mk.write_folder(tmp_path / "data", case.make())
    ds = check_api(case.expect, lambda: ConversationFolder(folder))
    if not case.expect.ok:
        return
    got = [ds.get(i) for i in range(len(ds))]
    reasons = [reason for _, reason in ds.skipped.items]
    if case.skipped is None:
        assert reasons == [] and all(c is not None for c in got)
    else:
        assert len(reasons) == 1 and re.search(case.skipped, reasons[0]), reasons
        where = ds.skipped.items[0][0]
        assert "conversations.jsonl:2" in where  # the file and the line of the bad record
    assert got[0] is not None and len(got[0].rounds) == 2  # the good record is still read


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in FOLDER_CASES])
def test_folder_cli_eval(case: DataCase, tmp_path, capsys, tiny_checkpoint):
    folder = mk.write_folder(tmp_path / "data", case.make())
    res = run_cli(capsys, ["eval", "--data", folder, *_eval_args(tiny_checkpoint, tmp_path / "out")])
    check_cli(case.expect, res)
    if case.expect.ok:
        report = json.loads((tmp_path / "out" / "t.json").read_text())["results"][0]
        if case.skipped:
            assert "skipped 1 unusable record(s)" in res.out and re.search(case.skipped, res.out), res.out
            assert report["skipped"] == 1 and re.search(case.skipped, report["skipped_records"][0]["reason"])
        else:
            assert "skipped" not in res.out and report["skipped"] == 0


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in RELEASED_CASES])
def test_released_api(case: DataCase, tmp_path, released_layout):
    path = _write_released(tmp_path, case.make())
    ds = check_api(case.expect, lambda: ReleasedConversations(path, released_layout["images"], released_layout["ann"]),
                   names="convs.json")
    if not case.expect.ok:
        return
    got = [ds.get(i) for i in range(len(ds))]
    assert got[0] is not None and len(got[0].rounds) == 2 and got[0].rounds[1].refs == ()
    reasons = [reason for _, reason in ds.skipped.items]
    if case.skipped is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and re.search(case.skipped, reasons[0]), reasons
        assert ds.skipped.items[0][0].endswith("convs.json[1]")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in RELEASED_CASES])
def test_released_cli_eval(case: DataCase, tmp_path, capsys, released_layout, tiny_checkpoint):
    path = _write_released(tmp_path, case.make())
    res = run_cli(capsys, ["eval", "--benchmark", "released", "--conversations", path, "--images", released_layout["images"],
                           "--annotations", released_layout["ann"], *_eval_args(tiny_checkpoint, tmp_path / "out")])
    check_cli(case.expect, res, names=None if case.expect.ok else "convs.json")
    if case.expect.ok:
        report = json.loads((tmp_path / "out" / "t.json").read_text())["results"][0]
        assert report["per_round"]["all"]["n"] >= 2  # both rounds of the valid record are scored
        if case.skipped:
            assert "skipped 1 unusable record(s)" in res.out and re.search(case.skipped, res.out), res.out


# -- chat scripts (the CLI's conversation files) -----------------------------------------------
SCRIPTS = [
    ("script-missing", None, fails(r"cannot read the script .*nothing.txt")),
    ("script-json-malformed", ("s.json", '{"questions": ['), fails(r"script .*s.json is not valid JSON")),
    ("script-json-no-questions", ("s.json", '{"asks": ["x"]}'), fails(r"s.json: expected a JSON list of questions")),
    ("script-json-numbers", ("s.json", "[1, 2]"), fails(r"s.json: expected a JSON list of questions")),
    ("script-binary", ("s.txt", b"\xff\xfe\x00\x81garbage"), fails(r"cannot read the script .*s.txt")),
    ("script-json-list", ("s.json", '["Segment the red circle.", "undo", "Segment the star."]'), OK),
]


@pytest.mark.parametrize("content, expect", [pytest.param(*c[1:], id=c[0]) for c in SCRIPTS])
def test_chat_script(content, expect, tmp_path, capsys, cached_loading):
    if content is None:
        script = tmp_path / "nothing.txt"
    else:
        script = tmp_path / content[0]
        (script.write_bytes if isinstance(content[1], bytes) else script.write_text)(content[1])
    image = mk.rgb(tmp_path, "img.png")
    res = run_cli(capsys, ["chat", image, "--checkpoint", cached_loading, "--script", script, "--out", tmp_path / "o",
                           "--max-new-tokens", "2"])
    check_cli(expect, res)
    if expect.ok:
        assert "undid round 1" in res.out and "round 1: Segment the star." in res.out


# -- questions: the API, ``segllm chat --ask`` and the demo's ask handler ------------------------
QUESTIONS = [
    ("ref-to-missing-round", "Segment it [REF:7]", fails(r"refers to round 7, which does not exist")),
    ("instance-of-missing-round", "Segment the one next to instance 9.", fails(r"refers to round 9, which does not exist")),
    ("ref-to-round-0", "Segment it [REF:0]", fails(r"refers to round 0")),
    ("empty-question", "   ", fails(r"the question is empty")),
    ("only-a-ref", "[REF:1]", fails(r"the question is empty once \[REF:k\] is removed")),
    ("over-the-context", "Segment the red circle. " * 400, fails(r"longer than|context|fit")),
    ("unicode-and-controls", "Segment the caf\u00e9 \U0001f436 \t\x07 thing.", OK),
    ("special-tokens-as-text", "Segment <image> <seg> <mask> <box> [SEG] thing.", OK),
]


@pytest.fixture
def confident(tiny_model):
    """The tiny model's masks made non-empty (random weights give logits near 0), so that a later
    round can refer to round 1; removed after the test."""

    def hook(module, args, out):
        out.mask_logits = out.mask_logits * 0 + 1.0
        return out

    handle = tiny_model.decoder.register_forward_hook(hook)
    yield tiny_model
    handle.remove()


@pytest.mark.parametrize("question, expect", [pytest.param(q, e, id=i) for i, q, e in QUESTIONS])
def test_question_api(question, expect, confident):
    s = Session(confident, mk.pattern(), max_new_tokens=2)
    s.ask("Segment the red circle.", answer="<seg>")
    got = check_api(expect, lambda: s.ask(question))
    if expect.ok:
        assert got.round == 2 and got.masks.shape[1:] == (mk.H, mk.W)
    else:
        assert len(s.history) == 1  # the session goes on, unchanged
        if "context" in expect.error:
            assert isinstance(got, ContextTooLongError)


@pytest.mark.parametrize("question, expect", [pytest.param(q, e, id=i) for i, q, e in QUESTIONS])
def test_question_cli(question, expect, tmp_path, capsys, cached_loading, confident):
    image = mk.rgb(tmp_path, "img.png")
    res = run_cli(capsys, ["chat", image, "--checkpoint", cached_loading, "--ask", "Segment the red circle.", "--ask", question,
                           "--out", tmp_path / "o", "--max-new-tokens", "2"])
    assert "Traceback" not in res.out + res.err
    if expect.ok:
        assert res.rc == 0 and "round 2" in res.out, res.err
    else:
        # a bad round is one error line; the session goes on and round 1's files are written
        lines = [line for line in res.err.splitlines() if line.startswith("error:")]
        assert res.rc == 1 and len(lines) == 1 and re.search(expect.error, lines[0]), res.err
        assert (tmp_path / "o" / "round1_mask1.png").is_file()


@pytest.mark.parametrize("question, expect", [pytest.param(q, e, id=i) for i, q, e in QUESTIONS])
def test_question_demo(question, expect, tmp_path, demo, confident):
    request = demo_request()
    demo.set_image(str(mk.rgb(tmp_path, "img.png")), request, no_progress)
    demo.ask("Segment the red circle.", [], request, no_progress)
    got = check_demo(expect, lambda: demo.ask(question, [], request, no_progress))
    if expect.ok:
        assert got[3].startswith("Round 2")
    else:  # the conversation goes on
        assert demo.ask("Segment the star.", [], request, no_progress)[3].startswith("Round 2")
    demo.app.segllm_store.drop(request.session_hash)


CASE_COUNT = len(FOLDER_CASES) + len(RELEASED_CASES) + len(SCRIPTS) + len(QUESTIONS)
DOOR_COUNT = 2 * len(FOLDER_CASES) + 2 * len(RELEASED_CASES) + len(SCRIPTS) + 3 * len(QUESTIONS)
