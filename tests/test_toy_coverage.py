"""toy.coverage: natural speech is audiobook-like (graded by domain, every word heard, no benchmark phrasing)."""

import re
from collections import Counter

import numpy as np
import pytest

from toy.coverage import NATURAL_SHARES, POOL_SHARES, natural_documents
from toy.world import DOMAINS, OPENERS, STORY_DOMAINS, World, spoken_words, vocabulary


@pytest.fixture(scope="module")
def docs():
    return natural_documents(World(0), 1600, lambda d: np.random.default_rng([0, DOMAINS.index(d)]))


def test_the_tables_cover_every_domain_and_sum_to_one():
    for table in (NATURAL_SHARES, POOL_SHARES):
        assert set(table) == set(DOMAINS) and sum(table.values()) == pytest.approx(1.0)
    assert sum(NATURAL_SHARES[d] for d in STORY_DOMAINS) >= 0.7 and sum(POOL_SHARES[d] for d in STORY_DOMAINS) >= 0.6
    knowledge = sorted(NATURAL_SHARES[d] for d in DOMAINS if d not in STORY_DOMAINS)
    assert knowledge[0] < knowledge[-1] / 4    # graded, from rare to very rare


def test_natural_documents_follow_the_shares_in_a_mixed_order(docs):
    domains = [doc.rsplit("-", 1)[0] for doc, _ in docs]
    per_domain = Counter(domains)
    assert len(docs) == 1600 and len({doc for doc, _ in docs}) == 1600
    for d, share in NATURAL_SHARES.items():
        assert per_domain[d] == round(share * 1600)
    for start in range(0, 1600, 400):   # every stretch read in order holds the mixture, not one domain
        part = Counter(domains[start:start + 400])
        assert len(part) >= 9 and part["narrative"] / 400 == pytest.approx(0.5, abs=0.1)


def test_every_word_is_heard_somewhere_and_knowledge_words_rarely(docs):
    heard = Counter(w for _, text in docs for w in spoken_words(text))
    assert {w for w in vocabulary() if w.isalpha()} <= set(heard)
    assert heard["plus"] < heard["went"] / 20   # arithmetic is spoken, but rarely


def test_no_benchmark_phrasing_is_spoken(docs):
    world = World(0)
    strip = re.compile(r"^(?:" + "|".join(map(re.escape, OPENERS)) + r") ")
    spoken = {strip.sub("", s.strip()) for _, text in docs for s in re.findall(r"[^.]+\.", text)}
    for d in DOMAINS[len(STORY_DOMAINS):]:
        held = {f"{f.phrasing(f.held_out)[0]} {f.answer}." for f in world.facts[d]}
        assert not held & spoken, d
        assert any(f"{f.phrasing((f.held_out + 1) % 3)[0]} {f.answer}." in spoken for f in world.facts[d])
