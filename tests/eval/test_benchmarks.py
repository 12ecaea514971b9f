"""The paper's benchmarks on miniature data in the real formats (tests/released_layout.py):
readers, metrics against hand-computed values (released-frame variant and ignore regions included),
a full ``segllm eval`` per benchmark type, and several processes' logs merged."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from segllm.cli import main
from segllm.data.benchmark_readers import TEMPLATES, ReasonSegData, RefcocoSentences, read_templates
from segllm.eval.benchmarks import default_frame, paper_lines, published
from segllm.eval.evaluate import EvalResult, evaluate, read_logs
from segllm.eval.metrics import RoundMetrics, mask_scores, released_frame_gt


def test_mask_scores_by_hand():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0:2, 0:2] = True  # 4 pixels
    gt[0:2, 1:3] = True  # 4 pixels, 2 shared
    inter, union, iou, hit = mask_scores(pred, gt)
    assert (inter, union, iou) == (2, 6, pytest.approx(1 / 3))
    assert not hit  # boxes [0,0,2,2] vs [1,0,3,2]: IoU 1/3
    ignore = np.zeros((4, 4), bool)
    ignore[0, :] = True  # drops one shared and two other pixels
    assert mask_scores(pred, gt, ignore=ignore)[:3] == (1, 3, pytest.approx(1 / 3))
    assert mask_scores(pred, gt, eps=1e-4)[2] == pytest.approx(2 / (6 + 1e-4))
    empty = np.zeros((4, 4), bool)
    assert mask_scores(empty, empty)[2] == 1.0 and mask_scores(empty, empty, eps=1e-4)[2] == 0.0
    assert mask_scores(pred, gt, np.array([1, 0, 3, 2]))[3]  # a given predicted box that matches


def test_released_frame_gt():
    gt = np.zeros((2, 4), bool)
    gt[:, 1:3] = True
    out = released_frame_gt(gt, size=8)  # longest side 4 -> 8: rows 0-3 are the image, 4-7 padding
    assert out.shape == (8, 8) and not out[4:].any()
    assert out[:4, 2:6].all() and not out[:4, 0].any() and not out[:4, 7].any()


def test_round_metrics_released_epsilon():
    m = RoundMetrics(eps=1e-4)
    m.add(1, np.ones((2, 2), bool), np.ones((2, 2), bool))
    assert m.summary()["1"]["mIoU"] == pytest.approx(100 * 4 / (4 + 1e-4))


def test_refcoco_sentences(released_layout):
    ann, images = released_layout["ann"], released_layout["images"] / "coco/train2014"
    train = RefcocoSentences(ann, images, "refcoco", "train", templates=read_templates("lisa"))
    assert len(train) == 2
    conv = train[0]
    assert conv.rounds[0].question == "What is left dog in this image? Please output segmentation mask."
    assert conv.rounds[0].masks[0].sum() == 24 and conv.image.shape[:2] == (12, 16)
    test_a = RefcocoSentences(ann, images, "refcoco", "testA")
    assert test_a[0].rounds[0].question == "Segment the man." and test_a[0].rounds[0].masks[0].any()
    with pytest.raises(Exception, match="no refs in split 'val'"):
        RefcocoSentences(ann, images, "refcoco", "val")
    with pytest.raises(ValueError, match="unknown RefCOCO dataset"):
        RefcocoSentences(ann, images, "refclef", "val")


def test_template_files(tmp_path):
    f = tmp_path / "sesame.txt"
    f.write_text("Where is {sent}?\nShow me {sent}.\n")
    assert read_templates(str(f)) == ["Where is {sent}?", "Show me {sent}."]
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="sent"):
        read_templates(str(f))
    assert read_templates("segllm") == TEMPLATES["segllm"]


def test_refcoco_bad_refs_are_skipped(released_layout, tmp_path):
    ann = tmp_path / "ann"
    (ann / "refcoco").mkdir(parents=True)
    (ann / "refcoco/instances.json").write_text((released_layout["ann"] / "refcoco/instances.json").read_text())
    refs = [
        {"ref_id": 1, "ann_id": 999, "image_id": 1, "split": "val", "sentences": [{"sent": "ghost"}]},
        {"ref_id": 2, "ann_id": 101, "image_id": 1, "split": "val", "sentences": [{"sent": "dog"}]},
        {"ref_id": 3, "ann_id": 104, "image_id": 1, "split": "val", "sentences": [{"sent": "nothing"}]},
    ]
    (ann / "refcoco/refs(unc).p").write_bytes(pickle.dumps(refs))
    data = RefcocoSentences(ann, released_layout["images"] / "coco/train2014", "refcoco", "val")
    got = [data.get(i) for i in range(len(data))]
    assert got[0] is None and got[1] is not None and got[2] is None
    reasons = [r for _, r in data.skipped.items]
    assert "annotation 999 is not in instances.json" in reasons[0] and "empty" in reasons[1]


def test_reasonseg_ignore_follows_the_exif_orientation(released_layout):
    """A photo stored 20 wide x 16 tall with EXIF orientation 6 is read 16 x 20 (as displayed): the
    ignore map is made at that size too, so the evaluation can apply it."""
    rs1 = released_layout["images"] / "reason_seg/images/train/rs1.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((16, 20, 3), 90, np.uint8)).save(rs1, exif=exif.tobytes())
    data = ReasonSegData(released_layout["images"] / "reason_seg/images/train", released_layout["ann"] / "reason_seg/annotations/train")
    (ignore,) = data.ignore(0)[0]
    assert data[0].image.shape[:2] == ignore.shape == (20, 16)


def test_reasonseg_question_target_and_ignore(released_layout):
    data = ReasonSegData(released_layout["images"] / "reason_seg/images/train", released_layout["ann"] / "reason_seg/annotations/train")
    conv = data[0]
    assert conv.rounds[0].question == "What can hold water? Please output segmentation mask."
    (ignore,) = data.ignore(0)[0]
    target = conv.rounds[0].masks[0]
    assert ignore[5:9, 5:9].all() and ignore.sum() == 16 and not (ignore & target).any()
    # a prediction that also covers the ignore square loses nothing under LISA's metric
    m = RoundMetrics()
    m.add(1, target | ignore, target, ignore=ignore)
    assert m.summary()["1"]["cIoU"] == 100.0


def test_sharded_logs_merge_to_the_single_process_result(tmp_path):
    from segllm.data.records import WorldConversations
    from segllm.default import load_model

    model = load_model()
    data = WorldConversations("val", 5)
    whole = evaluate(model, data, protocol="oracle", batch_size=2)
    logs = [tmp_path / f"r{r}.jsonl" for r in range(2)]
    for r in range(2):
        evaluate(model, data, protocol="oracle", batch_size=2, log_path=logs[r], rank=r, world_size=2)
    assert [json.loads(x)["index"] for x in logs[1].read_text().splitlines()] == [1, 3]
    merged = read_logs(logs, protocol="oracle")
    assert merged.conversations == 5
    for k, v in whole.metrics.items():
        assert merged.metrics[k]["n"] == v["n"]
        assert merged.metrics[k]["cIoU"] == pytest.approx(v["cIoU"])


# the miniature has no evaluation files for pascal and reason_seg (the data check would stop the
# run): evaluation reads the training ones instead
TRAIN_AS_EVAL = ["--annotation", "pascal_eval=pascal/pascal_labels.json",
                 "--annotation", "reason_seg_eval=reason_seg/annotations/train"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--benchmark", "refcoco", "--split", "testA"], "SegLLM (reported) 81.5"),
        # LISA's question: its own figure or none, never the default question's 81.5
        (["--benchmark", "refcoco", "--split", "testA", "--template", "lisa"], "(lisa template): here (oracle, released frame, as the paper) cIoU"),
        (["--benchmark", "reasonseg", "--split", "train"], "gIoU"),
        (["--benchmark", "released", "--conversations", "all_data_mix_train/mix.json", *TRAIN_AS_EVAL], "skipped"),
        (["--benchmark", "mr-refcoco", "--conversations", "all_data_mix_train/mix.json",
          "--max-rounds", "3", *TRAIN_AS_EVAL], "paper"),
        (["--benchmark", "refcoco", "--split", "train", "--frame", "released"], "128x128 decoder frame"),
        (["--benchmark", "mr-paco", "--conversations", "all_data_mix_train/mix.json", "--protocol", "oracle", "own",
          *TRAIN_AS_EVAL], "own cIoU"),
    ],
)
def test_segllm_eval_per_benchmark(released_layout, tmp_path, capsys, args, expect):
    rc = main(["eval", "--data-root", str(released_layout["root"]), "--out", str(tmp_path), "--name", "b", *args])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out + captured.err
    assert "cIoU" in out and expect in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"][0]["conversations"] >= 1
    assert (tmp_path / "b_ciou.png").is_file()


# slow set (CI's second step): two fresh torch processes, ~14 s; the fast set keeps the merge of the
# ranks' logs (test_sharded_logs_merge_to_the_single_process_result), and the slow set also kills
# and resumes a two-process eval (tests/reliability/test_faults.py)
@pytest.mark.slow
def test_two_process_eval_matches_one_process(tmp_path):
    """``segllm eval`` under torch.distributed.run (2 CPU processes, gloo): each process takes every
    other conversation and writes its own log; the main process's report equals a one-process run."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    args = ["eval", "--size", "4", "--split", "val", "--protocol", "oracle", "--name", "e"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "segllm.cli", *args, "--out", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(x)["index"] for x in (tmp_path / "two" / f"e.oracle.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert ranks == [[0, 2], [1, 3]]
    one = json.loads((tmp_path / "one" / "e.json").read_text())["results"][0]["per_round"]
    two = json.loads((tmp_path / "two" / "e.json").read_text())["results"][0]["per_round"]
    assert one.keys() == two.keys()
    for k in one:
        assert two[k]["n"] == one[k]["n"] and two[k]["cIoU"] == pytest.approx(one[k]["cIoU"], abs=1e-6)


@pytest.mark.parametrize(
    "benchmark, frame",
    [(None, "original"), ("world", "original"), ("folder", "original"), ("mr-refcoco", "released"),
     ("mr-refcoco+", "released"), ("mr-refcocog", "released"), ("mr-paco", "released"), ("released", "released"),
     ("refcoco", "released"), ("refcoco+", "released"), ("refcocog", "released"), ("reasonseg", "released")],
)
def test_default_frame_per_benchmark(benchmark, frame):
    """The paper's benchmarks are measured as the paper measured them unless told otherwise;
    the world and own data folders keep the image's resolution."""
    assert default_frame(benchmark) == frame


def _result(frame="released", protocol="oracle", **rounds):
    metrics = {k: {"cIoU": v, "mIoU": v / 2, "P@0.5": 0.0, "n": 1} for k, v in rounds.items()}
    return EvalResult(protocol, metrics, 1, frame=frame)


def test_published_figures_belong_to_one_setting():
    assert published("refcoco", "testA")["SegLLM"] == {"cIoU": 81.5}
    assert published("refcoco", "val", template="lisa") is None  # never the default template's figure
    assert published("refcocog", "testA") is None  # refcocog has no testA
    paco = published("mr-paco", "val")  # rounds 2-5 only, no GLaMM figure, the source named
    assert sorted(paco["rounds"]) == [2, 3, 4, 5] and "SAMTok" in paco["source"]
    assert paco["rounds"][2] == {"LISA": 15.5, "GLaMM": None, "SegLLM": 49.7}
    assert published("mr-paco", "test") is None
    assert published("mr-refcoco", "val")["rounds"][2] == {"LISA": 60.6, "GLaMM": 59.5, "SegLLM": 81.9}
    assert published("reasonseg", "test")["SegLLM"] == {"gIoU": 52.4, "cIoU": 48.4}


def test_paper_line_of_a_template_variant_with_and_without_a_figure():
    res = [_result(all=55.25)]
    (with_figure,) = paper_lines("refcoco", "val", res)
    assert with_figure == "refcoco val cIoU: here (oracle, released frame, as the paper) 55.2   SegLLM (reported) 80.2"
    (without,) = paper_lines("refcoco", "val", res, template="lisa")
    assert without == "refcoco val (lisa template): here (oracle, released frame, as the paper) cIoU 55.2   no published figure"
    (own_file,) = paper_lines("refcoco+", "testB", res, template="my_templates.txt")
    assert own_file.endswith("no published figure") and "62.5" not in own_file


def test_paper_lines_of_mr_paco_and_of_the_frame():
    paco = paper_lines("mr-paco", "val", [_result(all=40.0, **{"1": 50.0, "2": 30.0})])
    assert "history protocol not stated" in paco[0] and "SAMTok" in paco[0]
    assert paco[1] == "  round 2: here (oracle, released frame, as the paper)  30.0   paper 15.5 / - / 49.7"
    assert len(paco) == 5 and paco[4].endswith("paper 20.5 / - / 41.9")  # rounds 2-5, round 1 has none
    lines = paper_lines("mr-refcoco", "val", [_result(frame="original", protocol="own", **{"2": 70.0, "all": 70.0})])
    assert lines[1] == "  round 2: here (own, original resolution, not the paper's measurement)  70.0   paper 60.6 / 59.5 / 81.9"
    assert lines[2].split("   paper ")[0].endswith("    -")  # round 3 is not in the data
    assert paper_lines("released", "val", [_result(all=1.0)]) == []


@pytest.mark.parametrize("args, frame", [([], "released"), (["--frame", "original"], "original")])
def test_benchmark_eval_reports_its_frame(released_layout, tmp_path, capsys, args, frame):
    """Without --frame a paper benchmark is measured in the released frame; the printed output and
    the JSON say which frame was used."""
    rc = main(["eval", "--data-root", str(released_layout["root"]), "--out", str(tmp_path), "--name", "f",
               "--benchmark", "refcoco", "--split", "testA", *args])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["meta"]["frame"] == frame and report["results"][0]["frame"] == frame
    if frame == "released":
        assert "128x128 decoder frame" in out and "released frame, as the paper" in out
    else:
        assert "metrics at original resolution" in out and "not the paper's measurement" in out
