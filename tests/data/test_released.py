"""The released SegLLM data formats, on miniature datasets built in the real layouts."""

from __future__ import annotations

import numpy as np
import pytest

from segllm.conversation import Conversation
from segllm.data.released import (
    DecodeMacro,
    EncodeMacro,
    ImageMacro,
    MaskLookup,
    MaskStore,
    RecordError,
    Refer,
    ReleasedConversations,
    conversation_to_released,
    image_path_candidates,
    load_instances,
    load_refs,
    parse_macro,
    parse_record,
    released_to_conversation,
    split_text,
)
from segllm.errors import ConfigError
from tests.released_layout import ADE, EXP, IMG1, IMG2, IMG9, RS1, RS_IGNORE, RS_TARGET, VG, released_records, turn

# ------------------------------------------------------------------------------ macros


def test_parse_every_macro_form():
    assert parse_macro(f"[IMAGE256:{IMG1}]") == ImageMacro(IMG1)
    assert parse_macro("[MASK-ENCODE:a.jpg|refcoco|12]") == EncodeMacro("mask", "a.jpg", "refcoco", 12)
    assert parse_macro("[BOX-ENCODE:a.jpg|visual_genome|55_1]") == EncodeMacro("box", "a.jpg", "visual_genome", "55_1")
    assert parse_macro("[MASK-ENCODE:a.jpg|reason_seg|']").mask_id is None
    old = parse_macro("[MASK-DECODE:a.jpg|refcoco|7]")
    assert (old.form, old.tgt_id, old.ref_id, old.task) == ("old", 7, None, "none")
    new = parse_macro("[MASK-DECODE:relational:12:0034:a.jpg:refcoco]")
    assert (new.form, new.task, new.ref_id, new.tgt_id, new.image, new.dataset) == (
        "new",
        "relational",
        12,
        34,
        "a.jpg",
        "refcoco",
    )
    six = parse_macro("[MASK-DECODE:attribute:12:0:x-9:a.jpg:pascal]")
    assert (six.form, six.ref_id, six.ref_id2, six.tgt_id) == ("new2", 12, None, "x-9")
    for none in ("none", "", "'", "0"):
        assert parse_macro(f"[MASK-DECODE:none:{none}:5:a.jpg:refcoco]").ref_id is None
    assert parse_macro("[MASK-DECODE:none:none:0:a.jpg:ade20k]").tgt_id == 0  # a target id 0 is a class


def test_non_macro_brackets_stay_text_and_round_trip_exactly():
    text = "[MASK-ENCODE:a.jpg|refcoco|3][BOX-ENCODE:a.jpg|refcoco|3] Segment the one near [REF:1] [sic]."
    pieces = split_text(text)
    assert [type(p).__name__ for p in pieces] == ["EncodeMacro", "EncodeMacro", "str"]
    assert pieces[2] == " Segment the one near [REF:1] [sic]."
    rec = released_records()[0]
    parsed = parse_record(rec)
    assert parsed.to_record() == rec  # unedited records are written back unchanged
    assert parsed.turns[2].ind == (1,) and parsed.turns[4].ind == (2, 1)
    assert parsed.turns[2].text == "Segment the cup near instance 1 [REF:1]."
    assert parsed.image == ImageMacro(IMG1)
    # canonical formats read back to the same macros
    for m in (
        EncodeMacro("mask", "a.jpg", "refcoco", None),
        DecodeMacro("a.jpg", "vg", "5_1", ref_id=3, task="relational"),
        DecodeMacro("a.jpg", "vg", 4, ref_id=None, ref_id2=None, form="new2"),
        DecodeMacro("a.jpg", "refcoco", 4, form="old"),
    ):
        assert parse_macro(m.format()) == m


@pytest.mark.parametrize(
    "bracket, reason",
    [
        ("[MASK-DECODE:a:b:c]", "3 ':'-separated fields"),
        ("[MASK-DECODE:a.jpg|refcoco]", "needs image|dataset|tgt_id"),
        ("[MASK-DECODE:nothing]", "neither ':' nor '|'"),
        ("[MASK-ENCODE:a.jpg|refcoco|1|2]", "3 fields"),
        ("[BOX-ENCODE:a.jpg||1]", "dataset name is empty"),
        ("[IMAGE256]", "malformed IMAGE256"),
        ("[IMAGE256:]", "empty payload"),
        ("[see MASK-ENCODE:a|b|1]", "malformed MASK-ENCODE"),
        ("[MASK-ENCODE:a.jpg|refcoco|abc]", "'abc' is not a number"),
    ],
)
def test_malformed_macros_name_macro_and_reason(bracket, reason):
    with pytest.raises(RecordError) as e:
        split_text(f"Segment {bracket} it")
    assert bracket in str(e.value) and reason in str(e.value)


def test_path_fixups():
    assert (
        image_path_candidates("coco/val2014/COCO_val2014_1.jpg", decode_rules=True)[0]
        == "coco/train2014/COCO_train2014_1.jpg"
    )
    assert image_path_candidates("new_x/VG_100K/1.jpg", decode_rules=True)[0] == "vg/x/VG_100K/1.jpg"
    c = image_path_candidates("coco/val2017/9.jpg")
    assert c[0] == "coco/val2017/9.jpg" and "coco/train2017/9.jpg" in c


# ------------------------------------------------------------------------------- masks


def test_every_mask_lookup_matches_hand_made_masks(released_layout):
    lookup = MaskLookup(released_layout["ann"])
    images = {
        "refcoco": IMG1,
        "paco_lvis": IMG9,
        "paco_lvis_eval": IMG9,
        "lvis": IMG9,
        "ade20k": ADE,
        "cocostuff": IMG9,
        "visual_genome": VG,
        "pascal": VG,
        "description_based_coco": IMG2,
    }
    for (name, mid), want in EXP.items():
        got = lookup(name, images.get(name, IMG2), mid, image_size=want.shape)
        assert got.dtype == bool and np.array_equal(got, want), (name, mid)
    # ReasonSeg: SegLLM drops ignore polygons to background (the target polygon keeps them); LISA marks them 255
    rs = lookup.get("reason_seg", RS1, None, image_size=(20, 20))
    assert np.array_equal(rs, RS_TARGET)
    assert np.array_equal(lookup.reason_seg_ignore(RS1, image_size=(20, 20)), RS_IGNORE)
    labels = lookup.reason_seg_labels(RS1, image_size=(20, 20))
    assert np.array_equal(labels == 1, RS_TARGET & ~RS_IGNORE)
    # files are read once and cached; is_eval switches to the evaluation file
    assert len(lookup._cache) == 7
    assert MaskLookup(released_layout["ann"], is_eval=True).path("paco_lvis").name == "paco_lvis_v1_val.json"
    assert MaskLookup(released_layout["ann"], is_eval=True).path("refcoco").name == "instances.json"


def test_lookup_errors_name_the_problem(released_layout):
    lookup = MaskLookup(released_layout["ann"])
    cases = [
        (("foo", IMG1, 1), "unknown dataset name 'foo'"),
        (("refcoco", IMG1, 999), "annotation id 999 not found"),
        (("refcoco", IMG1, 104), "is empty"),
        (("refcoco", IMG1, "5_1"), "not a COCO annotation id"),
        (("visual_genome", VG, "nope_1"), "'nope_1' not found"),
        (("ade20k", "ade20k/images/training/missing.jpg", 1), "annotation file not found"),
        (("cocostuff", IMG9, 255), "unlabeled"),
        (("refcocog", IMG1, 1), "annotation file not found"),
        (("reason_seg_eval", RS1, None), "annotation file not found"),
    ]
    for args, msg in cases:
        with pytest.raises(RecordError, match=msg):
            lookup(*args)
    with pytest.raises(RecordError, match="is .12, 16., the image"):
        lookup("refcoco", IMG1, 101, image_size=(5, 5))
    with pytest.raises(ConfigError, match="unknown dataset 'bogus'"):
        MaskLookup(released_layout["ann"], overrides={"bogus": "x.json"})
    over = MaskLookup(released_layout["ann"], overrides={"reason_seg_eval": "reason_seg/annotations/train"})
    assert over("reason_seg_eval", RS1, "", image_size=(20, 20)).sum() == RS_TARGET.sum()


# ------------------------------------------------------------------------------- refer


def test_refer_pickles_and_instances(released_layout):
    refer = Refer(released_layout["ann"] / "refcoco")
    assert refer.split_by == "unc" and len(refer) == 2 and refer.splits == ["testA", "train"]
    (train,) = refer.refs("train")
    assert refer.sentences(train) == ["left dog", "dog"] and refer.ann_id(train) == 101
    assert refer.ann_id(8) == 102 and refer.image_file(8) == IMG2.rsplit("/", 1)[1]
    assert np.array_equal(refer.mask(7), EXP["refcoco", 101])
    with pytest.raises(RecordError, match="no split 'val'"):
        refer.refs("val")
    assert len(load_instances(released_layout["ann"] / "refcoco/instances.json")["annotations"]) == 4


def test_malicious_pickle_is_refused(released_layout, capfd):
    with pytest.raises(RecordError, match=r"refused to load global (posix|os|nt)\.system"):
        load_refs(released_layout["root"] / "evil.p")
    assert "pwned" not in capfd.readouterr().out


# ------------------------------------------------------------------------ conversions


def _same(a: Conversation, b: Conversation):
    assert np.array_equal(a.image, b.image)
    assert [r.question for r in a.rounds] == [r.question for r in b.rounds]
    assert [r.answer for r in a.rounds] == [r.answer for r in b.rounds]
    assert [r.refs for r in a.rounds] == [r.refs for r in b.rounds]
    for ra, rb in zip(a.rounds, b.rounds):
        assert len(ra.masks) == len(rb.masks) and all(np.array_equal(x, y) for x, y in zip(ra.masks, rb.masks))


def test_released_to_conversation(released_layout):
    ds = ReleasedConversations(released_layout["convs"], released_layout["images"], released_layout["ann"])
    assert len(ds) == 11
    c0 = ds[0]
    assert c0.size == (12, 16)
    assert [r.question for r in c0.rounds] == [
        "Segment the dog.",
        "Segment the cup near instance 1 [REF:1].",
        "Segment the one left of both.",
    ]
    assert [r.answer for r in c0.rounds] == ["<seg>.", "Sure, <seg>.", "It is <seg>."]
    assert [r.refs for r in c0.rounds] == [(), (1,), (1, 2)]
    want = [EXP["refcoco", 101], EXP["refcoco", 103], EXP["refcoco", 101]]
    assert all(np.array_equal(r.masks[0], m) for r, m in zip(c0.rounds, want))
    c1 = ds[1]  # VG image found under vg/; pascal mask on the same image
    assert c1.size == (9, 11) and c1.rounds[1].refs == (1,)
    assert np.array_equal(c1.rounds[1].masks[0], EXP["pascal", "2008_000001_3"])
    c2 = ds[2]
    assert all(np.array_equal(r.masks[0], RS_TARGET) for r in c2.rounds) and c2.rounds[1].question == "Again please."
    c3 = ds[3]
    assert np.array_equal(c3.rounds[0].masks[0], EXP["ade20k", 0]) and c3.rounds[1].refs == (1,)
    c4 = ds[4]
    assert c4.size == (8, 10) and [r.refs for r in c4.rounds] == [(), (), (2,)]
    assert np.array_equal(c4.rounds[2].masks[0], EXP["paco_lvis", 202])
    c5 = ds[5]
    assert c5.rounds[0].answer == "<seg> and <seg>" and len(c5.rounds[0].masks) == 2
    assert len(ReleasedConversations(released_layout["convs"], released_layout["images"], released_layout["ann"], max_rounds=1)[0].rounds) == 1


def test_round_trip(released_layout, tmp_path):
    ds = ReleasedConversations(released_layout["convs"], released_layout["images"], released_layout["ann"])
    store = MaskStore()
    for i in range(6):
        conv, info = ds.convert(i)
        # masks already in their datasets: ids written back as they were
        if len({d.removesuffix("_eval") for r in info.dataset for d in r}) == 1:
            rec = conversation_to_released(conv, image=info.image, dataset=info.dataset[0][0], mask_ids=info.mask_ids)
            _same(conv, released_to_conversation(rec, images_root=released_layout["images"], lookup=ds.lookup))
        # any conversation: masks into a store the original reads as description_based_coco
        rec = conversation_to_released(conv, image=info.image, store=store, conv_id=i)
        assert rec["task"] == "segmentation" and "base" in rec
        assert parse_record(rec).to_record() == rec
        path = store.save(tmp_path / "store.json")
        lookup = MaskLookup(released_layout["ann"], overrides={"description_based_coco": path})
        conv2 = released_to_conversation(rec, images_root=released_layout["images"], lookup=lookup)
        _same(conv, conv2)
        rec2 = conversation_to_released(
            conv2,
            image=info.image,
            conv_id=i,
            mask_ids=[
                [f"conv_{i}_r{n}_m{k + 1}" for k in range(len(r.masks))] for n, r in enumerate(conv2.rounds, start=1)
            ],
        )
        assert rec2 == rec
    relational = conversation_to_released(ds[0], image=IMG1, store=MaskStore(), id_prefix="x")["conversations"]
    assert relational[2]["ind"] == [1]
    assert relational[3]["value"] == f"Sure, [MASK-DECODE:relational:x_r1_m1:x_r2_m1:{IMG1}:description_based_coco]."
    with pytest.raises(RecordError, match="either mask_ids .* or a MaskStore"):
        conversation_to_released(ds[0], image=IMG1)


def test_bad_records_raise_and_skip_with_the_record_named(released_layout):
    ds = ReleasedConversations(released_layout["convs"], released_layout["images"], released_layout["ann"])
    expected = {
        6: "unknown dataset name 'foo_dataset'",
        7: "image 'coco/train2014/missing.jpg' not found",
        8: "annotation id 999 not found",
        9: "is empty",
        10: "[MASK-DECODE:a:b:c]",
    }
    for i, msg in expected.items():
        with pytest.raises(RecordError) as e:
            ds[i]
        assert f"mix.json[{i}]" in str(e.value) and msg in str(e.value)
        assert ds.get(i) is None
    assert len(ds.skipped) == len(expected)
    where, reason = ds.skipped.items[0]
    assert where.endswith("mix.json[6]") and "foo_dataset" in reason
    assert ds.where(0).endswith("mix.json[0] (conv_id 17)")


def test_structural_errors():
    lookup = MaskLookup("/nonexistent")
    base = released_records()[0]
    cases = [
        ({**base, "task": "any2any"}, "only 'segmentation'"),
        ({**base, "conversations": base["conversations"][:3]}, "no gpt answer"),
        ({**base, "conversations": [base["conversations"][1], base["conversations"][0]]}, "must alternate"),
        (
            {
                **base,
                "conversations": [
                    turn("human", f"[IMAGE256:{IMG1}] a"),
                    turn("gpt", "[MASK-DECODE:x.jpg|refcoco|1]"),
                    turn("human", "[MASK-ENCODE:x.jpg|refcoco|1] b", ind=[3]),
                    turn("gpt", "ok"),
                ],
            },
            "not an earlier round",
        ),
    ]
    for rec, msg in cases:
        with pytest.raises(RecordError, match=msg):
            released_to_conversation(rec, images_root="/nonexistent", lookup=lookup)


def test_encode_ties_and_image_checks(released_layout, tmp_path):
    lookup = MaskLookup(released_layout["ann"])

    def conv(turn3, gpt2=f"[MASK-DECODE:none:none:101:{IMG1}:refcoco]"):
        rec = {
            "task": "segmentation",
            "base": None,
            "conversations": [turn("human", f"[IMAGE256:{IMG1}] a"), turn("gpt", gpt2), turn3, turn("gpt", "ok")],
        }
        return released_to_conversation(rec, images_root=released_layout["images"], lookup=lookup)

    # an encoded id no earlier round decoded: the turn's ind decides, else it is an error
    assert conv(turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|103] b", ind=1)).rounds[1].refs == (1,)
    with pytest.raises(RecordError, match="mask 103 is no earlier round's MASK-DECODE target"):
        conv(turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|103] b"))
    # ind -1 is the original's "no reference" (its demos write it on every turn without an encode)
    plain = conv(turn("human", "the one on the left", ind=[-1]))
    assert plain.rounds[1].refs == () and plain.rounds[1].question == "the one on the left"
    assert conv(turn("human", "b", ind=-1)).rounds[1].refs == ()
    rec = {"task": "segmentation", "base": None,
           "conversations": [turn("human", f"[IMAGE256:{IMG1}] a"), turn("gpt", "ok"), turn("human", "b", ind=[-1]), turn("gpt", "ok")]}
    assert parse_record(rec).turns[2].ind == () and parse_record(rec).to_record() == rec  # written back as it was
    assert conv(turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|101] b", ind=[-1])).rounds[1].refs == (1,)  # tied by id
    with pytest.raises(RecordError, match="mixes -1"):
        conv(turn("human", f"[MASK-ENCODE:{IMG1}|refcoco|101] b", ind=[-1, 1]))
    with pytest.raises(RecordError, match="'ind' entry -2 is not a 1-based round number"):
        conv(turn("human", "b", ind=[-2]))
    # an encode without ind ties by its id alone
    assert conv(turn("human", f"[BOX-ENCODE:{IMG1}|refcoco|101] b")).rounds[1].refs == (1,)
    with pytest.raises(RecordError, match="differs from the conversation's"):
        conv(turn("human", "b"), gpt2=f"[MASK-DECODE:none:none:101:{IMG2}:refcoco]")
    with pytest.raises(RecordError, match="only MASK-DECODE macros may appear in a gpt turn"):
        conv(turn("human", "b"), gpt2=f"[IMAGE256:{IMG1}]")
    # the visual_genome / pascal layout of a MaskStore
    ds = ReleasedConversations(released_layout["convs"], released_layout["images"], released_layout["ann"])
    c1, info = ds.convert(1)
    store = MaskStore(layout="rle")
    rec = conversation_to_released(c1, image=info.image, dataset="pascal", store=store, id_prefix="p")
    path = store.save(tmp_path / "pascal.json")
    _same(
        c1,
        released_to_conversation(
            rec, images_root=released_layout["images"], lookup=MaskLookup(released_layout["ann"], overrides={"pascal": path})
        ),
    )
