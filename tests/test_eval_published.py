"""Scoring as published: template words never spoken, examples from another split, the normalisation chosen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from config import ConfigError, from_dict
from eval.benchmarks import MCQItem
from eval.config import EvalConfig
from eval.mcq import SEPARATOR, draw_shots, normalise, prompt_document, shots_for
from eval.spoken import load_spoken, shot_items, shots_folder
from model.inputs import SPEECH, TEXT
from shards.format import Chunk, Segment, write_shard

QUESTION = ("Question: ", "\nAnswer:")   # lm-evaluation-harness lm_eval/tasks/arc/arc_easy.yaml, piqa.yaml


def qa(i: int, template: tuple[str, str] = QUESTION) -> MCQItem:
    return MCQItem(f"q{i}", "t", f"alice met bob number {i}", [" paris", " seven"], i % 2, *template)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- template words stay text


def test_text_prompt_reads_the_whole_context_as_one_text(tokenizer):
    shot, item = qa(1), qa(2)
    doc = prompt_document(item, [shot], tokenizer, None)
    assert [s.kind for s in doc.spans] == [TEXT]
    assert doc.spans[0].ids == (ids(tokenizer, "Question: alice met bob number 1\nAnswer:")
                                + ids(tokenizer, " seven" + SEPARATOR) + ids(tokenizer, item.text))


def test_speech_prompt_speaks_only_the_spoken_part(tokenizer):
    shot, item = qa(1), qa(2)
    audio = {it.id: np.ones(800, np.float32) for it in (shot, item)}
    doc = prompt_document(item, [shot], tokenizer, audio)
    assert [s.kind for s in doc.spans] == [TEXT, SPEECH, TEXT, SPEECH, TEXT]
    assert [s.ids for s in doc.spans if s.kind == SPEECH] == [ids(tokenizer, it.context) for it in (shot, item)]
    text = [s.ids for s in doc.spans if s.kind == TEXT]
    assert text[0] == ids(tokenizer, "Question:")                 # its last space is no token before speech
    assert text[1] == ids(tokenizer, "\nAnswer:") + ids(tokenizer, " seven" + SEPARATOR) + ids(tokenizer, "Question:")
    assert text[2] == ids(tokenizer, "\nAnswer:")
    plain = MCQItem("p", "t", "alice met bob", [" a", " b"], 0)   # no template (the toy's): one speech span
    assert [s.kind for s in prompt_document(plain, [], tokenizer, {"p": audio["q1"]}).spans] == [SPEECH]


def test_cascade_replaces_only_the_spoken_part(tokenizer):
    doc = prompt_document(qa(2), [], tokenizer, None, {"q2": "alice met bob"})
    assert doc.spans[0].ids == ids(tokenizer, "Question: alice met bob\nAnswer:")


# ----------------------------------------------------------------------------- examples


def old_shots_for(items, index, k, seed):
    """The examples before fewshot_path existed: the same draws must come out."""
    others = [i for i in range(len(items)) if i != index]
    rng = np.random.default_rng([seed, index])
    picks = rng.choice(len(others), size=min(k, len(others)), replace=False) if others else []
    return [items[others[int(i)]] for i in picks]


def test_examples_from_the_scored_split_are_drawn_as_before():
    items = [qa(i) for i in range(9)]
    for index in range(9):
        assert shots_for(items, index, 5, 3) == old_shots_for(items, index, 5, 3)
    assert draw_shots(items, 5, 3) == [old_shots_for(items, i, 5, 3) for i in range(9)]
    assert draw_shots(items[:1], 5, 3) == [[]]


def test_examples_from_another_split_never_include_the_item():
    items = [qa(i) for i in range(3)]
    pool = shot_items([qa(i) for i in range(2, 6)])          # holds item q2 under the id shot:q2
    assert [it.id for it in pool] == ["shot:q2", "shot:q3", "shot:q4", "shot:q5"]
    shots = draw_shots(items, 4, 0, pool)
    assert all(len(s) == 4 for s in shots[:2]) and len(shots[2]) == 3
    assert all(s.id.startswith("shot:") for row in shots for s in row)
    assert "shot:q2" not in [s.id for s in shots[2]]
    assert draw_shots(items, 4, 0, pool) == shots           # seeded
    folder = shots_folder(Path("spoken"), "arc", shots[0])       # other examples, another set
    assert folder.parent == Path("spoken") and folder.name.startswith("arc-shots-")
    assert folder != shots_folder(Path("spoken"), "arc", shots[1])


# ----------------------------------------------------------------------------- normalisation


def test_normalisations_none_tokens_and_lm_eval_chars():
    logprobs = torch.tensor([-3.0, -4.0])
    tokens = [[1], [1, 2, 3, 4]]
    texts = [" ab", " abcdefg"]           # lm-eval's acc_norm divides by len("ab") and len("abcdefg")
    assert torch.equal(normalise(logprobs, tokens, texts, "none"), logprobs)
    assert torch.equal(normalise(logprobs, tokens, texts, "tokens"), torch.tensor([-3.0, -1.0]))
    assert torch.allclose(normalise(logprobs, tokens, texts, "chars"), torch.tensor([-1.5, -4.0 / 7]))
    with pytest.raises(ValueError, match="norm: must be one of"):
        normalise(logprobs, tokens, texts, "bytes")


def test_config_takes_a_norm_and_examples_per_task():
    cfg = from_dict(EvalConfig, {"norm": "chars", "tasks": [
        {"name": "arc", "path": "arc.jsonl", "fewshot_path": "arc_train.jsonl", "norm": "none"},
        {"name": "piqa", "path": "piqa.jsonl"}]})
    assert [(t.norm or cfg.norm, t.fewshot_path) for t in cfg.tasks] == [("none", "arc_train.jsonl"), ("chars", "")]
    with pytest.raises(ConfigError, match="norm"):
        from_dict(EvalConfig, {"tasks": [{"name": "arc", "path": "a", "norm": "bytes"}]})


# ----------------------------------------------------------------------------- spoken sets


def spoken_set(folder, texts: dict[str, str]):
    folder.mkdir(parents=True)
    chunks = [Chunk(key=f"k{i}", doc=doc, segments=[Segment(text, np.zeros(160, np.float32), 16000)])
              for i, (doc, text) in enumerate(texts.items())]
    write_shard(folder / "000000.tar", chunks)
    (folder / "index.json").write_text(json.dumps({"sr": 16000, "shards": [{"url": "000000.tar"}]}))
    return folder


def test_a_set_spoken_from_other_texts_is_refused(tmp_path):
    item = qa(1)
    good = spoken_set(tmp_path / "good", {"q1": "alice met bob number 1"})
    assert set(load_spoken(good, [item])) == {"q1"}
    old = spoken_set(tmp_path / "old", {"q1": "Question: alice met bob number 1\nAnswer:"})
    with pytest.raises(ValueError, match=r"old: items \['q1'\] were spoken from other texts.*delete the folder"):
        load_spoken(old, [item])
    with pytest.raises(ValueError, match=r"good: no speech for items \['q2'\]"):
        load_spoken(good, [item, qa(2)])
