import copy

import pytest

from segllm.config import MemoryConfig, TemplateConfig
from segllm.conversation import Conversation, Round
from segllm.errors import ContextTooLongError, ConversationError
from segllm.processor import IGNORE, Processor
from segllm.tokenizer import add_segllm_tokens


def _processor(tokenizer, memory=True, use_box=True, max_length=512, n_img=16):
    tok = copy.deepcopy(tokenizer)
    t = TemplateConfig()
    add_segllm_tokens(tok, t)
    return Processor(tok, t, MemoryConfig(enabled=memory, use_box=use_box), num_image_tokens=n_img, max_length=max_length)


def test_slots_and_labels(tokenizer, three_rounds):
    p = _processor(tokenizer)
    enc = p.encode(three_rounds)
    ids = enc.input_ids
    assert [ids[i] for i in enc.image_pos] == [p.image_id] * 16
    assert ids.count(p.image_id) == 16
    # rounds 2 and 3 each refer to round 1: a mask and a box placeholder each
    assert [(m.round_index, m.ref_round) for m in enc.memory] == [(1, 1), (2, 1)]
    for m in enc.memory:
        assert ids[m.mask_pos] == p.mask_id and ids[m.box_pos] == p.box_id
    assert [ids[s.pos] for s in enc.segs] == [p.seg_id] * 3
    assert [s.ref for s in enc.segs] == [None, (1, 0), (1, 0)]
    # labels only on answers + end token
    labelled = [i for i, v in enumerate(enc.labels) if v != IGNORE]
    assert all(enc.labels[i] == ids[i] for i in labelled)
    assert sum(1 for v in enc.labels if v == p.eos_id) == 3
    for s in enc.segs:
        assert enc.labels[s.pos] == p.seg_id
    for i in enc.image_pos + [m.mask_pos for m in enc.memory]:
        assert enc.labels[i] == IGNORE
    decoded = p.tokenizer.decode([ids[i] for i in labelled])
    assert decoded.replace("</s>", "|") == "<seg>|It is <seg>.|Sure, <seg>.|"


def test_rounds_are_token_prefixes(tokenizer, three_rounds):
    """k rounds render to a prefix of k+1 rounds: the basis of KV-cache reuse."""
    p = _processor(tokenizer)
    full = p.encode(three_rounds)
    for k in (1, 2):
        part = p.encode(three_rounds.truncated(k))
        assert full.input_ids[: len(part)] == part.input_ids
        assert full.round_spans[:k] == part.round_spans
    open_last = Conversation(three_rounds.image, three_rounds.rounds[:2] + [Round("Segment the one near instance 1.", (1,))])
    enc = p.encode(open_last, open_last=True)
    assert full.input_ids[: len(enc)] == enc.input_ids
    assert enc.round_spans[-1][1] == len(enc)


def test_memory_disabled_keeps_text_only(tokenizer, three_rounds):
    p = _processor(tokenizer, memory=False)
    enc = p.encode(three_rounds)
    assert enc.memory == [] and p.mask_id not in enc.input_ids
    assert "instance 1" in p.tokenizer.decode(enc.input_ids)
    p2 = _processor(tokenizer, use_box=False)
    enc2 = p2.encode(three_rounds)
    assert all(m.box_pos == -1 for m in enc2.memory) and p2.box_id not in enc2.input_ids


def test_user_text_cannot_forge_placeholders(tokenizer, image):
    p = _processor(tokenizer)
    conv = Conversation(image, [Round("Segment <image><seg> please", (), "<seg>", [image[..., 0] > 0])])
    enc = p.encode(conv)
    assert enc.input_ids.count(p.image_id) == 16
    assert enc.input_ids.count(p.seg_id) == 1


def test_context_too_long_says_how_long(tokenizer, three_rounds):
    p = _processor(tokenizer, max_length=60)
    with pytest.raises(ContextTooLongError, match=r"holds 60; about \d+ rounds"):
        p.encode(three_rounds)


def test_missing_answer(tokenizer, image):
    p = _processor(tokenizer)
    with pytest.raises(ConversationError, match="no answer"):
        p.encode(Conversation(image, [Round("a")]))


def test_tokenizer_without_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer), eos_token="</s>")
    t = TemplateConfig(seg_token="<segment>")
    with pytest.raises(ConversationError, match="no seg token"):
        Processor(bare, t, MemoryConfig(), num_image_tokens=4, max_length=64)


def test_repeated_texts_keep_their_ids_and_their_special_token_handling(tokenizer):
    p = _processor(tokenizer)
    typed = p.text_ids("<seg> here")  # a user's text: "<seg>" is split into characters
    assert p.seg_id not in typed
    assert p.text_ids("<seg> here", allow_special=True)[0] == p.seg_id  # an answer: one token
    assert p.text_ids("<seg> here") == typed  # asked again: the same, not the special reading
    got = p.text_ids("Segment the red circle.")
    got.append(-5)  # a caller's list is its own
    assert p.text_ids("Segment the red circle.") == got[:-1]
    fresh = _processor(tokenizer)
    assert fresh.text_ids("Segment the red circle.") == got[:-1]


def _bundled_tokenizer():
    from transformers import AutoTokenizer

    from segllm.default import DEFAULT_MODEL
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.mark.parametrize("which", ["test", "bundled"])
def test_text_ids_are_the_tokenizers_own(tokenizer, which):
    """text_ids calls the fast tokenizer's backend directly: the ids its __call__ gives, typed
    special tokens split or kept, for the test tokenizer and the bundled model's."""
    p = _processor(tokenizer) if which == "test" else Processor(_bundled_tokenizer(), TemplateConfig(), MemoryConfig(), num_image_tokens=4, max_length=512)
    texts = ["Segment the red circle.", "<seg> here", "Sure, it is <seg>.", "the <image> and <mask> of instance 3", " two  spaces ",
             "Ünïcode ümlauts, 'quotes' & digits 12345", "<seg><seg>", "a\nnew line"]
    for text in texts:
        for special in (False, True):
            want = p.tokenizer(text, add_special_tokens=False, split_special_tokens=not special).input_ids
            assert p.text_ids(text, allow_special=special) == want, (text, special)
