"""Benchmark files: the MCQ schema, converters from `datasets` exports, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.benchmarks import CONVERTERS, BenchmarkError, MCQItem, convert, main, read_items, write_items

ROOT = Path(__file__).resolve().parents[1]

# One or two records per task, in the shapes (and with the field names) of the published files. Sources read:
# - storycloze: the `story_cloze` loader (datasets' story_cloze.py: story_id, input_sentence_1-4, sentence_quiz1-2,
#   answer_right_ending int 1|2) and lm-evaluation-harness lm_eval/tasks/storycloze/storycloze_2016.yaml
#   (the four sentences joined by " ", target answer_right_ending - 1); the Rochester CSV: test_benchmarks_published.
# - mmsu: hlt-lab/voicebench, config mmsu, one split per subject (law, engineering, other, biology, business,
#   economics, health, philosophy, psychology, history, chemistry, physics: fixie-ai/ultravox's VoiceBench configs),
#   fields prompt, reference (the right letter), audio (lmms-eval lm_eval_tasks/voicebench/voicebench_mmsu_*.yaml:
#   source_text_column prompt, target_text_column reference); VoiceBench's src/evaluator/mcq.py scores letters A-D.
#   How the options are laid out inside prompt was not found in any published text: lettered lines are assumed.
# - openbookqa: allenai/openbookqa main (id, question_stem, choices {text, label}, answerKey);
#   lm_eval/tasks/openbookqa/openbookqa.yaml (doc_to_text question_stem, answerKey.lstrip()).
# - hellaswag: the `hellaswag` loader (ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, split, split_type,
#   label str); lm_eval/tasks/hellaswag/hellaswag.yaml + utils.py (preprocess, activity_label + ": " + ctx).
# - arc_challenge: allenai/ai2_arc (id, question, choices {text, label}, answerKey); lm_eval/tasks/arc/arc_easy.yaml
#   ("Question: {{question}}\nAnswer:", choices.label.index(answerKey)).
# - piqa: the `piqa` loader (goal, sol1, sol2, label int; no id); lm_eval/tasks/piqa/piqa.yaml.
RECORDS = {
    "storycloze": [{
        "story_id": "s-1", "input_sentence_1": "Tom bought a kite.", "input_sentence_2": "He went to the park.",
        "input_sentence_3": "The wind was strong.", "input_sentence_4": "The kite flew high.",
        "sentence_quiz1": "Tom was happy.", "sentence_quiz2": "Tom hated kites.", "answer_right_ending": 1,
    }],
    "mmsu": [{
        "audio": {"bytes": b"RIFF0000WAVE", "path": "70.wav"},
        "prompt": "Which organ pumps blood? \nA. The liver\nB. The heart\nC. The lung\nD. The skin",
        "reference": "B",
    }],
    "openbookqa": [{
        "id": "7-980", "question_stem": "The sun is responsible for",
        "choices": {"text": ["puppies learning tricks", "plants sprouting"], "label": ["A", "B"]},
        "answerKey": "B",
    }],
    "hellaswag": [{
        "ind": 24, "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
        "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up  roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "1",
    }, {
        "ind": 25, "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat the grill.", "ctx_b": "",
        "ctx": "[header] How to clean a grill [title] Heat the grill. ",
        "endings": ["[step] Scrub the grates.", "Eat the brush."], "label": "0",
    }],
    "arc_challenge": [{
        "id": "Mercury_7175875", "question": "Which gas do plants take in?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    }, {
        "id": "NYSEDREGENTS_2015_4_8", "question": "What melts ice?",
        "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["1", "2", "3", "4"]},
        "answerKey": "1",
    }],
    "piqa": [{
        "goal": "How do I ready a guinea pig cage?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of jam.", "label": 0,
    }],
}

EXPECTED = {
    "storycloze": [MCQItem(
        "s-1", "storycloze",
        "Tom bought a kite. He went to the park. The wind was strong. The kite flew high.",
        [" Tom was happy.", " Tom hated kites."], 0)],
    "mmsu": [MCQItem(
        "biology-0", "mmsu_biology", "Which organ pumps blood?",
        [" The liver", " The heart", " The lung", " The skin"], 1, "Question: ", "\nAnswer:")],
    "openbookqa": [MCQItem(
        "7-980", "openbookqa", "The sun is responsible for", [" puppies learning tricks", " plants sprouting"], 1)],
    "hellaswag": [
        MCQItem("24", "hellaswag", "Roof shingle removal: A man is sitting on a roof. He",
                [" is using wrap to wrap a pair of skis.", " starts pulling up roofing on a roof."], 1),
        MCQItem("25", "hellaswag", "Home and Garden: How to clean a grill. Heat the grill.",
                [" Scrub the grates.", " Eat the brush."], 0),
    ],
    "arc_challenge": [
        MCQItem("Mercury_7175875", "arc_challenge", "Which gas do plants take in?",
                [" oxygen", " carbon dioxide", " helium", " neon"], 1, "Question: ", "\nAnswer:"),
        MCQItem("NYSEDREGENTS_2015_4_8", "arc_challenge", "What melts ice?",
                [" heat", " cold", " dark", " wind"], 0, "Question: ", "\nAnswer:"),
    ],
    "piqa": [MCQItem(
        "0", "piqa", "How do I ready a guinea pig cage?",
        [" Provide the guinea pig with a cage full of a few inches of bedding.",
         " Provide the guinea pig with a cage full of a few inches of jam."], 0, "Question: ", "\nAnswer:")],
}


# file names as published: VoiceBench's mmsu is one file per subject, and the file names the subject
STEMS = {"mmsu": "biology-00000-of-00001"}


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Like ``Dataset.to_json``: one object per line; bytes (audio) as latin-1 text, never read."""
    lines = [json.dumps(r, default=lambda b: b.decode("latin-1")) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def item_line(**overrides) -> str:
    obj = {"id": "q1", "task": "piqa", "context": "Question: Why?\nAnswer:", "choices": [" a", " b"], "answer": 0}
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


# ----------------------------------------------------------------------------- converters


def test_every_task_has_a_fixture():
    assert set(CONVERTERS) == set(RECORDS) == set(EXPECTED)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("task", sorted(RECORDS))
def test_convert_formats_like_lm_eval_harness(tmp_path, task, fmt):
    writer = write_parquet if fmt == "parquet" else write_jsonl
    src = writer(tmp_path / f"{STEMS.get(task, task)}.{fmt}", RECORDS[task])
    out = tmp_path / "out" / f"{task}.jsonl"
    assert convert(task, src, out) == len(RECORDS[task])
    assert read_items(out) == EXPECTED[task]
    # lm-evaluation-harness's context string, whole: the template words stay in the text the scorer reads
    assert all(it.text == it.prefix + it.context + it.suffix for it in EXPECTED[task])


def test_files_written_by_datasets_convert(tmp_path):
    """The real `datasets` exports (struct columns, int32 labels, to_json lines and array)."""
    from datasets import Dataset

    ds = Dataset.from_list(RECORDS["arc_challenge"])
    ds.to_parquet(str(tmp_path / "arc.parquet"))
    ds.to_json(str(tmp_path / "arc.jsonl"))
    ds.to_json(str(tmp_path / "arc.json"), lines=False)
    for name in ("arc.parquet", "arc.jsonl", "arc.json"):
        assert convert("arc_challenge", tmp_path / name, tmp_path / f"{name}.out.jsonl") == 2
        assert read_items(tmp_path / f"{name}.out.jsonl") == EXPECTED["arc_challenge"]


def test_hellaswag_ctx_only_and_openbookqa_key_with_space(tmp_path):
    rec = {"ind": 3, "ctx": "A  dog runs [title] fast.", "endings": ["a", "b", "c"], "label": "2"}
    convert("hellaswag", write_jsonl(tmp_path / "hs.jsonl", [rec]), tmp_path / "hs.out.jsonl")
    assert read_items(tmp_path / "hs.out.jsonl") == [MCQItem("3", "hellaswag", "A dog runs. fast.",
                                                              [" a", " b", " c"], 2)]
    obqa = dict(RECORDS["openbookqa"][0], answerKey=" A")
    convert("openbookqa", write_jsonl(tmp_path / "ob.jsonl", [obqa]), tmp_path / "ob.out.jsonl")
    assert read_items(tmp_path / "ob.out.jsonl")[0].answer == 0


def test_limit_takes_the_first_records(tmp_path):
    records = [dict(RECORDS["piqa"][0], label=i % 2) for i in range(5)]
    src = write_parquet(tmp_path / "piqa.parquet", records)
    assert convert("piqa", src, tmp_path / "out.jsonl", limit=3) == 3
    assert [(it.id, it.answer) for it in read_items(tmp_path / "out.jsonl")] == [("0", 0), ("1", 1), ("2", 0)]


@pytest.mark.parametrize("task, change, record, field", [
    ("arc_challenge", {"answerKey": None}, 0, "answerKey: missing"),
    ("arc_challenge", {"answerKey": "E"}, 1, "answerKey: 'E' is not one of ['1', '2', '3', '4']"),
    ("arc_challenge", {"choices": {"text": ["a", "b", "c"], "label": ["A", "B"]}}, 0, "choices: 3 texts but 2 labels"),
    ("openbookqa", {"question_stem": ""}, 0, "question_stem: expected a non-empty string"),
    ("piqa", {"label": 2}, 0, "label: 2 is not one of ['0', '1']"),
    ("storycloze", {"input_sentence_3": None}, 0, "input_sentence_3: missing (also looked for InputSentence3)"),
    ("storycloze", {"answer_right_ending": 3}, 0, "answer_right_ending: 3 is not one of ['1', '2']"),
    ("hellaswag", {"label": "4"}, 1, "label: '4' is not one of ['0', '1']"),
    ("hellaswag", {"endings": ["only one"]}, 1, "endings: expected a list of at least 2 strings"),
    ("arc_challenge", {"choices": {"text": "abc", "label": ["A"]}}, 0, "choices.text: expected a list of at"),
    ("hellaswag", {"ctx_a": None, "ctx": None}, 0, "ctx_a: missing (also looked for ctx)"),
    ("mmsu", {"prompt": "Which organ pumps blood?"}, 0, "prompt: expected a question and then lettered options"),
    ("mmsu", {"reference": "E"}, 0, "reference: 'E' is not one of ['A', 'B', 'C', 'D']"),
    ("mmsu", {"reference": None}, 0, "reference: missing (also looked for answer)"),
])
def test_bad_record_names_file_record_and_field(tmp_path, task, change, record, field):
    records = [dict(r, **change) if i == record else r for i, r in enumerate(RECORDS[task])]
    src = write_jsonl(tmp_path / f"{task}.jsonl", records)
    out = tmp_path / "out.jsonl"
    with pytest.raises(BenchmarkError) as err:
        convert(task, src, out)
    assert str(err.value).startswith(f"{src}: record {record}: {field}")
    assert not out.exists()


def test_convert_errors_name_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(BenchmarkError, match=r"nope\.parquet: no such file"):
        convert("piqa", tmp_path / "nope.parquet", out)
    (tmp_path / "data.txt").write_text("goal,sol1\n")
    with pytest.raises(BenchmarkError, match=r"data\.txt: unknown format '\.txt'"):
        convert("piqa", tmp_path / "data.txt", out)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BenchmarkError, match=r"broken\.parquet: not a readable parquet file"):
        convert("piqa", tmp_path / "broken.parquet", out)
    bad_json = write_lines(tmp_path / "bad.jsonl", [json.dumps(RECORDS["piqa"][0]), "{oops"])
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:2: invalid JSON"):
        convert("piqa", bad_json, out)
    dup = write_jsonl(tmp_path / "dup.jsonl", RECORDS["arc_challenge"][:1] * 2)
    with pytest.raises(BenchmarkError, match=r"dup\.jsonl: id: duplicate 'Mercury_7175875' \(items 0 and 1\)"):
        convert("arc_challenge", dup, out)
    with pytest.raises(BenchmarkError, match="unknown task 'mmlu'"):
        convert("mmlu", dup, out)
    with pytest.raises(BenchmarkError, match="limit must be at least 1"):
        convert("piqa", dup, out, limit=0)
    assert not out.exists()


# ----------------------------------------------------------------------------- the item file


def test_write_read_round_trip_is_atomic(tmp_path):
    extra = MCQItem("ü-1", "arc_challenge", "Frage: Größe?\nAntwort:", [" ja", " nein"], 1)
    items = EXPECTED["arc_challenge"] + [extra]
    path = tmp_path / "sub" / "arc.jsonl"
    write_items(path, items)
    assert read_items(path) == items
    assert path.read_text(encoding="utf-8").count("\n") == 3
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == {
        "id": "Mercury_7175875", "task": "arc_challenge", "context": "Which gas do plants take in?",
        "choices": [" oxygen", " carbon dioxide", " helium", " neon"], "answer": 1, "prefix": "Question: ",
        "suffix": "\nAnswer:"}
    assert "prefix" not in json.loads(path.read_text(encoding="utf-8").splitlines()[2])   # no template, no keys
    assert sorted(p.name for p in path.parent.iterdir()) == ["arc.jsonl"]   # no temp files left
    with pytest.raises(BenchmarkError, match="id: duplicate 'q'"):
        write_items(path, [MCQItem("q", "t", "c", [" a", " b"], 0)] * 2)
    with pytest.raises(BenchmarkError, match="no items"):
        write_items(path, [])
    assert read_items(path) == items   # a refused write leaves the old file whole


@pytest.mark.parametrize("line, message", [
    (item_line(answer=4, choices=[" a", " b", " c", " d"]), "answer: 4 is out of range for 4 choices"),
    (item_line(answer=-1), "answer: -1 is out of range for 2 choices"),
    (item_line(answer="1"), "answer: expected an integer, got '1'"),
    (item_line(answer=True), "answer: expected an integer, got True"),
    (item_line(choices=[" only"]), "choices: expected a list of at least 2 strings"),
    (item_line(choices=" a b"), "choices: expected a list of at least 2 strings"),
    (item_line(choices=[" a", ""]), "choices[1]: expected a non-empty string, got ''"),
    (item_line(choices=[" a", 3]), "choices[1]: expected a non-empty string, got 3"),
    (item_line(context=" "), "context: expected a non-empty string, got ' '"),
    (item_line(context=...), "context: missing"),
    (item_line(id=7), "id: expected a non-empty string, got 7"),
    (item_line(task=""), "task: expected a non-empty string"),
    (item_line(label=1), "label: unknown field (the schema has id, task, context, choices, answer, prefix, suffix)"),
    (item_line(prefix=1), "prefix: expected a string, got 1"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_malformed_item_names_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "mmsu.jsonl", [item_line(id="q0"), "", line])
    with pytest.raises(BenchmarkError) as err:
        read_items(path)
    assert str(err.value).startswith(f"{path}:3: {message}")


def test_read_items_file_level_errors(tmp_path):
    with pytest.raises(BenchmarkError, match=r"missing\.jsonl: no such file"):
        read_items(tmp_path / "missing.jsonl")
    with pytest.raises(BenchmarkError, match=r"empty\.jsonl: no items"):
        read_items(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    dup = write_lines(tmp_path / "dup.jsonl", [item_line(), item_line(), item_line()])
    with pytest.raises(BenchmarkError, match=r"dup\.jsonl:2: id: duplicate 'q1' \(first on line 1\)"):
        read_items(dup)
    (tmp_path / "latin.jsonl").write_bytes(item_line(context="caf\u00e9").encode("utf-8") + b"\xff\n")
    with pytest.raises(BenchmarkError, match=r"latin\.jsonl: not UTF-8 text"):
        read_items(tmp_path / "latin.jsonl")


def test_item_validates_on_construction():
    with pytest.raises(BenchmarkError, match="answer: 2 is out of range for 2 choices"):
        MCQItem("x", "t", "ctx", [" a", " b"], 2)


# ----------------------------------------------------------------------------- command line


def test_cli_converts_and_reports(tmp_path, capsys):
    src = write_parquet(tmp_path / "arc.parquet", RECORDS["arc_challenge"])
    out = tmp_path / "arc.jsonl"
    assert main(["--task", "arc_challenge", "--input", str(src), "--out", str(out), "--limit", "1"]) == 0
    assert f"wrote 1 arc_challenge items to {out}" in capsys.readouterr().err
    assert read_items(out) == EXPECTED["arc_challenge"][:1]
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "arc_challenge", "--input", str(src), "--out", str(out), "--limit", "0"])
    assert exit_info.value.code == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_cli_missing_file_exits_1_with_message(tmp_path):
    missing = tmp_path / "test.parquet"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "eval.benchmarks", "--task", "piqa", "--input", str(missing),
                           "--out", str(tmp_path / "piqa.jsonl")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {missing}: no such file"
    assert not (tmp_path / "piqa.jsonl").exists()
