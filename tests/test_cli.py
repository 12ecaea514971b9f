import json

import numpy as np
import pytest
from PIL import Image

from segllm.cli import main
from segllm.config import MAX_NEW_TOKENS
from segllm.default import EXAMPLES
from tests.helpers import png_declaring

EXAMPLE = EXAMPLES / "shapes.png"


def test_chat_example_runs_end_to_end(tmp_path, capsys):
    assert main(["chat", "--out", str(tmp_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and "round 2 (refers to 1)" in out
    overlays = sorted(tmp_path.glob("round*_overlay.png"))
    assert len(overlays) >= 4
    mask = np.asarray(Image.open(tmp_path / "round1_mask1.png"))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}


def test_chat_script_with_undo_and_clear(tmp_path, capsys):
    import json

    from segllm.export import from_rle

    script = tmp_path / "conv.txt"
    script.write_text("# a prepared conversation\nSegment the cross.\nundo\nSegment the star.\nclear\n"
                      "Segment the house.\nThe tree near instance 1 [REF:1]\nSegment it [REF:7]\n")
    rc = main(["chat", str(EXAMPLE), "--script", str(script), "--out", str(tmp_path / "o"),
               "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert rc == 1  # one round failed ([REF:7] does not exist) and the session went on
    assert "undid round 1" in captured.out and "cleared the conversation" in captured.out
    assert "refers to round 7, which does not exist" in captured.err
    assert "round 2 (refers to 1): The tree near instance 1" in captured.out
    coco = json.loads((tmp_path / "o" / "session.json").read_text())
    assert [a["round"] for a in coco["annotations"]] == [1, 2]
    assert coco["annotations"][1]["refs"] == [1]
    png = np.asarray(Image.open(tmp_path / "o" / "round2_mask1.png")) > 0
    assert np.array_equal(from_rle(coco["annotations"][1]["segmentation"]), png)


def test_chat_reads_questions_from_stdin(tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Segment the cross.\nexit\nSegment the star.\n"))
    assert main(["chat", str(EXAMPLE), "--out", str(tmp_path), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and "round 2" not in out


def test_chat_own_image_and_refs(tmp_path, capsys):
    Image.fromarray(np.full((30, 50, 3), 120, np.uint8)).save(tmp_path / "img.png")
    rc = main(["chat", str(tmp_path / "img.png"), "--ask", "Segment the grey thing.", "--ask", "And the one next to it [REF:1]",
               "--out", str(tmp_path / "o"), "--max-new-tokens", "2"])
    out = capsys.readouterr()
    # a random model may give an empty first mask, which round 2 cannot reference: a clear error, not a crash
    assert rc == 0 or "round 1, whose mask is empty" in out.err
    assert "round 1: Segment the grey thing." in out.out
    assert (tmp_path / "o" / "round1_overlay.png").is_file()


def test_chat_bad_image(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["chat", str(tmp_path / "bad.png"), "--ask", "x"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    # a header declaring 60000 x 60000 pixels: one line naming the file, no Pillow traceback
    bomb = png_declaring(tmp_path / "bomb.png", 60000, 60000)
    assert main(["chat", str(bomb), "--ask", "x"]) == 2
    err = capsys.readouterr().err
    assert "bomb.png" in err and "too large to decode safely" in err and "Traceback" not in err


def test_eval_writes_table_and_reports(tmp_path, capsys):
    rc = main(["eval", "--size", "2", "--split", "val", "--out", str(tmp_path), "--name", "t", "--batch-size", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "oracle cIoU" in out and "own cIoU" in out and "original resolution" in out
    assert {p.name for p in tmp_path.iterdir()} == {"t.json", "t.csv", "t_ciou.png", "t.oracle.rank0.jsonl", "t.own.rank0.jsonl"}


def test_eval_max_new_tokens_bounds_the_answers_the_model_writes(tmp_path, capsys):
    # several-target rounds answer "From left to right: <seg>, <seg> ...": 8 tokens hold one <seg>
    # at most, so targets go without a mask that the default budget gives one
    def missing(budget):
        assert main(["eval", "--size", "2", "--split", "test", "--multi-target-prob", "1.0", "--protocol", "own",
                     "--out", str(tmp_path), "--name", f"m{budget}", "--max-new-tokens", str(budget)]) == 0
        return json.loads((tmp_path / f"m{budget}.json").read_text())["results"][0]["multi_target"]["missing"]

    short, default = missing(8), missing(MAX_NEW_TOKENS)
    capsys.readouterr()
    assert short > default, (short, default)


def test_eval_resumes_without_redoing_finished_conversations(tmp_path, capsys):
    args = ["eval", "--size", "3", "--split", "val", "--out", str(tmp_path), "--name", "r", "--protocol", "own"]
    assert main(args) == 0
    full = json.loads((tmp_path / "r.json").read_text())["results"][0]
    log = tmp_path / "r.own.rank0.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]
    # an interruption: the last conversation's line was cut short
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    assert main(args + ["--resume"]) == 0
    again = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert again["per_round"] == full["per_round"] and again["conversations"] == 3
    redone = log.read_text().splitlines()
    assert redone[:2] == lines[:2] and json.loads(redone[-1]) == json.loads(lines[2])


def test_eval_unknown_benchmark_and_missing_paths_are_errors(tmp_path, capsys):
    assert main(["eval", "--benchmark", "coco-panoptic"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "mr-refcoco", "--data-root", str(tmp_path)]) == 2
    assert "--conversations" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "reasonseg"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_train_resume_without_checkpoint_is_one_line(tmp_path, capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.toml"
    assert main(["train", str(recipe), "--set", f"output_dir='{tmp_path / 'run'}'", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from in" in err and str(tmp_path / "run") in err and "Traceback" not in err


def test_train_rejects_unknown_recipe_key(tmp_path, capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.toml"
    assert main(["train", str(recipe), "--set", "optim.lrate=1"]) == 2
    assert "optim.lrate" in capsys.readouterr().err


def test_eval_union_baseline_and_grounding_on_world(tmp_path, capsys):
    rc = main(["eval", "--size", "2", "--split", "val", "--out", str(tmp_path), "--name", "b", "--protocol", "oracle",
               "--baseline", "union"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "baseline-union cIoU" in out and "grnd" in out and "text-resolvable grounded" in out
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["protocol"] for r in results] == ["oracle", "baseline-union"]
    for r in results:
        assert r["diagnostics"]["per_round"]["all"]["n_grounding"] == r["per_round"]["all"]["n"] > 0
        assert set(r["diagnostics"]["text_resolvable"]) <= {"true", "false"}


def test_world_reports_text_resolvable_share(tmp_path, capsys):
    rc = main(["world", str(tmp_path), "--train", "0", "--val", "0", "--test", "6", "--heldout", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "test" / "meta.json").read_text())
    share = meta["text_resolvable"]
    assert share["rounds"] > 6 and 0 <= share["share"] <= 1
    assert f"test: text-resolvable {100 * share['share']:.1f}% of {share['rounds']} rounds" in out


def test_chat_regions_before_the_questions_and_in_scripts(tmp_path, capsys):
    """--region/--box/--point rounds come first, in the order given; a script adds more; later
    rounds refer to them; session.json marks them as the user's."""
    mask = np.zeros((128, 128), np.uint8)
    mask[40:60, 70:100] = 255
    Image.fromarray(mask).save(tmp_path / "cup.png")
    script = tmp_path / "conv.txt"
    # round 5 refers to a region (never empty), not to round 4's model mask, which may be empty
    script.write_text("region point 20,30:the dot\nSegment the one near instance 1.\nSegment the shape left of instance 2.\n")
    rc = main(["chat", str(EXAMPLE), "--box", "10,12,40,50:the left thing", "--region", f"{tmp_path / 'cup.png'}",
               "--script", str(script), "--out", str(tmp_path / "o"), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "round 1: Segment the left thing.\n  -> '<seg>' (your region)  [10, 12, 40, 50] score 1.00" in captured.out
    assert "round 2: Segment the region I marked." in captured.out and "round 3: Segment the dot." in captured.out
    assert "round 4 (refers to 1)" in captured.out and "round 5 (refers to 2)" in captured.out
    coco = json.loads((tmp_path / "o" / "session.json").read_text())
    assert [a["user"] for a in coco["annotations"]] == [True, True, True, False, False]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "round2_mask1.png")) > 0, mask > 0)


def test_chat_bad_regions_are_one_line_errors(tmp_path, capsys):
    rc = main(["chat", str(EXAMPLE), "--box", "1,2,3", "--point", "900,900", "--region", str(tmp_path / "none.png"),
               "--ask", "Segment the star.", "--out", str(tmp_path / "o"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "--box takes 4 comma-separated numbers" in err and "outside the 128x128 image" in err and "none.png" in err


def test_round_line_says_when_a_mask_is_empty():
    """An empty mask reads "empty", not as the box [0, 0, 0, 0] (a later round cannot refer to it)."""
    from types import SimpleNamespace

    from segllm.commands import _boxes_line

    full, empty = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    full[2:5, 1:4] = True
    boxes = np.array([[1, 2, 4, 5], [0, 0, 0, 0]], np.float32)
    two = SimpleNamespace(round=3, masks=[full, empty], boxes=boxes, scores=np.array([0.9, 0.4], np.float32))
    assert _boxes_line(two) == "mask 3.1 [1, 2, 4, 5] score 0.90, mask 3.2 empty score 0.40"
    one = SimpleNamespace(round=1, masks=[empty], boxes=boxes[1:], scores=np.array([0.5], np.float32))
    assert _boxes_line(one) == "empty score 0.50"


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"segllm {version('segllm')}"


def test_every_command_of_the_parser_has_an_implementation():
    import argparse

    from segllm.cli import build_parser
    from segllm.commands import COMMANDS
    from segllm.data_commands import COMMANDS as DATA_COMMANDS

    def funcs(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from funcs(sub)
        if parser.get_default("func") is not None:
            yield parser.get_default("func")

    named = list(funcs(build_parser()))
    assert len(named) == 12 and not set(COMMANDS) & set(DATA_COMMANDS)
    assert sorted(named) == sorted([*COMMANDS, *DATA_COMMANDS])
