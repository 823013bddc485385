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


def pretrain_lm(model, tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int, lr: float = 3e-3,
                batch: int = 32, seed: int = 0):
    """Plain next-token training on ``texts`` so that the teacher has real (peaked) predictions."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    enc = tokenizer([tokenizer.bos_token + t for t in texts], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(texts), (batch,), generator=gen)
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss)
