"""A tiny T5 text encoder + Unigram tokenizer built in memory (no files, no hub).

Shared by the text-encoder and pipeline tests:

    from helpers.tiny_t5 import build_tiny_t5, save_tiny_t5
    tokenizer, encoder = build_tiny_t5()            # in memory
    save_tiny_t5(folder)                             # folder/text_encoder + folder/tokenizer

The tokenizer follows T5's layout (`<pad>`=0, `</s>`=1, `<unk>`=2) and knows whole-word
pieces for the shapes-world vocabulary, single letters for anything else.
"""
from __future__ import annotations

import string
from pathlib import Path

TINY_T5_WORDS = (
    "a an the one two three four five of to and is that with on in at left right above below "
    "next beside under over red green blue yellow purple orange white black gray brown pink "
    "circle circles square squares triangle triangles star stars small big large"
).split()

TINY_T5_HIDDEN_SIZE = 32


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-prob score) pairs; whole words score higher than spelling them out."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -3.0 - 0.01 * i) for i, word in enumerate(TINY_T5_WORDS)]
    vocab += [(ch, -8.0) for ch in string.ascii_lowercase + string.digits + ".,"]
    return vocab


def build_tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=512)


def build_tiny_t5_encoder(vocab_size: int, seed: int = 0):
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_T5_HIDDEN_SIZE,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def build_tiny_t5(seed: int = 0):
    """-> (tokenizer, encoder), random weights fixed by `seed`."""
    tokenizer = build_tiny_t5_tokenizer()
    return tokenizer, build_tiny_t5_encoder(len(tokenizer), seed)


def save_tiny_t5(folder: str | Path, seed: int = 0) -> Path:
    """Write `folder/text_encoder/` and `folder/tokenizer/` as a diffusers pipeline folder has them."""
    folder = Path(folder)
    tokenizer, encoder = build_tiny_t5(seed)
    encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder
