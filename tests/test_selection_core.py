"""Selection building blocks: embeddings (real MiniLM), balanced k-means, allocation of a speech budget.
(tests/test_selection_scale.py: the pool streamed and indexed, the embeddings file, k-means in blocks.)"""

import json
import math

import numpy as np
import pytest

from config import ConfigError
from selection import embed, vectors
from selection.allocate import allocate, allocation_table, spread, target_shares
from selection.cluster import balanced_kmeans, cluster_summary
from selection.embed import EmbedConfig, SentenceEncoder, cache_dir_for, embed_block, embed_pool, embedding_key
from selection.pool import PoolIndex, index_pool
from shards.format import Chunk, Segment, atomic_write_json, read_shard, shard_urls, write_shard

TEXTS = [
    "The cat sat on the mat by the door.",
    "A kitten was sitting on the rug near the entrance.",
    "Quarterly revenue rose by ten percent on strong bond sales.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The cat sat on the mat by the door.",
    "Interest rates and inflation shaped the company's annual earnings.",
    "Plants capture sunlight in their leaves to make food.",
]


@pytest.fixture
def count_encode(monkeypatch):
    """Counts the texts actually run through the model."""
    calls = []
    real = embed.encode

    def counting(model, texts, batch_size):
        calls.append(len(texts))
        return real(model, texts, batch_size)

    monkeypatch.setattr(embed, "encode", counting)
    return calls


def jsonl_pool(folder, texts: list[str]) -> PoolIndex:
    """The index of a JSONL pool of ``texts`` written into ``folder``."""
    path = folder / "pool.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return index_pool(path)


def read_pool(path) -> list[str]:
    """Every text of a pool, streamed through its index."""
    return list(index_pool(path).stream())


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return jsonl_pool(tmp_path_factory.mktemp("pool"), TEXTS)


@pytest.fixture(scope="module")
def single(tmp_path_factory, pool):
    return embed_pool(pool, EmbedConfig(batch_size=3), cache_dir=tmp_path_factory.mktemp("single"))[:]


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_are_unit_norm_and_semantic(single):
    assert single.shape == (len(TEXTS), 384) and single.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(single[0], single[4], atol=1e-5)
    sim = single @ single.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2       # cat ~ kitten, not finance/biology
    assert sim[2, 5] > sim[2, 6] + 0.2 and sim[3, 6] > sim[3, 5] + 0.2       # finance ~ finance, plants ~ plants


def test_embeddings_are_cached_by_content(tmp_path, count_encode, single, pool):
    cfg = EmbedConfig(batch_size=4)
    first = embed_pool(pool, cfg, cache_dir=tmp_path / "cache")
    [cache] = (tmp_path / "cache").glob("*.npy")
    mtime = cache.stat().st_mtime_ns
    assert count_encode == [len(TEXTS)]
    np.testing.assert_allclose(first[:], single, atol=1e-5)
    again = embed_pool(pool, cfg, cache_dir=tmp_path / "cache")
    assert count_encode == [len(TEXTS)] and cache.stat().st_mtime_ns == mtime   # read, not recomputed
    np.testing.assert_array_equal(again[:], first[:])
    embed_pool(jsonl_pool(tmp_path, TEXTS[:-1] + ["Something else entirely."]), cfg, cache_dir=tmp_path / "cache")
    assert count_encode == [len(TEXTS), len(TEXTS)] and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert all(p.suffix == ".npy" and ".partial" not in p.name for p in (tmp_path / "cache").iterdir())   # no temp
    # files, no block markers


def test_rank_blocks_fill_one_file_equal_to_the_single_process_result(tmp_path, count_encode, single, pool):
    cfg = EmbedConfig(batch_size=2)
    key = embedding_key(pool, SentenceEncoder(cfg))
    partial = tmp_path / f"{key}.partial.npy"
    vectors.create(partial, len(TEXTS), 384)
    for rank, rows in ((0, 3), (1, 4)):   # what each of 2 ranks embeds: contiguous blocks
        embed_block(pool, SentenceEncoder(cfg), partial, rank, 2)
        assert count_encode[-1] == rows
        assert (tmp_path / f"{key}.part{rank}of2.done").is_file()
    merged = embed_pool(pool, cfg, rank=1, world=2, cache_dir=tmp_path)   # both blocks there: nothing to embed
    assert count_encode == [3, 4]
    np.testing.assert_allclose(merged[:], single, atol=1e-5)
    np.testing.assert_array_equal(embed_pool(pool, cfg, rank=0, world=2, cache_dir=tmp_path)[:], merged[:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.npy"]    # renamed, markers removed
    alone = tmp_path / "alone"   # without torch.distributed a rank embeds missing blocks itself
    np.testing.assert_allclose(embed_pool(pool, cfg, rank=1, world=2, cache_dir=alone)[:], single, atol=1e-5)
    assert count_encode[2:] == [4, 3]


def test_embed_errors(tmp_path, pool):
    with pytest.raises(ValueError, match="no cache folder"):
        embed_pool(pool, EmbedConfig())
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        embed_pool(pool, EmbedConfig(), rank=2, world=2, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="model"):
        embed_pool(pool, EmbedConfig(model=str(tmp_path / "missing")), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        EmbedConfig(batch_size=0)


def test_read_pool_formats_and_cache_folder(tmp_path):
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", " ", "c d "])) + "\n\n")
    assert read_pool(jsonl) == ["a b", "c d"]
    txt = tmp_path / "pool.txt"
    txt.write_text("first line\n\n  second line \n")
    assert read_pool(txt) == ["first line", "second line"]
    shards = tmp_path / "set"
    write_shard(shards / "shard-000000.tar", [
        Chunk("d0", "d0", segments=[Segment("one text"), Segment(""), Segment("two text")]),
        Chunk("d1", "d1", segments=[Segment("three")]),
    ])
    atomic_write_json(shards / "index.json", {"sr": 16000, "shards": [{"url": "shard-000000.tar"}]})
    assert read_pool(shards) == ["one text", "two text", "three"]
    with pytest.raises(FileNotFoundError, match="no index"):
        read_pool(tmp_path)   # a folder that is no shard set
    assert cache_dir_for(shards, EmbedConfig()) == shards / ".embeddings"
    assert cache_dir_for(jsonl, EmbedConfig()) == tmp_path / ".embeddings"
    assert cache_dir_for(jsonl, EmbedConfig(cache_dir=str(tmp_path / "c"))) == tmp_path / "c"


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{oops\n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', r"bad\.jsonl:2: text: expected an object"),
    ("bad.csv", "a,b\n", r"bad\.csv: unknown text pool format '\.csv'"),
    ("missing.txt", None, r"missing\.txt: no such text pool"),
    ("latin.txt", b"caf\xe9\n", r"latin\.txt: not UTF-8 text"),
])
def test_read_pool_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_pool(path)


# ----------------------------------------------------------------------------- balanced k-means


def blobs(sizes: list[int], dim: int = 16, spread: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(sizes), dim)) * 4
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return (centers[truth] + spread * rng.standard_normal((len(truth), dim))).astype(np.float32), truth


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs([150] * 6)
    labels, centroids = balanced_kmeans(x, 6, seed=0)
    assert labels.shape == (900,) and centroids.shape == (6, 16) and centroids.dtype == np.float32
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6   # a one-to-one match of clusters and blobs
    for c in range(6):
        np.testing.assert_allclose(centroids[c], x[labels == c].mean(0), atol=1e-4)


@pytest.mark.parametrize("tolerance", [0.05, 0.2])
def test_kmeans_sizes_within_tolerance_on_uneven_blobs(tolerance):
    sizes = [900, 500, 300, 150, 80, 40, 20, 10]   # true groups far from balanced
    x, _ = blobs(sizes, seed=1)
    n, k = len(x), 10
    labels, _ = balanced_kmeans(x, k, seed=3, tolerance=tolerance)
    counts = np.bincount(labels, minlength=k)
    assert counts.sum() == n
    assert counts.min() >= math.floor(n / k * (1 - tolerance)) and counts.max() <= math.ceil(n / k * (1 + tolerance))


def test_kmeans_is_deterministic_per_seed():
    x, _ = blobs([300, 200, 100, 50], seed=2)
    a, ca = balanced_kmeans(x, 5, seed=7)
    b, cb = balanced_kmeans(x, 5, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)


def test_kmeans_bad_arguments():
    x, _ = blobs([5, 5])
    with pytest.raises(ValueError, match=r"k: must be in 1\.\.10"):
        balanced_kmeans(x, 11)
    with pytest.raises(ValueError, match="expected a non-empty"):
        balanced_kmeans(x[0], 2)
    with pytest.raises(ValueError, match="tolerance >= 0"):
        balanced_kmeans(x, 2, tolerance=-0.1)


def test_cluster_summary():
    labels = np.array([1, 0, 1, 1, 0, 1])
    texts = ["b1", "a1", "b2", "x" * 300, "a2", "b4"]
    summary = cluster_summary(labels, lambda idx: [texts[i] for i in idx], examples=3)
    assert summary[0] == {"cluster": 0, "size": 2, "examples": ["a1", "a2"]}
    assert summary[1] == {"cluster": 1, "size": 4, "examples": ["b1", "b2", "x" * 200 + "..."]}


# ----------------------------------------------------------------------------- allocation


def test_target_shares():
    pool = np.array([0.5, 0.3, 0.2])
    score = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(target_shares(pool, score, 0.0), pool)
    np.testing.assert_allclose(target_shares(pool, score, 1.0), [0.5, 0.6, 0.8] / np.float64(1.9))
    top = target_shares(pool, score, 500.0)   # would overflow outside log space
    assert top[2] == pytest.approx(1.0) and top[:2].sum() < 1e-100
    np.testing.assert_allclose(target_shares(pool, np.array([0.0, 1.0, 1.0]), 2.0), [0, 0.6, 0.4], atol=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        target_shares(pool, score, -1.0)
    with pytest.raises(ValueError, match="one length"):
        target_shares(pool, score[:2], 1.0)


def pool_of(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    return labels, rng.uniform(1.0, 9.0, len(labels))


def test_gamma_zero_follows_pool_sizes():
    labels, seconds = pool_of([3000, 1500, 500])
    chosen = allocate(labels, np.array([5.0, 1.0, 9.0]), 0.0, 2500.0, seconds, seed=0)
    counts = np.bincount(labels[chosen], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), [0.6, 0.3, 0.1], atol=0.04)


def test_large_gamma_gives_the_budget_to_the_worst_cluster():
    labels, seconds = pool_of([400, 400, 400])
    score = np.array([1.0, 1.3, 1.2])
    chosen = allocate(labels, score, 300.0, 1000.0, seconds, seed=0)
    assert set(labels[chosen]) == {1}
    spill = allocate(labels, score, 300.0, seconds[labels == 1].sum() + 100.0, seconds, seed=0)
    assert set(labels[spill[:400]]) == {1} and set(labels[spill[400:]]) == {2}   # emptied: next worst


def test_budget_met_within_one_utterance_without_duplicates_or_excluded():
    labels, seconds = pool_of([200, 300, 100, 400], seed=1)
    score = np.array([0.2, 0.5, 0.9, 0.4])
    exclude = set(range(0, 1000, 3))
    chosen = allocate(labels, score, 5.0, 1500.0, seconds, seed=4, exclude=exclude)
    assert len(set(chosen)) == len(chosen) and not set(chosen) & exclude
    assert seconds[chosen].sum() >= 1500.0 > seconds[chosen[:-1]].sum()
    assert allocate(labels, score, 5.0, 1500.0, seconds, seed=4, exclude=exclude) == chosen
    assert allocate(labels, score, 5.0, 1500.0, seconds, seed=5, exclude=exclude) != chosen
    everything = allocate(labels, score, 5.0, 1e9, seconds, seed=4, exclude=exclude)   # pool runs out
    assert sorted(everything) == sorted(set(range(1000)) - exclude)
    assert allocate(labels, score, 5.0, 0.0, seconds, seed=4) == []


def test_allocation_table():
    labels, seconds = pool_of([50, 30, 20], seed=2)
    score = np.array([1.0, 2.0, 3.0])
    shares = target_shares(np.bincount(labels) / len(labels), score, 1.0)
    chosen = allocate(labels, score, 1.0, 200.0, seconds, seed=0)
    table = allocation_table(labels, chosen, score, shares, seconds)
    assert [row["pool_texts"] for row in table] == [50, 30, 20]
    assert sum(row["texts"] for row in table) == len(chosen)
    assert sum(row["seconds"] for row in table) == pytest.approx(seconds[chosen].sum(), abs=0.01)
    assert sum(row["share"] for row in table) == pytest.approx(1.0)
    assert [row["target_share"] for row in table] == pytest.approx(shares.tolist())


def test_spread_of_an_allocation():
    even = [{"share": 0.25}] * 4
    assert spread(even) == pytest.approx({"entropy": math.log(4), "evenness": 1.0, "effective_clusters": 4.0})
    one = [{"share": 1.0}] + [{"share": 0.0}] * 3
    assert spread(one) == pytest.approx({"entropy": 0.0, "evenness": 0.0, "effective_clusters": 1.0})
    skewed = spread([{"share": 0.7}, {"share": 0.1}, {"share": 0.1}, {"share": 0.1}])
    assert 1.0 < skewed["effective_clusters"] < 4.0 and 0 < skewed["evenness"] < 1


# ----------------------------------------------------------------------------- strategies (the ablation's variants)

POOL = TEXTS + [
    "Seven plus five makes twelve, and twelve minus three makes nine.",
    "The bank raised its interest rate after the inflation report.",
    "A tall tree grows slowly in the shade of the old forest.",
    "Eight times two is sixteen and sixteen is more than ten.",
    "The dog chased the cat around the garden until dinner.",
]


def strategy_config(tmp_path, strategy: str, pool: bool = True):
    from rounds.experiment import load_experiment

    natural = tmp_path / "natural"
    atomic_write_json(natural / "index.json", {"sr": 16000, "shards": [{"url": "x.tar", "seconds": 100.0}]})
    lines = "".join(json.dumps({"text": t}) + "\n" for t in POOL)
    (tmp_path / "pool.jsonl").write_text(lines)
    return load_experiment(None, [
        f"run.dir={tmp_path / 'runs'}", f"run.name={strategy}", f"selection.strategy={strategy}",
        f"selection.pool={tmp_path / 'pool.jsonl' if pool else ''}", "selection.clusters=3", "selection.budget_s=7",
        f"data.speech=[{{path: {natural}}}]", "seed=3"])


@pytest.fixture
def no_student(monkeypatch):
    """Uniform and natural selection must never load a student."""
    import model.build

    def refuse(*args, **kwargs):
        raise AssertionError("the student was loaded")

    monkeypatch.setattr(model.build, "load_export", refuse)


def test_uniform_selection_draws_by_pool_share_at_the_budget_without_a_student(tmp_path, no_student):
    import yaml

    from selection.__main__ import select
    from train.layout import DONE

    cfg = strategy_config(tmp_path, "uniform")
    out = select(cfg, 1)
    assert sorted(p.name for p in out.iterdir()) == ["DONE", "allocation.json", "chosen.jsonl", "clusters.json",
                                                     "shards"]   # no probe.json, no score plot
    alloc = json.loads((out / "allocation.json").read_text())
    assert (alloc["strategy"], alloc["gamma"], alloc["budget_s"]) == ("uniform", 0.0, 7.0)
    pool = np.array([row["pool_texts"] for row in alloc["clusters"]])
    assert pool.sum() == len(POOL)
    np.testing.assert_allclose([row["target_share"] for row in alloc["clusters"]], pool / pool.sum())
    chosen = [json.loads(x) for x in (out / "chosen.jsonl").read_text().splitlines()]
    # the same draws as active selection with gamma 0, whatever the scores, at the same budget and seed
    embeddings = embed_pool(index_pool(tmp_path / "pool.jsonl"), cfg.selection.embed,
                            cache_dir=cfg.run.path() / "pool_embeddings")
    labels, _ = balanced_kmeans(embeddings, 3, seed=3, tolerance=cfg.selection.tolerance)
    seconds = np.array([len(t.split()) / cfg.selection.words_per_second for t in POOL])
    expected = allocate(labels, np.array([0.1, 7.0, 2.0]), 0.0, 7.0, seconds, seed=3 + 1)
    assert [c["index"] for c in chosen] == expected and len(expected) >= 2
    assert all(c["cluster"] == labels[c["index"]] and c["text"] == POOL[c["index"]] for c in chosen)
    assert seconds[expected].sum() >= 7.0 > seconds[expected[:-1]].sum()
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["sr"] == 16000 and index["docs"] == len(chosen)    # at the natural speech's rate
    # every chosen text cut into pieces of 3-10 words (one segment each), so speech and text interleave inside it
    spoken = {chunk.doc: [seg.text for seg in chunk.segments]
              for url in shard_urls(out / "shards") for chunk in read_shard(url)}
    assert sorted(" ".join(parts) for parts in spoken.values()) == sorted(c["text"] for c in chosen)
    assert index["segments"] == sum(map(len, spoken.values()))
    assert any(len(parts) > 1 for parts in spoken.values())
    for parts in spoken.values():
        assert all(len(p.split()) >= 3 for p in parts) and all(len(p.split()) <= 10 for p in parts[:-1])
    entries = yaml.safe_load((cfg.run.path() / "data.yaml").read_text())["speech"]
    docs = json.loads((out / "shards/index.json").read_text())["docs"]   # weight among the selected: documents
    assert entries == [{"path": str(out / "shards"), "weight": float(docs), "round": 1, "share": 0.5}]
    assert json.loads((out / DONE).read_text()) == {"strategy": "uniform", "texts": len(chosen), "budget_s": 7.0}
    again = select(cfg, 2)   # the next round never draws a text twice
    second = {json.loads(x)["index"] for x in (again / "chosen.jsonl").read_text().splitlines()}
    assert second and not second & set(expected)


def test_natural_control_selects_nothing_and_the_round_trains_on_natural_speech(tmp_path, no_student):
    from selection.__main__ import select
    from train.data import round_speech_sets
    from train.layout import DONE

    cfg = strategy_config(tmp_path, "natural", pool=False)   # needs no pool either
    out = select(cfg, 1)
    assert [p.name for p in out.iterdir()] == [DONE]
    assert json.loads((out / DONE).read_text()) == {"strategy": "natural", "texts": 0, "budget_s": 0.0}
    assert not (cfg.run.path() / "data.yaml").exists()
    assert [r.path for r in round_speech_sets(cfg.run.path(), cfg.data, 1)] == [cfg.data.speech[0].path]
    stamp = (out / DONE).stat().st_mtime_ns
    assert select(cfg, 1) == out and (out / DONE).stat().st_mtime_ns == stamp   # a re-run is a no-op


def test_strategy_config_errors(tmp_path):
    from selection.__main__ import select

    with pytest.raises(ConfigError, match="selection.strategy: must be one of"):
        strategy_config(tmp_path, "random")
    with pytest.raises(ConfigError, match="selection.pool: a text pool is required"):
        select(strategy_config(tmp_path, "uniform", pool=False), 1)
    with pytest.raises(ValueError, match="--round"):
        select(strategy_config(tmp_path, "natural"), 0)
