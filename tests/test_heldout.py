"""The held-out batch behind M and F during training and eval: the same documents, rows and sums at any world size."""

import numpy as np
import pytest
import torch

from model.inputs import InputsConfig
from shards.format import Chunk, Segment
from tests.test_ctc import build
from tests.test_stream import SR, make_set
from train.data import heldout_batch
from train.objective import LossConfig, Objective

INPUTS = InputsConfig(text_words=(1, 3), speech_words=(1, 2), context=48)


WORDS = "the cat sat on the mat and looked at the red ball near the river".split()


def chunk(name: str, i: int) -> Chunk:
    """A held-out document: three spoken sentences of 0.3-0.8 s."""
    rng = np.random.default_rng(i)
    segments = [Segment(" ".join(rng.choice(WORDS, 4)), (0.1 * rng.standard_normal(int(SR * rng.uniform(0.3, 0.8))))
                        .astype(np.float32), SR) for _ in range(3)]
    return Chunk(key=f"{name}_{i:03d}", doc=f"{name}-{i:03d}", source="test", segments=segments)


@pytest.fixture(scope="module")
def heldout_set(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("heldout")
    make_set(folder, "held", shards=1, per_shard=10, chunk=chunk)
    return str(folder)


def shares(path: str, tokenizer, model, world: int, docs: int = 8):
    return [heldout_batch(path, docs, INPUTS, tokenizer, model.vectors_for, seed=3, rank=r, world=world)
            for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_rows_of_one_packing_and_their_sums_add_up(heldout_set, tokenizer, tiny_dir, world):
    model = build(tiny_dir).eval()
    objective = Objective(model, LossConfig())
    [(whole, weight)] = shares(heldout_set, tokenizer, model, 1)
    assert weight == 1.0 and whole.rows >= world, "the fixture should pack into several rows"
    parts = shares(heldout_set, tokenizer, model, world)
    assert [w for _, w in parts] == [1.0] * world
    assert sum(b.rows for b, _ in parts) == whole.rows
    assert sorted(k for b, _ in parts for k in b.doc_keys) == sorted(whole.doc_keys)
    total = sum(objective.diagnostics(b) * w for b, w in parts)
    expected = objective.diagnostics(whole)
    assert expected[1] > 0 and expected[3] > 0      # aligned and text positions were counted
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


def test_a_rank_without_a_row_runs_one_and_weights_it_zero(heldout_set, tokenizer, tiny_dir):
    model = build(tiny_dir)
    [(whole, _)] = shares(heldout_set, tokenizer, model, 1)
    parts = shares(heldout_set, tokenizer, model, whole.rows + 1)
    assert [w for _, w in parts] == [1.0] * whole.rows + [0.0]
    assert parts[-1][0].rows == 1 and parts[-1][0].doc_keys == parts[0][0].doc_keys


def test_the_batch_is_fixed_by_the_seed(heldout_set, tokenizer, tiny_dir):
    model = build(tiny_dir)
    a, b = (heldout_batch(heldout_set, 8, INPUTS, tokenizer, model.vectors_for, 3, 0, 1)[0] for _ in range(2))
    assert a.doc_keys == b.doc_keys and torch.equal(a.unit_token, b.unit_token) and torch.equal(a.waves, b.waves)
