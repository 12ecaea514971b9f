import json

import numpy as np
import pytest

from segllm.data.records import ConversationFolder, RecordError, WorldConversations, record_to_conversation
from segllm.data.world import WorldConfig, write_split
from segllm.eval.evaluate import evaluate_baseline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_split(root, "val", 4, seed=3, config=WorldConfig(max_rounds=4))
    return root / "val"


def test_folder_matches_in_memory_world(folder):
    ds = ConversationFolder(folder)
    mem = WorldConversations("val", 4, seed=3, config=WorldConfig(max_rounds=4))
    assert len(ds) == 4
    for i in range(4):
        a, b = ds[i], mem[i]
        assert np.array_equal(a.image, b.image)
        assert [r.question for r in a.rounds] == [r.question for r in b.rounds]
        assert [r.refs for r in a.rounds] == [r.refs for r in b.rounds]
        for ra, rb in zip(a.rounds, b.rounds):
            assert all(np.array_equal(x, y) for x, y in zip(ra.masks, rb.masks))


def _rewrite(folder, tmp_path, edit):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    lines = (dst / "conversations.jsonl").read_text().splitlines()
    lines = edit(lines)
    (dst / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_bad_records_are_skipped_and_named(folder, tmp_path):
    def edit(lines):
        recs = [json.loads(x) for x in lines]
        recs[1]["rounds"][0]["mask_ids"] = [999999]
        recs[2]["image"] = "images/missing.png"
        recs[3]["rounds"][0]["answer"] = "no mask here"
        return [json.dumps(recs[0]), "{not json", json.dumps(recs[1]), json.dumps(recs[2]), json.dumps(recs[3])]

    ds = ConversationFolder(_rewrite(folder, tmp_path, edit))
    assert len(ds) == 4 and len(ds.skipped) == 1  # the malformed line
    assert "conversations.jsonl:2" in ds.skipped.items[0][0]
    assert ds.get(0) is not None
    assert ds.get(1) is None and "999999 is not in annotations.json" in ds.skipped.items[-1][1]
    assert ds.get(2) is None and "not found" in ds.skipped.items[-1][1]
    assert ds.get(3) is None and "0 <seg> in the answer but 1 mask" in ds.skipped.items[-1][1]
    with pytest.raises(RecordError, match=r"conversations.jsonl:5"):
        ds[3]
    # an evaluation counts the malformed line with the records it could not use
    assert ds.unreadable == [ds.skipped.items[0]]
    result = evaluate_baseline(ConversationFolder(ds.root))
    assert len(result.skipped) == 4 and result.to_dict()["skipped"] == 4
    assert any("conversations.jsonl:2" in where for where, _ in result.skipped)


def test_empty_dataset(tmp_path, folder):
    import shutil

    shutil.copytree(folder, tmp_path / "e")
    (tmp_path / "e" / "conversations.jsonl").write_text("\n")
    with pytest.raises(RecordError, match="no usable conversation records"):
        ConversationFolder(tmp_path / "e")
    with pytest.raises(RecordError, match="has no annotations.json"):
        ConversationFolder(tmp_path)


def test_record_checks():
    img = np.zeros((4, 4, 3), np.uint8)
    full = np.ones((4, 4), bool)
    ok = {"rounds": [{"question": "q", "refs": [], "answer": "<seg>", "mask_ids": [1]}]}
    assert len(record_to_conversation(ok, img, lambda i: full).rounds) == 1
    with pytest.raises(RecordError, match="no rounds"):
        record_to_conversation({"rounds": []}, img, lambda i: full)
    with pytest.raises(RecordError, match="is empty"):
        record_to_conversation(ok, img, lambda i: np.zeros((4, 4), bool))
    with pytest.raises(RecordError, match=r"mask 1 is \(2, 2\)"):
        record_to_conversation(ok, img, lambda i: np.ones((2, 2), bool))
    bad_ref = {"rounds": [{"question": "q", "refs": [2], "answer": "<seg>", "mask_ids": [1]}]}
    with pytest.raises(RecordError, match="refers to round 2"):
        record_to_conversation(bad_ref, img, lambda i: full)
    with pytest.raises(RecordError, match="malformed field"):
        record_to_conversation({"rounds": [{"question": "q"}]}, img, lambda i: full)
    no_mask = {"rounds": [{"question": "q", "refs": [], "answer": "none here", "mask_ids": []},
                          {"question": "r", "refs": [1], "answer": "<seg>", "mask_ids": [2]}]}
    with pytest.raises(RecordError, match="refers to round 1, which has no mask"):
        record_to_conversation(no_mask, img, lambda i: full)
    no_mask["rounds"][1]["refs"] = []
    assert [len(r.masks) for r in record_to_conversation(no_mask, img, lambda i: full).rounds] == [0, 1]


def test_round_meta_and_scene_match_between_folder_and_world(folder):
    from segllm.data.records import round_meta

    ds = ConversationFolder(folder)
    mem = WorldConversations("val", 4, seed=3, config=WorldConfig(max_rounds=4))
    for i in range(4):
        a, b = ds.scene(i), mem.scene(i)
        conv = ds[i]
        assert len(a.rounds) == len(conv.rounds)
        assert [(m.kind, m.relation, m.text_resolvable) for m in a.rounds] == \
            [(m.kind, m.relation, m.text_resolvable) for m in b.rounds]
        assert all(m.kind in ("query", "pick") and isinstance(m.text_resolvable, bool) for m in a.rounds)
        # the same objects (ids differ: the folder's are unique across the split)
        assert len(a.masks) == len(b.masks) and len(a.top_level) == len(b.top_level)
        for rnd, m in zip(conv.rounds, a.rounds):
            assert any(np.array_equal(rnd.masks[0], a.masks[k]) for k in a.masks)
            if m.kind == "pick":
                assert len(m.alternatives) >= 2 and all(k in a.masks for k in m.alternatives)
        assert round_meta(ds.records[i][1]) == a.rounds


def test_round_meta_of_records_without_the_fields_and_bad_fields():
    from segllm.data.records import RoundMeta, round_meta

    old = {"rounds": [{"question": "a", "refs": [], "answer": "<seg>", "mask_ids": [3]},
                      {"question": "b", "refs": [1], "answer": "<seg>", "mask_ids": [4], "relation": "positional"}]}
    assert round_meta(old) == [RoundMeta(), RoundMeta(relation="positional")]
    pick = {"rounds": [{"question": "a", "answer": "<seg>", "mask_ids": [3], "kind": "pick"}]}
    assert round_meta(pick)[0].alternatives == (3,)  # none recorded: the target only
    for bad, word in (({"kind": "choose"}, "kind"), ({"text_resolvable": "yes"}, "text_resolvable"),
                      ({"alternatives": 5}, "alternatives")):
        rec = {"rounds": [{"question": "a", "answer": "<seg>", "mask_ids": [3], **bad}]}
        with pytest.raises(RecordError, match=word):
            round_meta(rec)


def test_scene_mask_ids_point_at_the_rounds_masks(folder):
    ds = ConversationFolder(folder, max_rounds=2)
    for i in range(4):
        scene, conv = ds.scene(i), ds[i]
        assert len(scene.mask_ids) == len(scene.rounds) == len(conv.rounds) <= 2
        for rnd, ids in zip(conv.rounds, scene.mask_ids):
            assert all(np.array_equal(m, scene.masks[k]) for m, k in zip(rnd.masks, ids))
