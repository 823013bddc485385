"""Tiny stand-ins for real weights, built offline: a BPE tokenizer and a random-init causal LM.

Real checkpoints cannot be downloaded here, so tests and the smoke config exercise the real loading
path (``save_pretrained`` then ``from_pretrained``) on models made by these functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Qwen's (leading spaces are part of tokens), trained on ``texts``."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=list(SPECIAL.values()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_llm(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, hidden: int = 64, layers: int = 2,
             heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A random-init Qwen2-architecture causal LM saved with ``save_pretrained`` (tied embeddings)."""
    import torch

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model
