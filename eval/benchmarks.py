"""Multiple-choice benchmarks: one JSONL schema, and converters from the files `datasets` writes.

Every benchmark becomes one item per line::

    {"id": str, "task": str, "context": str, "choices": [str, ...], "answer": int}

``context`` is everything before the choice (the question or the story so far) and ``choices`` are
continuations exactly as they follow it, with their leading space, so a scorer only concatenates
``context + choice``. ``answer`` indexes ``choices``.

The converters read what ``Dataset.to_parquet`` / ``Dataset.to_json`` write for the Hub datasets
(field names as on the Hub) and format contexts and choices the way lm-evaluation-harness's task
templates do, so that text accuracies are comparable with published numbers:

    storycloze     story_cloze 2016 / xstory_cloze   the four sentences joined by " "
    mmsu           hlt-lab/voicebench, mmsu          "Question: {question}\\nAnswer:" (MMLU continuation)
    openbookqa     allenai/openbookqa, main          "{question_stem}"
    hellaswag      Rowan/hellaswag                   "{activity_label}: {ctx_a} {Ctx_b}", [title] cleaned
    arc_challenge  allenai/ai2_arc, ARC-Challenge    "Question: {question}\\nAnswer:"
    piqa           ybisk/piqa                        "Question: {goal}\\nAnswer:"

Each choice is ``" " + text.strip()`` (the harness's target delimiter is one space).

    python -m eval.benchmarks --task arc_challenge --input test.parquet --out arc_challenge.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import reprlib
import string
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from shards.format import atomic_write_bytes

SKIP_COLUMNS = frozenset({"audio"})  # VoiceBench's waveforms: large and never needed for the text


class BenchmarkError(ValueError):
    """A missing or malformed benchmark file; the message names the file, the line or record, and the field."""


def _fail(field: str, reason: str) -> NoReturn:
    raise BenchmarkError(f"{field}: {reason}")


def _short(value: Any) -> str:
    return reprlib.repr(value)


# ----------------------------------------------------------------------------- the item schema

@dataclass
class MCQItem:
    id: str
    task: str
    context: str
    choices: list[str]
    answer: int

    def __post_init__(self) -> None:
        for name in ("id", "task", "context"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                _fail(name, f"expected a non-empty string, got {_short(value)}")
        if not isinstance(self.choices, list) or len(self.choices) < 2:
            _fail("choices", f"expected a list of at least 2 strings, got {_short(self.choices)}")
        for k, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not choice.strip():
                _fail(f"choices[{k}]", f"expected a non-empty string, got {_short(choice)}")
        if not isinstance(self.answer, int) or isinstance(self.answer, bool):
            _fail("answer", f"expected an integer, got {_short(self.answer)}")
        if not 0 <= self.answer < len(self.choices):
            _fail("answer", f"{self.answer} is out of range for {len(self.choices)} choices")

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> MCQItem:
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in obj:
                _fail(name, "missing")
        for name in obj:
            if name not in names:
                _fail(name, f"unknown field (the schema has {', '.join(names)})")
        return cls(**obj)


def _check_unique(items: list[MCQItem]) -> None:
    first: dict[str, int] = {}
    for k, item in enumerate(items):
        if item.id in first:
            _fail("id", f"duplicate {item.id!r} (items {first[item.id]} and {k})")
        first[item.id] = k


def write_items(path: str | Path, items: list[MCQItem]) -> None:
    """Write a benchmark file atomically (readers never see half of it)."""
    if not items:
        raise BenchmarkError(f"{path}: refusing to write a benchmark with no items")
    try:
        _check_unique(items)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{path}: {exc}") from None
    lines = [json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_items(path: str | Path) -> list[MCQItem]:
    """Read and validate a benchmark file; the first problem stops with ``file:line: field: reason``."""
    path = Path(path)
    items: list[MCQItem] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        try:
            item = MCQItem.from_dict(obj)
        except BenchmarkError as exc:
            raise BenchmarkError(f"{where}: {exc}") from None
        if item.id in first_line:
            raise BenchmarkError(f"{where}: id: duplicate {item.id!r} (first on line {first_line[item.id]})")
        first_line[item.id] = lineno
        items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- source records

def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        source = pq.ParquetFile(path)
        columns = [name for name in source.schema_arrow.names if name not in SKIP_COLUMNS]
        for batch in source.iter_batches(columns=columns, batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise BenchmarkError(f"{path}: not a readable parquet file ({exc})") from None


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSON lines (``to_json``'s default) or one JSON array (``to_json(lines=False)``)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        yield from records
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a ``.parquet``, ``.jsonl`` or ``.json`` file written by `datasets`, in order."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix in (".jsonl", ".json"):
        return _json_records(path)
    raise BenchmarkError(f"{path}: unknown format {path.suffix!r} (expected .parquet, .jsonl or .json)")


# ----------------------------------------------------------------------------- field access

def _get(rec: dict[str, Any], *names: str) -> tuple[str, Any]:
    """(name, value) of the first of ``names`` present and not null; the rest are accepted aliases."""
    for name in names:
        if rec.get(name) is not None:
            return name, rec[name]
    also = f" (also looked for {', '.join(names[1:])})" if len(names) > 1 else ""
    _fail(names[0], f"missing{also}")


def _text(rec: dict[str, Any], *names: str, empty: bool = False) -> str:
    name, value = _get(rec, *names)
    if not isinstance(value, str) or not (empty or value.strip()):
        _fail(name, f"expected {'a' if empty else 'a non-empty'} string, got {_short(value)}")
    return value


def _text_list(name: str, value: Any) -> list[str]:
    """A list of choice texts or labels; any multiple-choice question needs at least two."""
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        _fail(name, f"expected a list of at least 2 strings, got {_short(value)}")
    return value


def _label_index(rec: dict[str, Any], labels: list[str], *names: str) -> int:
    """Position of the record's answer key among ``labels`` ("1"/"2", "A".."D", ...)."""
    name, value = _get(rec, *names)
    key = str(value).strip()
    if key not in labels:
        _fail(name, f"{value!r} is not one of {labels}")
    return labels.index(key)


def _labelled_choices(rec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """ARC / OpenBookQA ``choices``: ``{"text": [...], "label": [...]}``."""
    _, choices = _get(rec, "choices")
    if not isinstance(choices, dict):
        _fail("choices", f"expected {{'text': [...], 'label': [...]}}, got {_short(choices)}")
    texts = _text_list("choices.text", choices.get("text"))
    labels = _text_list("choices.label", choices.get("label"))
    if len(texts) != len(labels):
        _fail("choices", f"{len(texts)} texts but {len(labels)} labels")
    return texts, labels


def _item_id(rec: dict[str, Any], index: int, *names: str) -> str:
    """The source's own id when it has one, else the record's position (PIQA has none)."""
    value = next((rec[n] for n in names if rec.get(n) is not None), index)
    return str(value)


def _item(task: str, item_id: str, context: str, choices: list[str], answer: int) -> MCQItem:
    return MCQItem(id=item_id, task=task, context=context, choices=[" " + c.strip() for c in choices],
                   answer=answer)


def _question(text: str) -> str:
    return f"Question: {text.strip()}\nAnswer:"


# ----------------------------------------------------------------------------- converters

def storycloze(rec: dict[str, Any], index: int) -> MCQItem:
    """story_cloze 2016 and xstory_cloze fields; the original ROCStories CSV headers as aliases."""
    sentences = [_text(rec, f"input_sentence_{k}", f"InputSentence{k}").strip() for k in range(1, 5)]
    endings = [_text(rec, f"sentence_quiz{k}", f"RandomFifthSentenceQuiz{k}") for k in (1, 2)]
    answer = _label_index(rec, ["1", "2"], "answer_right_ending", "AnswerRightEnding")
    return _item("storycloze", _item_id(rec, index, "story_id", "InputStoryid"), " ".join(sentences), endings,
                 answer)


def mmsu(rec: dict[str, Any], index: int) -> MCQItem:
    """VoiceBench's MMSU (MMLU-Pro questions): question, option_a.., answer letter; audio is ignored."""
    letters = string.ascii_lowercase
    options = []
    for letter in letters:
        if rec.get(f"option_{letter}") is None:
            break
        options.append(_text(rec, f"option_{letter}"))
    if len(options) < 2:
        _fail(f"option_{letters[len(options)]}", "missing")
    answer = _label_index(rec, [c.upper() for c in letters[:len(options)]], "answer", "reference")
    return _item("mmsu", _item_id(rec, index, "question_id", "id"), _question(_text(rec, "question")), options,
                 answer)


def openbookqa(rec: dict[str, Any], index: int) -> MCQItem:
    texts, labels = _labelled_choices(rec)
    return _item("openbookqa", _item_id(rec, index, "id"), _text(rec, "question_stem").strip(), texts,
                 _label_index(rec, labels, "answerKey"))


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's preprocess: WikiHow's " [title]" and other bracket artefacts, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(rec: dict[str, Any], index: int) -> MCQItem:
    """``ctx_a + " " + ctx_b.capitalize()`` (or ``ctx``), after ``activity_label: `` when present."""
    if _get(rec, "ctx_a", "ctx")[0] == "ctx_a":
        ctx = _text(rec, "ctx_a") + " " + _text(rec, "ctx_b", empty=True).capitalize()
    else:
        ctx = _text(rec, "ctx")
    label = rec.get("activity_label")
    if isinstance(label, str) and label.strip():
        ctx = f"{label}: {ctx}"
    endings = _text_list("endings", _get(rec, "endings")[1])
    answer = _label_index(rec, [str(k) for k in range(len(endings))], "label")
    return _item("hellaswag", _item_id(rec, index, "ind"), _hellaswag_clean(ctx),
                 [_hellaswag_clean(e) for e in endings], answer)


def arc_challenge(rec: dict[str, Any], index: int) -> MCQItem:
    """answerKey is a letter or, for some questions, a digit; it is looked up in choices.label."""
    texts, labels = _labelled_choices(rec)
    return _item("arc_challenge", _item_id(rec, index, "id"), _question(_text(rec, "question")), texts,
                 _label_index(rec, labels, "answerKey"))


def piqa(rec: dict[str, Any], index: int) -> MCQItem:
    return _item("piqa", _item_id(rec, index, "id"), _question(_text(rec, "goal")),
                 [_text(rec, "sol1"), _text(rec, "sol2")], _label_index(rec, ["0", "1"], "label"))


CONVERTERS: dict[str, Callable[[dict[str, Any], int], MCQItem]] = {
    "storycloze": storycloze,
    "mmsu": mmsu,
    "openbookqa": openbookqa,
    "hellaswag": hellaswag,
    "arc_challenge": arc_challenge,
    "piqa": piqa,
}


def convert(task: str, src: str | Path, out: str | Path, limit: int | None = None) -> int:
    """Convert a `datasets` export of ``task`` into a benchmark file; returns the number of items written."""
    if task not in CONVERTERS:
        raise BenchmarkError(f"unknown task {task!r} (known: {', '.join(CONVERTERS)})")
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be at least 1, got {limit}")
    make = CONVERTERS[task]
    items = []
    for index, rec in enumerate(read_records(src)):
        if limit is not None and index >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise BenchmarkError(f"expected an object, got {type(rec).__name__}")
            items.append(make(rec, index))
        except BenchmarkError as exc:
            raise BenchmarkError(f"{src}: record {index}: {exc}") from None
    if not items:
        raise BenchmarkError(f"{src}: no records")
    try:
        _check_unique(items)
    except BenchmarkError as exc:
        raise BenchmarkError(f"{src}: {exc}") from None
    write_items(out, items)
    return len(items)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=list(CONVERTERS))
    p.add_argument("--input", type=Path, required=True, help=".parquet, .jsonl or .json written by `datasets`")
    p.add_argument("--out", type=Path, required=True, help="benchmark file to write (.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N records")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be at least 1, got {a.limit}")
    try:
        n = convert(a.task, a.input, a.out, a.limit)
    except (BenchmarkError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {n} {a.task} items to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
