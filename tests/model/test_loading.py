"""Loading a checkpoint without random initialisation gives the model the old way gave.

``load_pretrained`` builds with ``init_weights=False`` (no ``torch.nn.init`` draws) and then
loads every parameter. The old way built with random initialisation and loaded over it, which
gives the saved model back; these tests compare the new load with the saved model (the tiny
cases) or with a load the old way (the bundled model): parameter for parameter, buffer for
buffer, which parameters are shared and train, and the outputs of a training pass and of a
prediction.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from segllm.checkpoint import WEIGHTS_NAME, load_config, load_tokenizer, load_weights
from segllm.config import LoraConfig, PromptHeadConfig
from segllm.conversation import Conversation, Round
from segllm.default import DEFAULT_MODEL
from segllm.model.builder import build_segllm
from segllm.model.loading import load_pretrained
from segllm.presets import tiny_config
from segllm.train.objective import training_loss
from tests.helpers import wake_ref_prior, with_ref_prior


def _old_way(path):
    """What ``load_pretrained`` did before: random initialisation, then the checkpoint over it."""
    model = build_segllm(load_config(path), load_tokenizer(path), load_weights=False)
    load_weights(model, path / WEIGHTS_NAME)
    return model.eval()


def _shared_groups(model) -> list[list[str]]:
    """Names of the parameters that share memory (tied weights), as sorted groups."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def assert_same_model(a, b, conv: Conversation | None, *, predict: bool = False) -> None:
    """Same parameters, buffers, sharing and trainable flags; with ``conv``, the same outputs of
    a training pass (and with ``predict``, of a generated prediction)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
        assert pa[k].dtype == pb[k].dtype and pa[k].requires_grad == pb[k].requires_grad, k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # the non-persistent ones too
    assert list(ba) == list(bb)
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k
    assert _shared_groups(a) == _shared_groups(b)
    assert a.training == b.training is False
    if conv is None:
        return
    with torch.no_grad():
        oa, ob = training_loss(a, a.prepare([conv])), training_loss(b, b.prepare([conv]))
    for name in ("loss", "lm_loss", "mask_logits", "iou_scores"):
        torch.testing.assert_close(getattr(oa, name), getattr(ob, name), rtol=0, atol=0)
    if not predict:
        return
    ask = Conversation(conv.image, conv.rounds[:1] + [Round("near instance 1", (1,))])
    qa, qb = a.predict(ask, max_new_tokens=4), b.predict(ask, max_new_tokens=4)
    assert qa.token_ids == qb.token_ids
    np.testing.assert_array_equal(qa.masks, qb.masks)


def _tied(cfg):
    cfg.llm.hf_config["tie_word_embeddings"] = True
    return cfg


def _lora(cfg):
    cfg.llm.lora = LoraConfig(r=2, alpha=4.0)
    return cfg


def _hipie(cfg):
    from segllm.decoders.hipie.config import HipieDecoderConfig

    cfg.decoder = HipieDecoderConfig.reduced()
    cfg.decoder.image_size = 128
    cfg.prompt_head = PromptHeadConfig(num_tokens=8, num_ref_tokens=4, dim=768)
    return cfg


# every kind of part whose construction might compute something from its initial weights:
# SAM's decoder and CLIP (tiny), tied embeddings, LoRA adapters, the direct decoder reading the
# referenced mask, HIPIE (its buffers and fusion scales); the bundled model adds the
# convolutional vision tower and the dense heads
CASES = {"tiny": lambda c: c, "tied": _tied, "lora": _lora, "ref_prior": with_ref_prior, "hipie": _hipie}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loading_without_initialisation_gives_the_saved_model(case, tokenizer, three_rounds, tmp_path):
    torch.manual_seed(3)
    model = build_segllm(CASES[case](tiny_config(len(tokenizer))), copy.deepcopy(tokenizer))
    if case == "ref_prior":
        wake_ref_prior(model)  # its layers start at zero: give them values a load must bring
    model.save_pretrained(tmp_path / "ck")
    # HIPIE's forward at 128 px costs more than the rest of the file: its outputs follow from the
    # parameters, buffers and config compared here, and the released-checkpoint goldens
    # (tests/model/test_released.py) check a loaded HIPIE's outputs
    conv = None if case == "hipie" else three_rounds
    assert_same_model(load_pretrained(tmp_path / "ck"), model.eval(), conv)


def test_the_bundled_model_loads_as_it_did(three_rounds):
    assert_same_model(load_pretrained(DEFAULT_MODEL), _old_way(DEFAULT_MODEL), three_rounds, predict=True)


def test_uninitialised_building_is_only_for_loaders(tokenizer):
    with pytest.raises(ValueError, match="load_weights=False"):
        build_segllm(tiny_config(len(tokenizer)), copy.deepcopy(tokenizer), init_weights=False)

