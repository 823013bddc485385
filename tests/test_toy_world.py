"""The toy world: determinism, answers that agree with the world, held-out splits, vocabulary, tokenizer,
and a teacher that learns from the world's text."""


import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.benchmarks import MCQItem, read_items
from toy.teacher import bpe_tokenizer, teacher_accuracy, train_teacher, word_tokenizer
from toy.world import (
    ANIMALS,
    CATEGORIES,
    DAYS,
    DOMAINS,
    KNOWLEDGE_DOMAINS,
    MONTHS,
    NAMES,
    NEEDS,
    NUMBERS,
    OPENERS,
    OPPOSITES,
    SCIENCE,
    STEPS,
    STORY_DOMAINS,
    World,
    spoken_words,
    vocabulary,
    words,
)


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_at_least_eight_domains_with_texts_and_items(world):
    assert len(DOMAINS) >= 8
    for d in DOMAINS:
        texts = world.texts(d, 20, rng())
        items = world.benchmark(d, 20, rng())
        assert len(texts) == 20 and all(t.strip() for t in texts)
        assert len(items) == 20 and len({it.id for it in items}) == 20
        for it in items:
            assert isinstance(it, MCQItem) and it.task == d
            assert len(it.choices) == 4 and len(set(it.choices)) == 4
            assert all(c.startswith(" ") and c.strip() for c in it.choices)


def test_same_seed_same_world_other_seed_other_facts():
    a, b, c = World(1), World(1), World(2)
    assert a.people == b.people and a.map == b.map
    assert a.people != c.people
    for d in DOMAINS:
        assert a.texts(d, 30, rng(5)) == b.texts(d, 30, rng(5))
        assert a.benchmark(d, 10, rng(5)) == b.benchmark(d, 10, rng(5))
    assert World(1).benchmark("facts", 30, rng(5)) != c.benchmark("facts", 30, rng(5))


def test_answers_follow_the_choice_index(world):
    for d in DOMAINS:
        r = rng(3)
        examples = world.examples(d, 10, r, held_out=True)
        items = [ex.item(r) for ex in examples]
        for ex, it in zip(examples, items, strict=True):
            assert it.context == ex.context and it.choices[it.answer] == " " + ex.answer
            assert sorted(it.choices) == sorted(" " + c for c in (ex.answer, *ex.wrong))
            assert ex.text.startswith(it.context + it.choices[it.answer])


# ----------------------------------------------------------------------------- answers agree with the world
# Each checker re-derives the right answer from the context and the world, and rejects every wrong choice.

def number(word):
    return NUMBERS.index(word)


def check_arithmetic(world, ctx, choice):
    a, b = (number(w) for w in spoken_words(ctx) if w in NUMBERS)
    if "take" in ctx:          # "take b from a"
        return choice == b - a
    return choice == (a - b if "minus" in ctx else a + b)


def check_counting(world, ctx, choice):
    a, b = (number(w) for w in spoken_words(ctx) if w in NUMBERS)
    return choice == (a + b if "found" in ctx else a - b)


RELATION_WORDS = {"city": ("city of",), "job": ("work",), "pet": ("pet",), "food": ("eat",), "age": ("age of",)}


def check_facts(world, ctx, choice):
    (name,) = [w for w in spoken_words(ctx) if w in NAMES]
    (relation,) = [r for r, keys in RELATION_WORDS.items() if any(k in ctx for k in keys)]
    value = getattr(world.people[name], relation)
    return choice == (NUMBERS[value] if relation == "age" else value)


def check_comparison(world, ctx, choice):
    (x,) = [w for w in spoken_words(ctx) if w in ANIMALS]
    return (ANIMALS.index(choice) < ANIMALS.index(x)) == ("bigger than" in ctx) and choice != x


def check_science(world, ctx, choice):
    attribute = next(a for a, table in SCIENCE.items() if choice in table.values())
    (thing,) = [t for t in SCIENCE[attribute] if t in spoken_words(ctx)]
    return choice == SCIENCE[attribute][thing]


def check_time(world, ctx, choice):
    ws = spoken_words(ctx)
    names = DAYS if any(w in DAYS for w in ws) else MONTHS
    (d,) = [w for w in ws if w in names]
    step = 1 if f"after {d}" in ctx else -1
    return choice == names[(names.index(d) + step) % len(names)]


def check_directions(world, ctx, choice):
    ws = spoken_words(ctx)
    (a,) = [w for w in ws if w in world.map]
    (d,) = [w for w in ws if w in STEPS]
    (r, c), (dr, dc) = world.map[a], STEPS[d]
    return world.map[choice] == (r + dr, c + dc)


def check_categories(world, ctx, choice):
    (w,) = [w for w in spoken_words(ctx) if any(w in members for members in CATEGORIES.values())]
    return w in CATEGORIES[choice]


def check_opposites(world, ctx, choice):
    ws = spoken_words(ctx)
    (w,) = [w for w in ws if any(w in pair for pair in OPPOSITES)]
    return (w, choice) in OPPOSITES or (choice, w) in OPPOSITES


def check_narrative(world, ctx, choice):
    story = ctx[: ctx.rfind(".") + 1]
    return choice in spoken_words(story)


def check_endings(world, ctx, choice):
    (need,) = [w for w in spoken_words(ctx) if w in NEEDS]
    return choice.endswith(NEEDS[need])


CHECKS = {"arithmetic": check_arithmetic, "counting": check_counting, "facts": check_facts,
          "comparison": check_comparison, "science": check_science, "time": check_time,
          "directions": check_directions, "categories": check_categories, "opposites": check_opposites,
          "narrative": check_narrative, "endings": check_endings}


@pytest.mark.parametrize("domain", DOMAINS)
def test_right_answers_agree_with_the_world_and_wrong_ones_do_not(world, domain):
    check = CHECKS[domain]
    numeric = domain in ("arithmetic", "counting")
    for it in world.benchmark(domain, 120, rng(7)):
        choices = [c.strip() for c in it.choices]
        values = [number(c) for c in choices] if numeric else choices
        verdicts = [check(world, it.context, v) for v in values]
        assert verdicts == [k == it.answer for k in range(4)], (it.context, it.choices, it.answer)


def test_training_texts_state_true_facts(world):
    for d in ("arithmetic", "facts", "comparison", "directions"):
        for t in world.texts(d, 200, rng(8)):
            ctx, answer = t[:-1].rsplit(" ", 1)
            assert CHECKS[d](world, ctx, number(answer) if d == "arithmetic" else answer), t


# ----------------------------------------------------------------------------- held out, edges, vocabulary

@pytest.mark.parametrize("domain", DOMAINS)
def test_deciding_words_are_inside_the_context(world, domain):
    for ex in world.examples(domain, min(150, world.benchmark_capacity(domain) or 150), rng(9), held_out=True):
        ws = spoken_words(ex.context)
        assert ex.cues and all(c in ws[1:-1] for c in ex.cues), (ex.context, ex.cues)
        assert ws[0] not in ex.cues and ws[-1] not in ex.cues, (ex.context, ex.cues)


def strip_opener(text):
    return next((text[len(o) + 1:] for o in OPENERS if text.startswith(o + " ")), text)


@pytest.mark.parametrize("domain", DOMAINS)
def test_benchmark_items_are_held_out_from_training_text(world, domain):
    train = world.texts(domain, 3000, rng(10))
    held = world.examples(domain, 100, rng(11), held_out=True)
    if domain in STORY_DOMAINS:   # another story: no training text starts with a benchmark story
        stories = {ex.context[: ex.context.rfind(".") + 1] for ex in held}
        assert not any(t.startswith(s) for t in train for s in stories)
    else:                         # the same fact, but never in its benchmark phrasing (whatever the opener)
        phrased = {strip_opener(t) for t in train}
        assert not phrased & {strip_opener(ex.text) for ex in held}


def test_held_out_facts_are_known_from_other_phrasings(world):
    """Knowledge, not phrasing: every benchmark fact is stated in the training text in another phrasing."""
    train = [set(spoken_words(t)) for t in world.texts("facts", 3000, rng(12))]
    for ex in world.examples("facts", 60, rng(13), held_out=True):
        assert any({*ex.cues, ex.answer} <= t for t in train), ex.text


def test_every_phrasing_is_held_out_for_about_a_third_of_its_relation(world):
    for facts in world.facts.values():
        for relation in {f.relation for f in facts}:
            counts = np.bincount([f.held_out for f in facts if f.relation == relation], minlength=3)
            assert counts.max() - counts.min() <= 1, (relation, counts)


def test_held_out_share_of_stories(world):
    for d in STORY_DOMAINS:
        r = rng(14)
        share = np.mean([world.example(d, r).held_out for _ in range(2000)])
        assert 0.09 < share < 0.16, (d, share)     # one story in 8


def test_knowledge_domains_report_their_capacity(world):
    assert all(world.benchmark_capacity(d) >= 100 for d in KNOWLEDGE_DOMAINS)
    for d in ("science", "directions", "opposites"):     # the small ones: rejection sampling finds them all
        cap = world.benchmark_capacity(d)
        assert len(world.benchmark(d, cap, rng(15))) == cap
    cap = world.benchmark_capacity("opposites")
    with pytest.raises(ValueError, match=f"opposites: found {cap} of the {cap + 1}"):
        world.benchmark("opposites", cap + 1, rng(15))


def test_write_benchmarks_writes_one_file_per_domain_deterministically(world, tmp_path):
    counts = world.write_benchmarks(tmp_path / "a", n=150, seed=3)
    world.write_benchmarks(tmp_path / "b", n=150, seed=3)
    assert set(counts) == set(DOMAINS)
    for d in DOMAINS:
        items = read_items(tmp_path / "a" / f"{d}.jsonl")
        assert len(items) == counts[d] == min(150, world.benchmark_capacity(d) or 150)
        assert (tmp_path / "a" / f"{d}.jsonl").read_bytes() == (tmp_path / "b" / f"{d}.jsonl").read_bytes()
    assert counts["directions"] < 150 <= counts["narrative"]


def test_vocabulary_covers_every_generated_word(world):
    vocab = set(vocabulary())
    assert 150 < len(vocab) < 400
    for d in DOMAINS:
        text = " ".join(world.texts(d, 500, rng(16)))
        text += " ".join(it.context + " ".join(it.choices) for it in world.benchmark(d, 100, rng(16)))
        assert set(words(text)) <= vocab, (d, set(words(text)) - vocab)
    with pytest.raises(KeyError, match="unknown domain 'poetry'"):
        world.example("poetry", rng())


# ----------------------------------------------------------------------------- tokenizer and teacher

def joined_prompts(world, tok) -> list[tuple[str, list[int]]]:
    """(context + choice, its ids) of 20 benchmark items per domain, after checking that the context and the
    choice tokenize the same apart as joined, without an unknown token."""
    out = []
    for d in DOMAINS:
        for it in world.benchmark(d, 20, rng(17)):
            for choice in it.choices:
                joined = tok.encode(it.context + choice, add_special_tokens=False)
                apart = tok.encode(it.context, add_special_tokens=False) + tok.encode(choice, add_special_tokens=False)
                assert joined == apart and tok.unk_token_id not in joined
                out.append((it.context + choice, joined))
    return out


def test_word_tokenizer_one_token_per_word_and_context_plus_choice_splits_cleanly(world, tmp_path):
    word_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.unk_token_id is not None and tok.bos_token_id is not None and tok.pad_token_id is not None
    assert all(len(ids) == len(words(text)) for text, ids in joined_prompts(world, tok))
    assert tok.convert_ids_to_tokens(tok.encode("Anna.\n\nzzz", add_special_tokens=False)) == \
        ["anna", ".", "\n", "\n", "<unk>"]


def test_bpe_tokenizer_shares_pieces_and_context_plus_choice_splits_cleanly(world, tmp_path):
    bpe_tokenizer(world, pieces=300, out_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))   # as the jobs load it
    assert 250 <= len(tok) <= 310 and tok.bos_token_id is not None and tok.pad_token_id is not None
    assert all(tok.decode(ids) == text for text, ids in joined_prompts(world, tok))
    pieces = {w: tok.tokenize(" " + w) for w in vocabulary() if w.isalpha()}
    assert sum(len(p) > 1 for p in pieces.values()) > len(pieces) / 3    # rare words are made of pieces
    assert pieces["the"] == ["▁the"] and "\n" in tok.tokenize("park.\n\nbob")


def test_teacher_learns_a_domain_and_is_saved(world, tmp_path):
    """150 steps of a small model on one easy domain: the loss falls and it beats chance clearly (~15 s)."""
    out = tmp_path / "teacher"
    model, tok, info = train_teacher(world, out, steps=150, batch=16, seq_len=64, lr=1e-2,
                                     weights={"endings": 1.0}, pool=300, hidden=64, layers=2, heads=4,
                                     progress=False)
    losses = info["losses"]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    items = world.benchmark("endings", 60, rng(18))
    assert teacher_accuracy(model, tok, items) >= 0.6
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_info.json"} <= {p.name for p in out.iterdir()}
    again = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([tok.encode(items[0].context)])
    assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    loaded = AutoTokenizer.from_pretrained(str(out))     # the tokenizer as the jobs load it, beside config.json
    assert loaded.encode(items[0].context) == tok.encode(items[0].context)
    assert teacher_accuracy(again, loaded, items, shots=2) >= 0.6
    with pytest.raises(FileExistsError, match="already exists"):
        train_teacher(world, out, steps=1)
    _, bpe, info = train_teacher(world, tmp_path / "bpe", steps=1, batch=2, seq_len=32, hidden=32, layers=1,
                                 heads=2, progress=False, tokenizer="bpe")
    assert info["tokenizer"] == "bpe" and info["vocab"] == len(bpe) == len(AutoTokenizer.from_pretrained(
        str(tmp_path / "bpe")))
    with pytest.raises(ValueError, match="'chars' is not one of word, bpe"):
        train_teacher(world, tmp_path / "other", steps=1, tokenizer="chars")


def test_teacher_below_its_target_trains_on_until_it_meets_it(world, tmp_path):
    """Float kernels differ between CPUs (opposites 0.958 here, 0.903 on an Intel Xeon from the same 600 steps): a
    teacher below its text target is topped up at the final learning rate, a bounded number of times."""
    scores = iter([0.90, 0.93, 0.96, 0.99])
    calls: list[bool] = []

    def check(model, tok):
        calls.append(model.training)
        return {"narrative": 1.0, "opposites": next(scores)}

    _, _, info = train_teacher(world, tmp_path / "met", steps=4, batch=2, seq_len=32, hidden=32, layers=1, heads=2,
                               progress=False, check=check, target=0.95, top_up_steps=3)
    assert info["top_ups"] == 2 and info["accuracy"]["opposites"] == 0.96 and len(info["losses"]) == 4 + 2 * 3
    assert calls == [False, False, False]     # measured in eval mode, after each stretch of training
    saved = json.loads((tmp_path / "met" / "train_info.json").read_text())
    assert saved["top_ups"] == 2 and saved["target"] == 0.95
    assert [(c["steps"], c["accuracy"]["opposites"]) for c in saved["checks"]] == [(4, 0.90), (7, 0.93), (10, 0.96)]

    _, _, capped = train_teacher(world, tmp_path / "capped", steps=2, batch=2, seq_len=32, hidden=32, layers=1,
                                 heads=2, progress=False, check=lambda m, t: {"opposites": 0.5}, target=0.95,
                                 top_up_steps=1, max_top_ups=3)
    assert capped["top_ups"] == 3 and len(capped["losses"]) == 2 + 3 and capped["accuracy"] == {"opposites": 0.5}
    _, _, unchecked = train_teacher(world, tmp_path / "plain", steps=2, batch=2, seq_len=32, hidden=32, layers=1,
                                    heads=2, progress=False)
    assert unchecked["top_ups"] == 0 and unchecked["accuracy"] is None and len(unchecked["losses"]) == 2
    assert unchecked["checks"] == []
