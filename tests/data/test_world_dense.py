import numpy as np

from segllm.data.records import WorldConversations
from segllm.data.world import World
from segllm.data.world.dense import COLOUR_CLASSES, DENSE_GROUPS, SIZE_CLASSES, TEXTURE_CLASSES, dense_labels
from segllm.data.world.scene import CATEGORY_IDS, MIXED


def test_every_object_pixel_carries_its_attributes():
    s = World(seed=0).sample("train", 0)
    maps = dense_labels(s.objects, s.masks)
    assert set(maps) == set(DENSE_GROUPS)
    union = np.zeros(s.image.shape[:2], bool)
    for o in s.objects:
        m = s.masks[o.id]
        union |= m
        if o.parent is None:
            assert (maps["object"][m] == CATEGORY_IDS[o.shape]).all()
            assert (maps["size"][m] == SIZE_CLASSES[o.size]).all()
            assert (maps["texture"][m] == TEXTURE_CLASSES[o.texture]).all()
            if not o.parts:
                assert (maps["category"][m] == CATEGORY_IDS[o.shape]).all()
                assert (maps["colour"][m] == COLOUR_CLASSES[o.colour]).all()
        else:  # a part is what is drawn where it lies
            assert (maps["category"][m] == CATEGORY_IDS[o.shape]).all()
            assert o.colour != MIXED and (maps["colour"][m] == COLOUR_CLASSES[o.colour]).all()
    for name, n in DENSE_GROUPS.items():
        assert (maps[name][~union] == 0).all()  # background
        assert maps[name].max() < n


def test_world_conversations_carry_the_maps():
    conv = WorldConversations("val", 4)[1]
    assert conv.dense is not None and conv.dense["colour"].shape == conv.size
    assert conv.truncated(1).dense is conv.dense


def test_what_a_question_names_is_true_of_its_target():
    from segllm.data.world.dense import named_labels
    from segllm.data.world.language import Head
    from segllm.model.dense_head import target_labels

    assert named_labels(Head(colour="red", shape="star")) == {
        "colour": COLOUR_CLASSES["red"], "category": CATEGORY_IDS["star"], "object": 0, "texture": 0, "size": 0}
    assert named_labels(Head(shape="house", size="large"))["object"] == CATEGORY_IDS["house"]
    ds = WorldConversations("train", 40, seed=3)
    groups = list(DENSE_GROUPS)
    named_somewhere = 0
    for i in range(40):
        conv = ds[i]
        assert len(conv.named) == len(conv.rounds)
        got = target_labels(conv.dense, [r.masks[0] for r in conv.rounds], groups)
        for r, named in enumerate(conv.named):
            for g, name in enumerate(groups):
                if named[name]:
                    named_somewhere += 1
                    # pick rounds name what every valid answer shares, the target included
                    assert got[r, g].item() == named[name], (i, r, name)
    assert named_somewhere > 40
    assert len(ds[0].truncated(1).named) == 1
