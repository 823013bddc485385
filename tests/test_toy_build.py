"""Fast checks of the toy asset builder's pieces (the reduced end-to-end build is tests/test_toy_pipeline.py)."""

import json
import threading
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pytest

from shards.build import cut_pieces, sentences
from toy.build import (
    PART_SIZES,
    PART_VERSIONS,
    SIZES,
    build,
    build_lock,
    build_pool,
    main,
    part_stamp,
    read_stamps,
    sizes_with,
    stale_parts,
)
from toy.world import DOMAINS, STORY_DOMAINS, World


def test_sentences_keep_their_full_stops():
    assert sentences("anna went home. she slept.") == ["anna went home.", "she slept."]


def test_cut_pieces_keep_every_word_in_order_within_the_lengths():
    text = "one morning eva went to the school. she took her red ball along. hi there. it was fun."
    for seed in range(20):
        parts = cut_pieces(text, np.random.default_rng(seed), words=(3, 6))
        assert " ".join(parts) == text
        lengths = [len(p.split()) for p in parts]
        assert all(3 <= n for n in lengths) and all(n <= 6 for n in lengths[:-1]) and lengths[-1] < 6 + 3
    crossing = [p for seed in range(20) for p in cut_pieces(text, np.random.default_rng(seed), words=(3, 6))
                if "." in p[:-1]]
    assert crossing, "pieces should cross sentence boundaries"
    assert cut_pieces("too short", np.random.default_rng(0)) == ["too short"]
    with pytest.raises(ValueError, match="lo <= hi"):
        cut_pieces(text, np.random.default_rng(0), words=(5, 4))


def test_pool_is_web_like_and_unordered(tmp_path):
    sizes = SIZES["reduced"]
    build_pool(World(0), tmp_path / "pool.jsonl", sizes, workers=1)
    rows = [json.loads(line) for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == sizes.pool_texts
    share = Counter(r["domain"] for r in rows)
    assert set(share) == set(DOMAINS)
    assert sum(share[d] for d in STORY_DOMAINS) / len(rows) == pytest.approx(0.6, abs=0.01)   # mostly covered text
    assert {share[d] for d in DOMAINS if d not in STORY_DOMAINS} == {22}                      # 40% shared equally
    assert [r["domain"] for r in rows[: len(rows) // 2]] != sorted(r["domain"] for r in rows[: len(rows) // 2])


def test_only_parts_built_with_other_settings_or_code_are_stale(tmp_path):
    sizes = SIZES["reduced"]
    for name in PART_SIZES:
        (tmp_path / name).mkdir()
    stamps = {name: part_stamp(name, 0, sizes) for name in PART_SIZES}
    assert stale_parts(tmp_path, stamps, 0, sizes) == []
    assert stale_parts(tmp_path, stamps, 0, replace(sizes, natural_docs=sizes.natural_docs + 1)) == ["speech"]
    assert set(stale_parts(tmp_path, stamps, 0, replace(sizes, bench_items=7))) == {"bench", "llm"}
    assert stale_parts(tmp_path, stamps, 1, sizes) == list(PART_SIZES)
    assert stale_parts(tmp_path, {**stamps, "text": {**stamps["text"], "version": 0}}, 0, sizes) == ["text"]
    assert stale_parts(tmp_path, stamps, 0, replace(sizes, tokenizer="bpe")) == ["llm"]
    older = {**stamps, "llm": {k: v for k, v in stamps["llm"].items() if k != "tokenizer"}}   # before the setting
    assert stale_parts(tmp_path, older, 0, sizes) == [] and stale_parts(tmp_path, older, 0,
                                                                        replace(sizes, tokenizer="bpe")) == ["llm"]
    (tmp_path / "heldout").rmdir()
    assert stale_parts(tmp_path, stamps, 0, sizes) == ["heldout"]


def test_first_format_stamps_stand_for_version_1_of_every_part(tmp_path):
    sizes = SIZES["full"]
    (tmp_path / "assets.json").write_text(json.dumps({"world_seed": 0, "size": "full", "sizes": asdict(sizes)}))
    stamps = read_stamps(tmp_path)
    assert set(stamps) == set(PART_SIZES)
    assert stamps["llm"] == {**part_stamp("llm", 0, sizes), "version": 1}
    for name in PART_SIZES:
        (tmp_path / name).mkdir()
    assert stale_parts(tmp_path, stamps, 0, sizes) == [n for n in PART_SIZES if PART_VERSIONS[n] > 1]


def test_a_second_build_of_the_same_folder_waits_for_the_first(tmp_path):
    """Two builds of one asset folder (two ./run.sh on a fresh clone) would both train the teacher and collide on
    its rename: the second waits for the lock, then finds every part built and does nothing."""
    sizes = SIZES["full"]
    for name in PART_SIZES:
        (tmp_path / name).mkdir()
    (tmp_path / "assets.json").write_text(json.dumps({"parts": {n: part_stamp(n, 0, sizes) for n in PART_SIZES}}))
    second = threading.Thread(target=build, args=(tmp_path,))
    with build_lock(tmp_path):
        second.start()
        second.join(0.5)
        assert second.is_alive()   # blocked while the first holds the folder
    second.join(10)
    assert not second.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*PART_SIZES, "assets.json", ".build.lock"])


def test_a_build_takes_size_settings_by_name_and_refuses_bad_ones(tmp_path, capsys):
    """``--set KEY=VALUE`` changes one ``Sizes`` field, read and type-checked as a config override, and only that
    part goes stale; an unknown field, a value of the wrong type or a negative count stops the build with the
    reason."""
    sizes = sizes_with("full", ["encoder_steps=1500", "teacher_target=0.9", "tokenizer=bpe"])
    assert (sizes.encoder_steps, sizes.teacher_target, sizes.tokenizer) == (1500, 0.9, "bpe")
    assert sizes.natural_docs == SIZES["full"].natural_docs
    for name in PART_SIZES:
        (tmp_path / name).mkdir()
    built = {name: part_stamp(name, 0, SIZES["full"]) for name in PART_SIZES}
    assert stale_parts(tmp_path, built, 0, sizes) == ["encoder", "llm"]
    assert sizes_with("reduced", []) == SIZES["reduced"]
    for bad, reason in [("encoder_step=1500", "unknown key"), ("encoder_steps=1.5", "expected an integer"),
                        ("encoder_steps", "expected key.sub=value"), ("pool_texts=-1", "must be >= 0")]:
        with pytest.raises(ValueError, match=reason):
            sizes_with("full", [bad])
    with pytest.raises(SystemExit):
        main(["--out", "unused", "--set", "encoder_steps=many"])
    assert "encoder_steps: expected an integer" in capsys.readouterr().err

