"""The in-place growing key/value cache (segllm/model/kv_cache.py) against transformers' DynamicCache."""

import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

from segllm.model.kv_cache import GrowingCache


def _append(caches, B, n, layers=2, g=None):
    for layer in range(layers):
        k, v = torch.randn(B, 2, n, 4, generator=g), torch.randn(B, 2, n, 4, generator=g)
        got = [c.update(k, v, layer) for c in caches]
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


def test_appends_row_selections_and_crops_give_dynamic_caches_values():
    g = torch.Generator().manual_seed(0)
    caches = [DynamicCache(), GrowingCache()]
    for n in (40, 7, 30, 1):  # the first growth, room used, a doubling, one token
        _append(caches, 5, n, g=g)
    for c in caches:
        c.batch_select_indices(slice(0, 4))  # rows ended at the end of the batch: a view
    _append(caches, 4, 9, g=g)
    for c in caches:
        c.batch_select_indices(torch.tensor([0, 2, 3]))  # a row in the middle
    _append(caches, 3, 60, g=g)
    for c in caches:
        c.crop(50)
    _append(caches, 3, 2, g=g)
    ref, grown = caches
    assert ref.get_seq_length() == grown.get_seq_length() == 52
    for a, b in zip(ref.layers, grown.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # appends write into the room: the filled part is a view of a larger buffer
    assert grown.layers[0]._keys_buf.shape[-2] > 52


def test_an_llm_with_it_computes_what_it_computes_with_dynamic_cache():
    torch.manual_seed(0)
    llm = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (3, 30))
    outs = []
    for cache in (DynamicCache(), GrowingCache()):
        with torch.no_grad():
            h = [llm(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).last_hidden_state
                 for a, b in ((0, 12), (12, 13), (13, 30))]
        outs.append(torch.cat(h, dim=1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
