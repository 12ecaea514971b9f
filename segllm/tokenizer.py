"""Tokenizers: SegLLM's added tokens, and a small byte-level BPE tokenizer trained locally.

The bundled model and the tests use a tokenizer trained here on text they generate, so
nothing is downloaded. Any transformers tokenizer works with the package once
:func:`add_segllm_tokens` has added the placeholder and ``<seg>`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from segllm.config import TemplateConfig

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def segllm_tokens(template: TemplateConfig) -> list[str]:
    """The distinct added tokens a template needs (placeholders may share one token)."""
    seen: list[str] = []
    for tok in (template.image_token, template.mask_token, template.box_token, template.seg_token):
        if tok not in seen:
            seen.append(tok)
    return seen


def add_segllm_tokens(tokenizer: PreTrainedTokenizerBase, template: TemplateConfig) -> int:
    """Add the template's placeholder and ``<seg>`` tokens as special tokens; returns how many were new."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in segllm_tokens(template) if t not in vocab]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)


def train_bpe_tokenizer(
    corpus: Iterable[str], *, vocab_size: int = 512, template: TemplateConfig | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (seconds for a few thousand lines).

    Byte-level means any text can be encoded, even words never seen in the corpus.
    The result has ``<s>``, ``</s>``, ``<pad>`` and the template's SegLLM tokens.
    """
    template = template or TemplateConfig()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, *segllm_tokens(template)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=segllm_tokens(template),
        clean_up_tokenization_spaces=False,
    )
    return fast
