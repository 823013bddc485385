"""A seeded toy world: the text domains of the CPU default, their training text and their benchmarks.

One ``World(seed)`` fixes every fact (where each person lives, their job, pet, food and age, the town
map); the rest (sizes, science, calendar, opposites, categories) is common knowledge. Domains:

    narrative    short stories with a recall sentence (the "audiobook" domain: the only natural speech)
    endings      a three-sentence story and its sensible ending (StoryCloze-like)
    counting     word problems: someone has some things, gets or gives some, how many now
    facts        people's city, job, pet, food, age
    arithmetic   plus and minus in words, results 0-18
    comparison   which animal is bigger or smaller
    science      how things feel, taste, look, what they are made of
    time         the order of days and months
    directions   the town map: what lies north/south/east/west of what
    categories   what kind of thing a word names
    opposites    the opposite of an adjective

Each sample is an ``Example``: a context, the right continuation, wrong ones, and the context words
that decide the answer (``cues``, never the first or last word of the context: speech errors at span
edges made spoken accuracy noisy). Held out for benchmarks, never in the training text:
- story domains (narrative, endings, counting): one story in 8, chosen by a hash of its text (narrative: of
  its first two sentences, so that no training story starts like a held-out one);
- knowledge domains: for each fact, one of its three phrasings (the fact itself is learned from the other two).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import numpy as np

from eval.benchmarks import MCQItem, write_items

# ----------------------------------------------------------------------------- lexicon

NAMES = {"anna": "f", "bob": "m", "tom": "m", "lily": "f", "sam": "m", "mia": "f",
         "ben": "m", "zoe": "f", "max": "m", "eva": "f", "leo": "m", "ada": "f"}
PRONOUNS = {"f": ("she", "her"), "m": ("he", "his")}
CITIES = ("paris", "rome", "london", "tokyo", "cairo", "lima", "oslo", "delhi")
JOBS = ("doctor", "farmer", "teacher", "baker", "pilot", "singer")
ANIMALS = ("ant", "mouse", "frog", "cat", "dog", "goat", "pig", "cow", "horse", "elephant")  # smallest first
PETS = ANIMALS[1:6]
FOODS = ("bread", "rice", "soup", "cake", "cheese", "pie", "corn", "fish")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
OBJECTS = ("ball", "kite", "book", "hat", "cup", "box", "key", "bag", "drum", "lamp", "boat", "doll")
PLACES = ("park", "lake", "shop", "school", "farm", "beach", "garden", "forest", "river", "market")
WHEN = ("morning", "day", "evening")
THINGS = ("apples", "eggs", "coins", "shells")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
BUILDINGS = ("bank", "church", "bakery", "station", "library", "hospital", "museum", "zoo", "cafe")
STEPS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
OPPOSITES = (("hot", "cold"), ("big", "small"), ("tall", "short"), ("fast", "slow"), ("old", "young"),
             ("happy", "sad"), ("up", "down"), ("open", "closed"), ("full", "empty"), ("wet", "dry"),
             ("early", "late"), ("loud", "quiet"))
NEEDS = {"hungry": "ate some bread", "thirsty": "drank some water", "tired": "went to bed",
         "dirty": "took a bath", "cold": "lit the fire", "bored": "played a game", "sick": "saw a doctor",
         "sad": "called a friend"}
SCIENCE = {   # attribute -> thing -> value; the values of an attribute are each other's distractors
    "feel": {"fire": "hot", "steam": "hot", "ice": "cold", "snow": "cold", "stone": "hard", "metal": "hard",
             "wool": "soft", "cotton": "soft"},
    "taste": {"sugar": "sweet", "honey": "sweet", "lemon": "sour", "vinegar": "sour", "salt": "salty",
              "coffee": "bitter"},
    "look": {"snow": "white", "milk": "white", "grass": "green", "coal": "black", "butter": "yellow",
             "sky": "blue", "blood": "red"},
    "material": {"table": "wood", "chair": "wood", "window": "glass", "coin": "metal", "book": "paper",
                 "sweater": "wool", "wall": "stone"},
}
CATEGORIES = {"animal": ANIMALS, "food": FOODS, "colour": COLOURS, "city": CITIES, "job": JOBS, "day": DAYS,
              "month": MONTHS}
OPENERS = ("as you know,", "it is true that", "we all know that", "people say that", "i have heard that",
           "it is a fact that")
AGES = range(6, 19)
OPENER_SHARE = 1 / 3   # of training statements; every benchmark item has one (its first word decides nothing)

# ----------------------------------------------------------------------------- phrasings
# Knowledge: each fact is said in every phrasing of its relation but one (held out for the benchmark).
# Stories: sentences with named slots. The vocabulary is read from these strings and the lexicon.

PHRASINGS = {   # the phrasings of a relation end alike: what is asked is clear from the words before the answer
    "city": ("{p} lives in the city of", "the home of {p} is in the city of", "{p} has a house in the city of"),
    "job": ("{p} works as a", "every day {p} goes to work as a", "for money {p} works as a"),
    "pet": ("{p} has a pet", "at home {p} keeps a pet", "in the house of {p} lives a pet"),
    "food": ("{p} likes to eat", "for dinner {p} likes to eat", "more than anything {p} likes to eat"),
    "age": ("the age of {p} is", "right now the age of {p} is", "this year the age of {p} is"),
    "plus": ("{a} plus {b} is", "{a} plus {b} equals", "if you add {a} and {b} you get"),
    "minus": ("{a} minus {b} is", "{a} minus {b} equals", "if you take {b} from {a} you get"),
    "bigger": ("the {x} is bigger than the", "the {x} is much bigger than the", "in size the {x} is bigger than the"),
    "smaller": ("the {x} is smaller than the", "the {x} is much smaller than the",
                "in size the {x} is smaller than the"),
    "feel": ("{t} feels", "if you touch {t} it feels", "{t} always feels"),
    "taste": ("{t} tastes", "if you try {t} it tastes", "{t} always tastes"),
    "look": ("{t} looks", "if you look at {t} it looks", "{t} always looks"),
    "material": ("a {t} is made of", "a {t} is always made of", "most of the time a {t} is made of"),
    "day_after": ("the day after {d} is", "the day that comes after {d} is", "each week the day after {d} is"),
    "day_before": ("the day before {d} is", "the day that comes before {d} is", "each week the day before {d} is"),
    "month_after": ("the month after {d} is", "the month that comes after {d} is",
                    "each year the month after {d} is"),
    "month_before": ("the month before {d} is", "the month that comes before {d} is",
                     "each year the month before {d} is"),
    "map": ("{d} of the {a} is the", "if you go {d} from the {a} you reach the",
            "when you walk {d} from the {a} you reach the"),
    "kind": ("{w} is a kind of", "{w} is the name of a", "the word {w} names a"),
    "opposite": ("the opposite of {w} is", "{w} is the opposite of", "the word that means the reverse of {w} is"),
}
STORY = {
    "start": "one {when} {a} went to the {place}.",
    "object": "{s} took {pos} {colour} {obj} along.",
    "friend": "at the {place} {s} met {b}.",
    "animal": "{b} had a little {animal}.",
    "play": "they played with the {obj} for a long time.",
    "food": "then they ate some {food}.",
}
RECALL = {   # kind -> (context, the slot it recalls, what follows the answer)
    "place": ("when it got dark, {a} left the", "place", "."),
    "friend": ("{a} said goodbye to", "b", "."),
    "object": ("at home, {a} put away the", "obj", "."),
    "colour": ("{a} loved {pos}", "colour", " {obj}."),
    "animal": ("{a} could not forget the little", "animal", "."),
    "food": ("{a} still wanted more", "food", "."),
}
RECALLS_FROM = {"place": "start", "friend": "friend", "object": "object", "colour": "object", "animal": "animal",
                "food": "food"}
ENDING = ("{a} was very {need} after a long day.", ("{s} came home from the {place}.",
                                                      "{s} had been at the {place} with {b}."),
          ("the house was quiet.", "{b} was not at home.", "it was late in the {when}."), "so {s} {action}")
COUNTING = ("{a} had {n} {things}.", {"plus": "then {s} found {m} more.", "minus": "then {s} gave {m} to {b}."},
            "now {s} has")

STORY_DOMAINS = ("narrative", "endings", "counting")
KNOWLEDGE_DOMAINS = ("facts", "arithmetic", "comparison", "science", "time", "directions", "categories",
                     "opposites")
DOMAINS = STORY_DOMAINS + KNOWLEDGE_DOMAINS
HELD_OUT_STORIES = 8       # one story in 8 is held out
WORD = re.compile(r"[a-z]+|[^\sa-z]")


def words(text: str) -> list[str]:
    """Words and punctuation marks, as the word-level tokenizer splits them."""
    return WORD.findall(text)


def spoken_words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text)


def _stable(*parts: object) -> int:
    """A hash that is the same in every process (Python's ``hash`` of str is salted)."""
    return zlib.crc32(repr(parts).encode())


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One sample of a domain: ``text`` is training text; held-out ones become benchmark items."""

    domain: str
    context: str
    answer: str               # the right continuation, without its leading space
    wrong: tuple[str, ...]    # three wrong continuations
    cues: tuple[str, ...]     # the context words that decide the answer
    held_out: bool
    suffix: str = "."

    @property
    def text(self) -> str:
        return f"{self.context} {self.answer}{self.suffix}"

    def item(self, rng: np.random.Generator) -> MCQItem:
        choices = [self.answer, *self.wrong]
        order = rng.permutation(len(choices))
        return MCQItem(id=f"{self.domain}-{_stable(self.text):08x}", task=self.domain, context=self.context,
                       choices=[" " + choices[k] for k in order], answer=int(np.argmax(order == 0)))


@dataclass(frozen=True)
class Fact:
    """A piece of knowledge: said by every phrasing of ``relation`` with ``slots`` filled in."""

    relation: str
    slots: tuple[tuple[str, str], ...]
    answer: str
    wrong: tuple[str, ...]    # every wrong answer; three are drawn per example
    held_out: int = 0         # the phrasing kept for the benchmark

    def phrasing(self, k: int) -> tuple[str, tuple[str, ...]]:
        """The context of phrasing ``k`` and the slot values in it (the cues)."""
        template, slots = PHRASINGS[self.relation][k], dict(self.slots)
        cues = tuple(slots[name] for name in re.findall(r"\{(\w+)\}", template))
        return template.format(**slots), cues


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    food: str
    age: int


def _fact(relation: str, answer: str, wrong, **slots: str) -> Fact:
    """Wrong answers exclude the right one and the words of the question (no "the frog is smaller than the frog")."""
    taken = {answer, *slots.values()}
    return Fact(relation, tuple(sorted(slots.items())), answer, tuple(w for w in wrong if w not in taken))


def _balanced(facts: list[Fact]) -> list[Fact]:
    """Held-out phrasings in turn within each relation (in a hashed order), so that every phrasing is
    learned from about the same number of facts."""
    order = sorted(range(len(facts)), key=lambda i: _stable(facts[i].relation, facts[i].slots))
    seen: dict[str, int] = {}
    out = list(facts)
    for i in order:
        f = facts[i]
        k = seen[f.relation] = seen.get(f.relation, -1) + 1
        out[i] = replace(f, held_out=k % len(PHRASINGS[f.relation]))
    return out


def _pick(rng: np.random.Generator, options, k: int | None = None, exclude=()):
    """One option (k None) or k distinct options not in ``exclude``."""
    pool = [o for o in options if o not in exclude]
    if k is None:
        return pool[int(rng.integers(len(pool)))]
    return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]


# ----------------------------------------------------------------------------- the world


class World:
    """Every fact of one seeded world, and the domains' text and benchmark generators."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        rng = np.random.default_rng(seed)
        ages = rng.choice(list(AGES), size=len(NAMES), replace=False)
        self.people = {name: Person(name, _pick(rng, CITIES), _pick(rng, JOBS), _pick(rng, PETS),
                                    _pick(rng, FOODS), int(age)) for name, age in zip(NAMES, ages, strict=True)}
        cells = rng.permutation(len(BUILDINGS))
        self.map = {b: divmod(int(c), 3) for b, c in zip(BUILDINGS, cells, strict=True)}   # building -> (row, col)
        facts = {"facts": self._people(), "arithmetic": _arithmetic(), "comparison": _comparison(),
                 "science": _science(), "time": _time(), "directions": self._directions(),
                 "categories": _categories(), "opposites": _opposites()}
        self.facts = {d: _balanced(f) for d, f in facts.items()}

    # -- knowledge ----------------------------------------------------------------------------

    def _people(self) -> list[Fact]:
        out = []
        for p in self.people.values():
            out += [_fact("city", p.city, CITIES, p=p.name), _fact("job", p.job, JOBS, p=p.name),
                    _fact("pet", p.pet, PETS, p=p.name), _fact("food", p.food, FOODS, p=p.name),
                    _fact("age", NUMBERS[p.age], NUMBERS[AGES.start:], p=p.name)]
        return out

    def _directions(self) -> list[Fact]:
        at = {cell: b for b, cell in self.map.items()}
        out = []
        for a, (r, c) in self.map.items():
            for d, (dr, dc) in STEPS.items():
                b = at.get((r + dr, c + dc))
                if b is not None:
                    out.append(_fact("map", b, BUILDINGS, a=a, d=d))
        return out

    # -- stories ------------------------------------------------------------------------------

    def _narrative(self, rng: np.random.Generator) -> Example:
        a, b = _pick(rng, list(NAMES), 2)
        s, pos = PRONOUNS[NAMES[a]]
        slots = dict(a=a, b=b, s=s, pos=pos, when=_pick(rng, WHEN), place=_pick(rng, PLACES),
                     obj=_pick(rng, OBJECTS), colour=_pick(rng, COLOURS), animal=_pick(rng, ANIMALS),
                     food=_pick(rng, FOODS))
        optional = [k for k in STORY if k != "start"]
        chosen = {"start", *_pick(rng, optional, int(rng.integers(1, 4)))}
        if "play" in chosen:
            chosen.add("object")
        sentences = [STORY[k].format(**slots) for k in STORY if k in chosen]
        story = " ".join(sentences)
        kinds = [k for k, source in RECALLS_FROM.items() if source in chosen]
        kinds = [kinds[int(i)] for i in rng.permutation(len(kinds))]   # the first is asked, the others follow
        recalls = [(RECALL[k][0].format(**slots), slots[RECALL[k][1]], RECALL[k][2].format(**slots)) for k in kinds]
        prompt, answer, after = recalls[0]
        category = {"place": PLACES, "b": NAMES, "obj": OBJECTS, "colour": COLOURS, "animal": ANIMALS,
                    "food": FOODS}[RECALL[kinds[0]][1]]
        wrong = tuple(_pick(rng, category, 3, exclude=spoken_words(story)))
        more = "".join(f" {p} {a}{end}" for p, a, end in recalls[1:])   # more copying per story in training
        return Example("narrative", f"{story} {prompt}", answer, wrong, (answer,),   # stories that open
                       _stable(sentences[:2]) % HELD_OUT_STORIES == 0, after + more)   # alike: one side

    def _endings(self, rng: np.random.Generator) -> Example:
        first, seconds, thirds, ending = ENDING
        a, b = _pick(rng, list(NAMES), 2)
        need = _pick(rng, list(NEEDS))
        slots = dict(a=a, b=b, s=PRONOUNS[NAMES[a]][0], need=need, place=_pick(rng, PLACES), when=_pick(rng, WHEN))
        story = " ".join(t.format(**slots) for t in (first, _pick(rng, seconds), _pick(rng, thirds)))
        end = lambda n: ending.format(action=NEEDS[n], **slots)  # noqa: E731
        wrong = tuple(end(n) for n in _pick(rng, list(NEEDS), 3, exclude=(need,)))
        return Example("endings", story, end(need), wrong, (need,), _stable(story) % HELD_OUT_STORIES == 0)

    def _counting(self, rng: np.random.Generator) -> Example:
        first, middles, question = COUNTING
        op = _pick(rng, ("plus", "minus"))
        n = int(rng.integers(0, 10)) if op == "plus" else int(rng.integers(0, 19))
        m = int(rng.integers(0, 10)) if op == "plus" else int(rng.integers(0, min(n, 9) + 1))
        a, b = _pick(rng, list(NAMES), 2)
        slots = dict(a=a, b=b, s=PRONOUNS[NAMES[a]][0], n=NUMBERS[n], m=NUMBERS[m], things=_pick(rng, THINGS))
        story = " ".join(t.format(**slots) for t in (first, middles[op], question))
        answer = n + m if op == "plus" else n - m
        wrong = tuple(_pick(rng, _near(answer), 3))
        return Example("counting", story, NUMBERS[answer], wrong, (NUMBERS[n], NUMBERS[m]),
                       _stable(story) % HELD_OUT_STORIES == 0, f" {slots['things']}.")

    # -- sampling -----------------------------------------------------------------------------

    def example(self, domain: str, rng: np.random.Generator) -> Example:
        """A random example of ``domain`` (held out or not)."""
        if domain in STORY_DOMAINS:
            return getattr(self, f"_{domain}")(rng)
        if domain not in self.facts:
            raise KeyError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
        facts = self.facts[domain]
        fact = facts[int(rng.integers(len(facts)))]
        k = int(rng.integers(len(PHRASINGS[fact.relation])))
        phrase, cues = fact.phrasing(k)
        wrong = tuple(_pick(rng, fact.wrong, min(3, len(fact.wrong))))
        held_out = k == fact.held_out
        if held_out or rng.random() < OPENER_SHARE:
            phrase = f"{_pick(rng, OPENERS)} {phrase}"
        return Example(domain, phrase, fact.answer, wrong, cues, held_out)

    def examples(self, domain: str, n: int, rng: np.random.Generator, held_out: bool) -> list[Example]:
        """``n`` examples of the training side (``held_out`` False: repeats allowed) or ``n`` distinct ones of
        the benchmark side, each with three wrong answers; ValueError when the domain has fewer."""
        found: dict[str, Example] = {}
        out: list[Example] = []
        for _ in range(200 * n + 1000):
            if len(out) == n:
                return out
            ex = self.example(domain, rng)
            if ex.held_out != held_out or (held_out and (len(ex.wrong) < 3 or ex.text in found)):
                continue
            found[ex.text] = ex
            out.append(ex)
        raise ValueError(f"{domain}: found {len(out)} of the {n} {'held-out' if held_out else 'training'} "
                         f"examples asked (distinct benchmark items: {self.benchmark_capacity(domain)})")

    def texts(self, domain: str, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` training texts of ``domain`` (never a held-out story or phrasing)."""
        return [ex.text for ex in self.examples(domain, n, rng, held_out=False)]

    def benchmark(self, domain: str, n: int, rng: np.random.Generator) -> list[MCQItem]:
        """``n`` distinct held-out multiple-choice items (4 choices) in the eval schema."""
        return [ex.item(rng) for ex in self.examples(domain, n, rng, held_out=True)]

    def benchmark_capacity(self, domain: str) -> int | None:
        """How many distinct items a knowledge domain can give (None: stories, practically unbounded)."""
        if domain in STORY_DOMAINS:
            return None
        return len(OPENERS) * sum(len(f.wrong) >= 3 for f in self.facts[domain])

    def write_benchmarks(self, out_dir: str | Path, n: int, seed: int = 0) -> dict[str, int]:
        """``<domain>.jsonl`` per domain (eval schema, written atomically): ``n`` items, or all a knowledge
        domain has when fewer. The same seed gives the same files. Returns the item count per domain."""
        counts = {}
        for k, d in enumerate(DOMAINS):
            counts[d] = min(n, self.benchmark_capacity(d) or n)
            write_items(Path(out_dir) / f"{d}.jsonl", self.benchmark(d, counts[d], np.random.default_rng([seed, k])))
        return counts


# ----------------------------------------------------------------------------- common knowledge


def _near(answer: int) -> list[str]:
    """Numbers within 3 of ``answer`` (in range), as words: arithmetic's distractors."""
    return [NUMBERS[k] for k in range(max(0, answer - 3), min(len(NUMBERS), answer + 4)) if k != answer]


def _arithmetic() -> list[Fact]:
    """x + y and its inverse (x + y) - y for x, y in 0..9: results stay within 0..18."""
    pairs = [(x, y) for x in range(10) for y in range(10)]
    return ([_fact("plus", NUMBERS[x + y], _near(x + y), a=NUMBERS[x], b=NUMBERS[y]) for x, y in pairs]
            + [_fact("minus", NUMBERS[x], _near(x), a=NUMBERS[x + y], b=NUMBERS[y]) for x, y in pairs])


def _comparison() -> list[Fact]:
    out = []
    for i, x in enumerate(ANIMALS):
        out += [_fact("bigger", y, ANIMALS[i:], x=x) for y in ANIMALS[:i]]
        out += [_fact("smaller", y, ANIMALS[:i + 1], x=x) for y in ANIMALS[i + 1:]]
    return out


def _science() -> list[Fact]:
    return [_fact(attribute, value, sorted(set(table.values())), t=thing)
            for attribute, table in SCIENCE.items() for thing, value in table.items()]


def _time() -> list[Fact]:
    out = []
    for unit, names in (("day", DAYS), ("month", MONTHS)):
        for i, d in enumerate(names):
            out.append(_fact(f"{unit}_after", names[(i + 1) % len(names)], names, d=d))
            out.append(_fact(f"{unit}_before", names[i - 1], names, d=d))
    return out


def _categories() -> list[Fact]:
    return [_fact("kind", kind, CATEGORIES, w=w) for kind, members in CATEGORIES.items() for w in members]


def _opposites() -> list[Fact]:
    adjectives = list(chain.from_iterable(OPPOSITES))
    return [_fact("opposite", y, adjectives, w=x) for a, b in OPPOSITES for x, y in ((a, b), (b, a))]


def vocabulary() -> list[str]:
    """Every word and punctuation mark any domain can produce (the tokenizer's vocabulary)."""
    lexicon = [*NAMES, *chain.from_iterable(PRONOUNS.values()), *CITIES, *JOBS, *ANIMALS, *FOODS, *COLOURS,
               *OBJECTS, *PLACES, *WHEN, *THINGS, *NUMBERS, *DAYS, *MONTHS, *BUILDINGS, *STEPS,
               *chain.from_iterable(OPPOSITES), *NEEDS, *NEEDS.values(), *CATEGORIES, *OPENERS,
               *chain.from_iterable((*t, *t.values()) for t in SCIENCE.values())]
    templates = [*chain.from_iterable(PHRASINGS.values()), *STORY.values(),
                 *chain.from_iterable(r[::2] for r in RECALL.values()), ENDING[0], *ENDING[1], *ENDING[2],
                 ENDING[3], COUNTING[0], *COUNTING[1].values(), COUNTING[2], "."]
    found = set(chain.from_iterable(words(s) for s in lexicon))
    found |= set(chain.from_iterable(words(re.sub(r"\{\w+\}", " ", t)) for t in templates))
    return sorted(found)
