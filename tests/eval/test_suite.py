"""``segllm eval --suite paper`` end to end on the miniature released layout (tests/released_layout.py)
with a few records per evaluation: which checkpoint and conversation file each evaluation uses,
the report (Markdown, JSON, plot) with the published figures of each setting, evaluations whose
data are missing, and a resume after an interruption that matches an uninterrupted run."""

import json
import shutil

import pytest
from PIL import Image

import segllm.commands
import segllm.eval.suite as suite_mod
from segllm.cli import main
from segllm.default import DEFAULT_MODEL, load_model
from segllm.errors import CheckpointError
from segllm.eval.benchmarks import Roots
from segllm.eval.suite import PAPER_SUITE, RELEASED_CHECKPOINTS, checkpoint_path, run_suite
from tests.helpers import RELEASED_FIXTURES
from tests.released_layout import IMG1, IMG2, IMG9, RS1, released_records, turn


def one_round(image, dataset, mid, question="Segment it."):
    return {"task": "segmentation", "base": None, "conversations": [
        turn("human", f"[IMAGE256:{image}] {question}"), turn("gpt", f"[MASK-DECODE:none:none:{mid}:{image}:{dataset}]")]}


def suite_layout(layout):
    """The suite's conversation files for the miniature: MR-RefCOCO, RefCOCO val (SegLLM's and
    LISA's question), MR-PACO and ReasonSeg test; the others are left missing."""
    convs = layout["root"] / "conversations_folder"
    r0 = released_records()[0]  # refcoco, 3 rounds that refer to earlier ones
    files = {
        "all_data_mix_val/mr_refcoco_val.json": [r0, one_round(IMG2, "refcoco", 102)],
        "refcoco_single_round_val/refcoco_val.json": [one_round(IMG1, "refcoco", 101, "Segment the dog."),
                                                      one_round(IMG2, "refcoco", 102, "Segment the man.")],
        "refcoco_single_round_val/refcoco_val_lisa_templates.json": [
            one_round(IMG1, "refcoco", 101, "What is dog in this image? Please output segmentation mask.")],
        "all_data_mix_val/mr_paco_val.json": [one_round(IMG9, "paco_lvis", 301)],  # 301 is only in the val file
        "all_data_mix_val/reason_seg_test.json": [one_round(RS1, "reason_seg", "'", "What can hold water?")],
    }
    for rel, records in files.items():
        (convs / rel).parent.mkdir(parents=True, exist_ok=True)
        (convs / rel).write_text(json.dumps(records))
    # ReasonSeg test's annotations only under .../test: found only through the suite's override
    ann = layout["ann"] / "reason_seg/annotations"
    (ann / "test").mkdir(parents=True, exist_ok=True)
    shutil.copy(ann / "train/rs1.json", ann / "test/rs1.json")
    return layout["root"]


@pytest.fixture
def checkpoints_root(tmp_path):
    """A folder laid out like the released hub repository, each checkpoint the bundled model."""
    root = tmp_path / "ckpts"
    root.mkdir()
    for name in RELEASED_CHECKPOINTS:
        (root / name).symlink_to(DEFAULT_MODEL, target_is_directory=True)
    return root


def test_paper_suite_follows_the_original_scripts():
    by_key = {e.key: e for e in PAPER_SUITE}
    assert len(PAPER_SUITE) == 20 and len(by_key) == 20
    assert by_key["mr-refcoco+"].conversations == "all_data_mix_val/mr_refcoco+_val.json"
    assert (by_key["mr-refcoco+"].checkpoint, by_key["mr-refcoco+"].protocol) == ("mr_refcoco_checkpoint", "own")
    assert by_key["refcocog-test"].conversations == "refcoco_single_round_val/refcocog_test.json"
    assert by_key["refcoco+-val-sesame"].conversations == "refcoco_single_round_val/refcoco+_val_sesame_templates.json"
    assert by_key["refcoco+-val-sesame"].template == "sesame"
    assert (by_key["mr-paco"].checkpoint, by_key["mr-paco"].protocol) == ("mr_paco_checkpoint", "oracle")
    assert by_key["reasonseg-test"].checkpoint == "all_data_checkpoint"
    assert dict(by_key["reasonseg-test"].annotations) == {"reason_seg_eval": "reason_seg/annotations/test"}
    assert checkpoint_path("mr_paco_checkpoint", root="Marlo-Z/SegLLM/") == "Marlo-Z/SegLLM/mr_paco_checkpoint"
    assert checkpoint_path("mr_paco_checkpoint", root="x", single="mine") == "mine"
    with pytest.raises(Exception, match="--checkpoints ROOT"):
        checkpoint_path("mr_paco_checkpoint")


def _run(root, ckpts, out, *extra):
    return main(["eval", "--suite", "paper", "--data-root", str(root), "--checkpoints", str(ckpts), "--out", str(out),
                 "--batch-size", "1", *extra])


def test_suite_end_to_end_and_resume_after_an_interruption(released_layout, checkpoints_root, tmp_path, capsys, monkeypatch):
    root = suite_layout(released_layout)
    real_evaluate = suite_mod.evaluate

    # the reference: one uninterrupted run
    assert _run(root, checkpoints_root, tmp_path / "whole") == 0
    printed = capsys.readouterr().out
    whole = json.loads((tmp_path / "whole/paper.json").read_text())
    ev = {e["key"]: e for e in whole["evaluations"]}
    assert whole["meta"]["frame"] == "released" and whole["meta"]["checkpoints"]["mr_paco_checkpoint"].endswith("ckpts/mr_paco_checkpoint")
    assert ev["mr-refcoco"]["status"] == "done" and ev["mr-refcoco"]["result"]["conversations"] == 2
    assert ev["mr-refcoco"]["result"]["frame"] == "released" and ev["mr-refcoco"]["result"]["protocol"] == "own"
    assert ev["reasonseg-test"]["status"] == "done" and ev["reasonseg-test"]["result"]["skipped"] == 0
    assert ev["mr-paco"]["result"]["conversations"] == 1 and ev["mr-paco"]["published"]["rounds"]["2"]["SegLLM"] == 49.7
    assert ev["mr-refcoco+"]["status"] == "not run"
    assert ev["mr-refcoco+"]["reason"] == "missing conversations_folder/all_data_mix_val/mr_refcoco+_val.json"
    assert ev["reasonseg-val"]["status"] == "not run"
    assert ev["refcoco-testA"]["published"]["SegLLM"] == {"cIoU": 81.5}
    md = (tmp_path / "whole/paper.md").read_text()
    assert "| evaluation | checkpoint | protocol | conversations | ours | paper (SegLLM) |" in md
    c = ev["refcoco-val"]["result"]["per_round"]["all"]["cIoU"]
    assert f"| refcoco val | mr_refcoco_checkpoint | oracle | 2 | cIoU {c:.1f} | cIoU 80.2 |" in md
    assert "| refcoco val (lisa template) | mr_refcoco_checkpoint | oracle | 1 | cIoU " in md and "| no published figure |" in md
    r2 = ev["mr-refcoco"]["result"]["per_round"]["2"]["cIoU"]
    assert f"| 2 | {r2:.1f} / 81.9 | - / 78.0 | - / 79.2 | - / 49.7 |" in md  # this MR-PACO file has one round
    assert md.split("\n| 1 | ")[1].split("\n")[0].endswith("/ - |")  # MR-PACO: no round-1 figure
    assert md in printed and "mr-refcoco+: not run" in printed
    assert Image.open(tmp_path / "whole/paper_rounds.png").size == (640, 360)

    # interrupted in refcoco-val after its first conversation (batches of 1: that one is logged)
    def interrupted(model, data, **kw):
        if data.json_path.name == "refcoco_val.json":
            get = data.get
            data.get = lambda i: (_ for _ in ()).throw(KeyboardInterrupt) if i == 1 else get(i)
        return real_evaluate(model, data, **kw)

    monkeypatch.setattr(suite_mod, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(root, checkpoints_root, tmp_path / "part")
    part = tmp_path / "part"
    assert (part / "evals/mr-refcoco.json").is_file() and not (part / "evals/refcoco-val.json").exists()
    assert [json.loads(x)["index"] for x in (part / "logs/refcoco-val.oracle.jsonl").read_text().splitlines()] == [0]

    # resumed: finished evaluations are read back, refcoco-val redoes only its second conversation
    asked = []

    def spy(model, data, **kw):
        get = data.get
        data.get = lambda i: asked.append((data.json_path.name, i)) or get(i)
        return real_evaluate(model, data, **kw)

    monkeypatch.setattr(suite_mod, "evaluate", spy)
    loads = []
    real_load = segllm.commands.load_model
    monkeypatch.setattr(segllm.commands, "load_model", lambda *a, **kw: loads.append(a[0]) or real_load(*a, **kw))
    assert _run(root, checkpoints_root, part, "--resume") == 0
    assert "mr-refcoco: done in an earlier run" in capsys.readouterr().out
    assert [p.rsplit("/", 1)[1] for p in loads] == ["mr_refcoco_checkpoint", "mr_paco_checkpoint", "all_data_checkpoint"]
    assert ("mr_refcoco_val.json", 0) not in asked and ("refcoco_val.json", 0) not in asked
    assert ("refcoco_val.json", 1) in asked and ("mr_paco_val.json", 0) in asked
    resumed = json.loads((part / "paper.json").read_text())
    for a, b in zip(whole["evaluations"], resumed["evaluations"]):
        assert (a["key"], a["status"]) == (b["key"], b["status"])
        if a["result"]:
            assert b["result"]["conversations"] == a["result"]["conversations"]
            for k, m in a["result"]["per_round"].items():
                assert b["result"]["per_round"][k]["n"] == m["n"]
                assert b["result"]["per_round"][k]["cIoU"] == pytest.approx(m["cIoU"])

    # everything finished: a further --resume loads no model at all
    asked.clear()
    loads.clear()
    assert _run(root, checkpoints_root, part, "--resume") == 0
    assert asked == [] and loads == []


def test_resume_does_not_mix_frames(released_layout, tmp_path, monkeypatch):
    """A log measured in one frame is not continued in another: the evaluation starts afresh."""
    root = suite_layout(released_layout)
    model, real_evaluate, asked = load_model(), suite_mod.evaluate, []

    def spy(model, data, **kw):
        get = data.get
        data.get = lambda i: asked.append(i) or get(i)
        return real_evaluate(model, data, **kw)

    monkeypatch.setattr(suite_mod, "evaluate", spy)
    (e,) = [x for x in PAPER_SUITE if x.key == "refcoco-val"]
    kw = {"checkpoints": lambda name: "ckpt", "load": lambda ckpt: model, "batch_size": 1, "resume": True}
    (first,) = run_suite([e], Roots(root), tmp_path, frame="original", size=1, **kw)
    assert first.result["frame"] == "original" and asked == [0]
    lines = []
    (second,) = run_suite([e], Roots(root), tmp_path, frame="released", **kw, echo=lines.append)
    assert second.result["frame"] == "released" and asked == [0, 0, 1]  # conversation 0 measured again
    assert "refcoco-val: its log was run under other settings; starting it afresh" in lines
    (third,) = run_suite([e], Roots(root), tmp_path, frame="released", **kw)
    assert asked == [0, 0, 1] and third.result == second.result  # finished under these settings: read back


def test_a_checkpoint_that_cannot_load_leaves_only_its_evaluations_not_run(released_layout, tmp_path):
    root = suite_layout(released_layout)
    model = load_model()

    def load(ckpt):
        if ckpt == "mr_paco_checkpoint":
            raise CheckpointError("not in the cache")
        return model

    evals = [x for x in PAPER_SUITE if x.key in ("mr-paco", "refcoco-val-lisa")]
    lisa, paco = run_suite(evals, Roots(root), tmp_path, checkpoints=lambda name: name, load=load)
    assert (paco.status, paco.reason) == ("not run", "checkpoint mr_paco_checkpoint: not in the cache")
    assert lisa.status == "done" and lisa.result["conversations"] == 1
    assert "| mr-paco val | mr_paco_checkpoint | oracle | - | not run: checkpoint mr_paco_checkpoint: not in the cache |" in (
        tmp_path / "paper.md").read_text()


def test_suite_needs_its_checkpoints(released_layout, tmp_path, capsys):
    rc = main(["eval", "--suite", "paper", "--data-root", str(released_layout["root"]), "--out", str(tmp_path)])
    assert rc == 2 and "--checkpoints ROOT" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (RELEASED_FIXTURES / "segllm_tiny/checkpoint/model.safetensors").exists(), reason="released fixture absent")
def test_suite_on_the_miniature_released_checkpoint(released_layout, tmp_path):
    """The miniature released checkpoint (HIPIE decoder, 1024 frame) as every released checkpoint:
    one conversation of MR-RefCOCO and one of ReasonSeg test (minutes on a CPU)."""
    root = suite_layout(released_layout)
    convs = root / "conversations_folder"
    for rel in ("refcoco_single_round_val", "all_data_mix_val/mr_paco_val.json"):
        shutil.rmtree(convs / rel) if (convs / rel).is_dir() else (convs / rel).unlink()
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "vision_tower").symlink_to(RELEASED_FIXTURES / "segllm_tiny/vision_tower", target_is_directory=True)
    for name in RELEASED_CHECKPOINTS:  # its config names the vision tower as ../vision_tower
        (ckpts / name).symlink_to(RELEASED_FIXTURES / "segllm_tiny/checkpoint", target_is_directory=True)
    assert _run(root, ckpts, tmp_path / "out", "--size", "1") == 0
    ev = {e["key"]: e for e in json.loads((tmp_path / "out/paper.json").read_text())["evaluations"]}
    assert ev["mr-refcoco"]["status"] == ev["reasonseg-test"]["status"] == "done"
    assert ev["mr-refcoco"]["result"]["conversations"] == 1 and ev["mr-refcoco"]["result"]["frame"] == "released"
    assert ev["reasonseg-test"]["result"]["per_round"]["1"]["n"] == 1
