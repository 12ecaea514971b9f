"""A round whose answer has several ``<seg>`` through every output: the session's masks, the
PNG files and session.json, the overlay's labels, ``segllm chat``'s lines and the demo's legend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from segllm.cli import main
from segllm.default import EXAMPLES
from segllm.export import from_rle
from segllm.session import Session
from segllm.viz import mask_labels, overlay

MULTI = "From left to right: <seg>, <seg> and <seg>."


class _AllAnswers(Session):
    """A session whose model answers "Segment all ..." questions with three masks (a tiny test
    model does not choose that itself); every other step is the real session's."""

    def ask(self, question, refs=None, *, answer=None, exact_refs=False):
        if answer is None and question.startswith("Segment all"):
            answer = MULTI
        return super().ask(question, refs, answer=answer, exact_refs=exact_refs)


def test_session_keeps_each_mask_and_exports_each(confident_model, image, tmp_path):
    s = Session(confident_model, image, max_new_tokens=3)
    r = s.ask("Segment all the red objects.", answer=MULTI)
    h, w = image.shape[:2]
    assert r.masks.shape == (3, h, w) and r.boxes.shape == (3, 4) and r.scores.shape == (3,)
    assert r.text == MULTI
    # a later round refers to it: all three masks are encoded back
    r2 = s.ask("Segment the first of instance 1 from the left.", answer="It is <seg>.")
    assert r2.refs == (1,) and r2.masks.shape == (1, h, w)
    paths = s.save_masks(tmp_path)
    assert [p.name for p in paths] == ["round1_mask1.png", "round1_mask2.png", "round1_mask3.png", "round2_mask1.png"]
    anns = s.to_coco()["annotations"]
    assert [(a["round"], a["mask"]) for a in anns] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    for a, p in zip(anns, paths):
        assert np.array_equal(from_rle(a["segmentation"]), np.asarray(Image.open(p)) > 0)
        assert a["answer"] == (MULTI if a["round"] == 1 else "It is <seg>.")
    for j in range(3):
        assert np.array_equal(from_rle(anns[j]["segmentation"]), r.masks[j])


def test_overlay_labels_each_mask_of_a_round():
    assert mask_labels(2, 1) == ["2"]
    assert mask_labels(2, 3) == ["2.1", "2.2", "2.3"]
    img = np.zeros((40, 60, 3), np.uint8)
    a = np.zeros((40, 60), bool)
    a[10:30, 2:20] = True
    b = np.zeros((40, 60), bool)
    b[10:30, 35:55] = True
    plain = np.asarray(overlay(img, [(1, a), (1, b)]))
    labelled = np.asarray(overlay(img, [(1, a), (1, b)], labels=mask_labels(1, 2)))
    # both masks tinted in round 1's colour either way; only the labels' pixels differ
    assert (labelled[28, 10] == labelled[28, 45]).all() and labelled[28, 10].any()
    rows, cols = np.nonzero(np.any(plain != labelled, axis=-1))
    # "1.1" and "1.2" are wider than "1": both labels, at each mask's top-left corner, differ
    assert rows.min() >= 9 and rows.max() < 10 + 16
    assert (cols < 35).any() and (cols >= 35).any()
    with pytest.raises(ValueError, match="2 labels for 1 masks"):
        overlay(img, [(1, a)], labels=["1.1", "1.2"])


def test_overlay_in_one_colour_without_labels():
    img = np.zeros((40, 60, 3), np.uint8)
    a = np.zeros((40, 60), bool)
    a[10:30, 2:20] = True
    out = np.asarray(overlay(img, [(2, a)], labels=[""], fill=(255, 0, 255), alpha=0.5))
    # inside: half the fill over black, not round 2's colour; the outline: the fill itself
    assert out[20, 10].tolist() == [127, 0, 127]
    assert out[10, 10].tolist() == [255, 0, 255]
    # no label box: outside the mask nothing is drawn
    assert not out[~a].any()


def test_chat_prints_and_saves_each_mask(tmp_path, capsys, monkeypatch, confident_model):
    monkeypatch.setattr(Session, "from_pretrained", classmethod(
        lambda cls, path, image, **kw: _AllAnswers(confident_model, image, max_new_tokens=3)))
    out = tmp_path / "o"
    rc = main(["chat", str(EXAMPLES / "shapes.png"), "--ask", "Segment all the red objects.",
               "--ask", "Segment the second of instance 1 from the left.", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if MULTI in x)
    for label in ("mask 1.1 [", "mask 1.2 [", "mask 1.3 ["):
        assert label in line
    assert "round 2 (refers to 1)" in printed
    for j in (1, 2, 3):
        assert (out / f"round1_mask{j}.png").is_file()
    coco = json.loads((out / "session.json").read_text())
    anns = [a for a in coco["annotations"] if a["round"] == 1]
    assert [a["mask"] for a in anns] == [1, 2, 3] and all(a["answer"] == MULTI for a in anns)
    for a in anns:
        png = np.asarray(Image.open(out / f"round1_mask{a['mask']}.png")) > 0
        assert np.array_equal(from_rle(a["segmentation"]), png)


def test_demo_legend_shows_each_mask(confident_model, image):
    demo = pytest.importorskip("segllm.demo")
    s = Session(confident_model, image, max_new_tokens=3)
    s.ask("Segment all the red objects.", answer=MULTI)
    s.ask("Segment the first of instance 1 from the left.", answer="It is <seg>.")
    html = demo.legend_html(s)
    first, second = html.split('data-round="2"')
    assert first.count('class="segllm-mask"') == 3  # a chip per mask of round 1
    for label in ("1.1 score", "1.2 score", "1.3 score"):
        assert label in first
    assert "(score " in second and "2.1" not in second
