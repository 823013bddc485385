"""Multiple-choice benchmarks: one JSONL schema, and converters from the benchmarks' published files.

Every benchmark becomes one item per line::

    {"id": str, "task": str, "context": str, "choices": [str, ...], "answer": int, "prefix"?: str, "suffix"?: str}

``prefix + context + suffix`` is everything before the choice (the question or the story so far); ``context``
alone is what the spoken version speaks, and ``prefix`` / ``suffix`` are the template's words around it
("Question: ", "\\nAnswer:"), which stay text in every mode (absent when empty). ``choices`` are continuations
exactly as they follow it, with their leading space, so a scorer only concatenates ``text + choice``.
``answer`` indexes ``choices``.

The converters read the files the benchmarks are published as (what ``Dataset.to_parquet`` / ``to_json``
write, with the Hub's field names; StoryCloze's Rochester CSV) and format contexts and choices the way
lm-evaluation-harness's task configs do, so that text accuracies are comparable with published numbers:

    storycloze     Rochester CSV / story_cloze 2016     the four sentences joined by " "
    mmsu           hlt-lab/voicebench mmsu (a split     "Question: " {question} "\\nAnswer:" (MMLU continuation)
                   per subject), or MMLU-Pro fields
    openbookqa     allenai/openbookqa, main             {question_stem}
    hellaswag      Rowan/hellaswag, validation          "{activity_label}: {ctx_a} {Ctx_b}", [title] cleaned
    arc_challenge  allenai/ai2_arc, ARC-Challenge       "Question: " {question} "\\nAnswer:"
    piqa           ybisk/piqa, validation               "Question: " {goal} "\\nAnswer:"

Each choice is ``" " + text.strip()`` (the harness's target delimiter is one space). HellaSwag's and PIQA's
test splits carry no labels (the `datasets` loaders fill in "" and -1): converting one stops with an error
that names the split; lm-evaluation-harness and published results score their validation splits.

``--input`` is a file (.parquet, .jsonl, .json, .csv) or a folder of them (VoiceBench's mmsu: one file per
subject, ``biology-00000-of-00001.parquet``; the file name, less that shard suffix, names the subject).

    python -m eval.benchmarks --task arc_challenge --input test.parquet --out arc_challenge.jsonl
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
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
TEMPLATE = ("prefix", "suffix")      # MCQItem's optional fields: the template's words around the spoken context
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


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
    context: str              # the spoken part (the whole context when the task has no template)
    choices: list[str]
    answer: int
    prefix: str = ""          # template words before the context ("Question: "): text in every mode
    suffix: str = ""          # template words after it ("\nAnswer:")

    def __post_init__(self) -> None:
        for name in ("id", "task", "context"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                _fail(name, f"expected a non-empty string, got {_short(value)}")
        for name in TEMPLATE:
            if not isinstance(getattr(self, name), str):
                _fail(name, f"expected a string, got {_short(getattr(self, name))}")
        if not isinstance(self.choices, list) or len(self.choices) < 2:
            _fail("choices", f"expected a list of at least 2 strings, got {_short(self.choices)}")
        for k, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not choice.strip():
                _fail(f"choices[{k}]", f"expected a non-empty string, got {_short(choice)}")
        if not isinstance(self.answer, int) or isinstance(self.answer, bool):
            _fail("answer", f"expected an integer, got {_short(self.answer)}")
        if not 0 <= self.answer < len(self.choices):
            _fail("answer", f"{self.answer} is out of range for {len(self.choices)} choices")

    @property
    def text(self) -> str:
        """The context as a text prompt reads it: template words and the spoken part."""
        return self.prefix + self.context + self.suffix

    def to_dict(self) -> dict[str, Any]:
        """The item's JSON object; empty template fields are left out (files without a template stay as they were)."""
        return {k: v for k, v in asdict(self).items() if k not in TEMPLATE or v}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> MCQItem:
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in obj and name not in TEMPLATE:
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
    lines = [json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in items]
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


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV with a header line (StoryCloze's Rochester files), read as the `story_cloze` loader reads
    them: comma separated, quoted fields, spaces after a comma skipped; every value a string. Strict: a broken
    quote stops with the line instead of swallowing the lines after it."""
    reader = csv.DictReader(io.StringIO(_read_text(path).removeprefix("\ufeff")), skipinitialspace=True, strict=True)
    try:
        yield from reader
    except csv.Error as exc:
        raise BenchmarkError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None


READERS: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {
    ".parquet": _parquet_records, ".jsonl": _json_records, ".json": _json_records, ".csv": _csv_records}


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of one ``.parquet``, ``.jsonl``, ``.json`` (written by `datasets`) or ``.csv`` file, in order."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    if path.suffix not in READERS:
        raise BenchmarkError(f"{path}: unknown format {path.suffix!r} (expected {', '.join(DATA_SUFFIXES)})")
    return READERS[path.suffix](path)


def source_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the data files under a folder in name order (a dataset published one file per
    split, as VoiceBench's mmsu with one split per subject, or the Hub's ``<split>/0000.parquet``)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READERS)
    if not found:
        raise BenchmarkError(f"{path}: no data files in the folder (expected {', '.join(DATA_SUFFIXES)})")
    return found


def split_name(path: Path) -> str:
    """The split a data file holds, from its name: ``biology-00000-of-00001.parquet`` -> ``biology``, and the
    folder for the Hub's converted ``biology/0000.parquet``."""
    name = re.sub(r"-\d+-of-\d+$", "", path.stem)
    return path.parent.name if name.isdigit() and path.parent.name else name


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


QUESTION = ("Question: ", "\nAnswer:")   # lm-evaluation-harness's QA template: ARC, PIQA, MMLU


def _item(task: str, item_id: str, context: str, choices: list[str], answer: int,
          template: tuple[str, str] = ("", "")) -> MCQItem:
    return MCQItem(id=item_id, task=task, context=context, choices=[" " + c.strip() for c in choices],
                   answer=answer, prefix=template[0], suffix=template[1])


def _require_label(rec: dict[str, Any], name: str, dataset: str, split: str) -> None:
    """Stop on a record of a split whose labels are not published (the `datasets` loaders fill in "" for
    HellaSwag's test split and -1 for PIQA's), naming the split: published results score the validation split."""
    value = rec.get(name)
    if value is None or str(value).strip() in ("", "-1"):
        _fail(name, f"{_short(value)}: {dataset}'s {split!r} split carries no labels (they are not published); "
                    "convert the validation split, which lm-evaluation-harness and published results score")


_MARK = re.compile(r"(?:^|(?<=\s))\(?([A-J])[.):](?=\s)")   # an option's letter: "A. ", "(A) ", "A) ", "A: "


def _lettered(text: str) -> tuple[str, list[str]]:
    """(question, options) of a prompt that lists its options lettered after it ("... A. x B. y" or one per
    line). Of the chains A, B, C, ... (each letter the first after the one before) the longest, and of those the
    last, wins: a question that says "vitamin A." does not start the options."""
    marks = list(_MARK.finditer(text))
    best: list[re.Match] = []   # stays empty unless a chain has two options or more
    for start in (m for m in marks if m.group(1) == "A"):
        chain = [start]
        for letter in string.ascii_uppercase[1:10]:
            following = next((m for m in marks if m.group(1) == letter and m.start() >= chain[-1].end()), None)
            if following is None:
                break
            chain.append(following)
        if len(chain) >= max(2, len(best)):
            best = chain
    if best:
        ends = [m.start() for m in best[1:]] + [len(text)]
        options = [text[m.end(): end].strip() for m, end in zip(best, ends, strict=True)]
        question = text[: best[0].start()].strip()
        if question and all(options):
            return question, options
    _fail("prompt", f"expected a question and then lettered options (A. ..., B. ...), got {_short(text)}")


def _subject(rec: dict[str, Any], split: str) -> str:
    """An MMLU subject as a name: the record's ``subject`` or ``category`` (MMLU-Pro), else its split's."""
    value = next((rec[n] for n in ("subject", "category") if isinstance(rec.get(n), str) and rec[n].strip()), split)
    return re.sub(r"\W+", "_", value.strip().lower())


# ----------------------------------------------------------------------------- converters
# Each reads one record of a published file, its position in the file and the file's split (split_name).

def storycloze(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    """The `story_cloze` 2016 loader's fields, or the Rochester CSV's own header (InputStoryid,
    InputSentence1-4, RandomFifthSentenceQuiz1-2, AnswerRightEnding: 1 or 2)."""
    sentences = [_text(rec, f"input_sentence_{k}", f"InputSentence{k}").strip() for k in range(1, 5)]
    endings = [_text(rec, f"sentence_quiz{k}", f"RandomFifthSentenceQuiz{k}") for k in (1, 2)]
    answer = _label_index(rec, ["1", "2"], "answer_right_ending", "AnswerRightEnding")
    return _item("storycloze", _item_id(rec, index, "story_id", "InputStoryid"), " ".join(sentences), endings,
                 answer)


def mmsu(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    """VoiceBench's mmsu (MMLU-Pro questions, one split per subject): ``prompt``, the question and its lettered
    options as spoken, and ``reference``, the right letter; ``audio`` is never read. Or MMLU-Pro's own fields:
    ``question``, ``options``, ``answer`` (letter). The subject names the task and prefixes the id."""
    subject = _subject(rec, split)
    if rec.get("options") is not None:
        question, options, key = _text(rec, "question"), _text_list("options", rec["options"]), ("answer",)
    else:
        (question, options), key = _lettered(_text(rec, "prompt")), ("reference", "answer")
    answer = _label_index(rec, list(string.ascii_uppercase[: len(options)]), *key)
    return _item(f"mmsu_{subject}", f"{subject}-{_item_id(rec, index, 'question_id', 'id')}", question.strip(),
                 options, answer, QUESTION)


def openbookqa(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    texts, labels = _labelled_choices(rec)
    return _item("openbookqa", _item_id(rec, index, "id"), _text(rec, "question_stem").strip(), texts,
                 _label_index(rec, labels, "answerKey"))


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's preprocess: WikiHow's " [title]" and other bracket artefacts, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    """``ctx_a + " " + ctx_b.capitalize()`` (or ``ctx``), after ``activity_label: `` when present."""
    if _get(rec, "ctx_a", "ctx")[0] == "ctx_a":
        ctx = _text(rec, "ctx_a") + " " + _text(rec, "ctx_b", empty=True).capitalize()
    else:
        ctx = _text(rec, "ctx")
    label = rec.get("activity_label")
    if isinstance(label, str) and label.strip():
        ctx = f"{label}: {ctx}"
    endings = _text_list("endings", _get(rec, "endings")[1])
    _require_label(rec, "label", "HellaSwag", rec.get("split") or split)
    answer = _label_index(rec, [str(k) for k in range(len(endings))], "label")
    return _item("hellaswag", _item_id(rec, index, "ind"), _hellaswag_clean(ctx),
                 [_hellaswag_clean(e) for e in endings], answer)


def arc_challenge(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    """answerKey is a letter or, for some questions, a digit; it is looked up in choices.label."""
    texts, labels = _labelled_choices(rec)
    return _item("arc_challenge", _item_id(rec, index, "id"), _text(rec, "question").strip(), texts,
                 _label_index(rec, labels, "answerKey"), QUESTION)


def piqa(rec: dict[str, Any], index: int, split: str) -> MCQItem:
    _require_label(rec, "label", "PIQA", split)
    return _item("piqa", _item_id(rec, index, "id"), _text(rec, "goal").strip(),
                 [_text(rec, "sol1"), _text(rec, "sol2")], _label_index(rec, ["0", "1"], "label"), QUESTION)


CONVERTERS: dict[str, Callable[[dict[str, Any], int, str], MCQItem]] = {
    "storycloze": storycloze,
    "mmsu": mmsu,
    "openbookqa": openbookqa,
    "hellaswag": hellaswag,
    "arc_challenge": arc_challenge,
    "piqa": piqa,
}


def convert(task: str, src: str | Path, out: str | Path, limit: int | None = None) -> int:
    """Convert a benchmark's published file, or folder of files (one per split), into a benchmark file; returns
    the number of items written."""
    if task not in CONVERTERS:
        raise BenchmarkError(f"unknown task {task!r} (known: {', '.join(CONVERTERS)})")
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be at least 1, got {limit}")
    make = CONVERTERS[task]
    records = ((path, index, rec) for path in source_files(src) for index, rec in enumerate(read_records(path)))
    items = []
    for path, index, rec in itertools.islice(records, limit):
        try:
            if not isinstance(rec, dict):
                raise BenchmarkError(f"expected an object, got {type(rec).__name__}")
            items.append(make(rec, index, split_name(path)))
        except BenchmarkError as exc:
            raise BenchmarkError(f"{path}: record {index}: {exc}") from None
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
    p.add_argument("--input", type=Path, required=True,
                   help="the published file (.parquet, .jsonl, .json as `datasets` writes them, .csv), or a folder of "
                        "them, one per split (VoiceBench's mmsu: one per subject)")
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
