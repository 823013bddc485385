"""Fast checks of the toy asset builder's pieces (the reduced end-to-end build is tests/test_toy_pipeline.py)."""

import json

import numpy as np
import pytest

from shards.build import cut_sentences, sentences
from toy.build import SIZES, build, build_pool
from toy.world import DOMAINS, World


def test_sentences_keep_their_full_stops():
    assert sentences("anna went home. she slept.") == ["anna went home.", "she slept."]


def test_cut_sentences_cut_each_sentence_once_and_keep_every_word():
    text = "one morning eva went to the school. she took her red ball along. hi there."
    parts = cut_sentences(text, np.random.default_rng(0))
    assert " ".join(parts) == text
    assert len(parts) == 5          # two sentences cut in two; "hi there." is too short to cut
    assert all(len(p.split()) >= 2 for p in parts[0::2][:2])


def test_pool_holds_every_domain_unordered(tmp_path):
    sizes = SIZES["reduced"]
    build_pool(World(0), tmp_path / "pool.jsonl", sizes, workers=1)
    rows = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == sizes.pool_per_domain * len(DOMAINS)
    assert {r["domain"] for r in rows} == set(DOMAINS)
    assert [r["domain"] for r in rows[: len(rows) // 2]] != sorted(r["domain"] for r in rows[: len(rows) // 2])


def test_assets_built_with_other_settings_are_refused(tmp_path):
    (tmp_path / "assets.json").write_text(json.dumps({"world_seed": 5, "size": "full", "sizes": {}}))
    with pytest.raises(SystemExit, match="built with other settings"):
        build(tmp_path, world_seed=0, size="reduced")
