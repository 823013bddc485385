"""Converters against the benchmarks' files as they are published: VoiceBench's mmsu (a split per subject),
StoryCloze's Rochester CSV, HellaSwag's and PIQA's unlabelled test splits, MMLU-Pro's own fields."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.benchmarks import BenchmarkError, MCQItem, convert, read_items, split_name

# VoiceBench mmsu: https://huggingface.co/datasets/hlt-lab/voicebench, config "mmsu", files
# mmsu/<subject>-00000-of-00001.parquet, one split per subject (law 51, engineering 107, other 546, biology 172,
# business 236, economics 280, health 406, philosophy 305, psychology 317, history 104, chemistry 167,
# physics 383: 3,074 as in VoiceBench's README; split names from fixie-ai/ultravox's VoiceBench dataset configs).
# Fields: prompt (what is spoken), reference (the right letter), audio (lmms-eval
# lmms_eval/tasks/voicebench/voicebench_mmsu_<subject>.yaml: source_text_column prompt, target_text_column
# reference; MatthewCYM/VoiceBench src/evaluator/mcq.py compares a letter A-D with item["reference"]).
# The options' layout inside prompt is not in any text we could read: one lettered option per line is assumed,
# inline letters are accepted too.
VOICEBENCH_MMSU = {
    "biology": [{"audio": {"bytes": b"RIFF", "path": "0.wav"}, "reference": "B",
                 "prompt": "Which organ pumps blood?\nA. The liver\nB. The heart\nC. The lung\nD. The skin"}],
    "law": [{"audio": {"bytes": b"RIFF", "path": "0.wav"}, "reference": "A",
             "prompt": "Who writes statutes? A. A legislature B. A court C. A jury D. A sheriff"}],
}

# MMLU-Pro's own fields (https://huggingface.co/datasets/TIGER-Lab/MMLU-Pro dataset card: question_id, question,
# options (up to 10), answer (letter), answer_index, cot_content, category, src).
MMLU_PRO = {"question_id": 70, "question": "What does vitamin A. help?", "answer": "C", "answer_index": 2,
            "options": ["bones", "blood", "eyesight", "hair", "nails"], "cot_content": "", "category": "health",
            "src": "ori_mmlu-nutrition"}

# StoryCloze 2016 as Rochester publishes it: "cloze_test_val__spring2016 - cloze_test_ALL_val.csv" (and _test),
# header InputStoryid, InputSentence1-4, RandomFifthSentenceQuiz1-2, AnswerRightEnding (lm-evaluation-harness
# v0.0.1 lm_eval/tasks/storycloze.py reads it with csv.DictReader; the `story_cloze` loader reads the same file
# with csv.reader(quotechar='"', delimiter=",", skipinitialspace=True), 8 columns, header skipped).
ROCHESTER_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                    "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
ROCHESTER_ROWS = [
    ["138d5bfb-05cc-41e3-bf2c-fa85ebad14e2", "Rick grew up in a troubled household.",
     "He never found good support in family, and turned to gangs.", "It wasn't long before Rick got shot.",
     "The incident caused him to turn a new leaf.", "He is happy now.", "He joined a gang.", "1"],
    ["bff9f820-9605-4875-b9af-fe6f14d04256", "Laverne needs to prepare something for a party.",
     "She decides to bake a batch of brownies.", "She chooses a recipe and follows it closely.",
     "Laverne tests one of the brownies.", "The brownies are bad.", "Laverne is proud.", "2"],
]

# HellaSwag's test split: the `hellaswag` loader yields "label": str(data.get("label", "")), and the test file of
# rowanz/hellaswag has no label, so every test record carries label "" and split "test".
# lm_eval/tasks/hellaswag/hellaswag.yaml: test_split null, validation_split validation.
HELLASWAG_TEST = {"ind": 14, "activity_label": "Wakeboarding", "ctx_a": "A man is being pulled on a water ski.",
                  "ctx_b": "he", "ctx": "A man is being pulled on a water ski. he", "source_id": "activitynet~v_x",
                  "endings": ["falls.", "waves.", "skis on.", "stops."], "split": "test", "split_type": "indomain",
                  "label": ""}

# PIQA's test split: the `piqa` loader has no test labels ("Labels are not available for the test set. Filling
# the `label` column with -1 by default"); lm_eval/tasks/piqa/piqa.yaml: test_split null, validation_split validation.
PIQA_TEST = {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Shake the jar.", "label": -1}


def parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def rochester(path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_MINIMAL).writerows([ROCHESTER_HEADER, *ROCHESTER_ROWS])
    return path


QUESTION = ("Question: ", "\nAnswer:")


def test_voicebench_mmsu_folder_keeps_each_subject(tmp_path):
    for subject, records in VOICEBENCH_MMSU.items():
        parquet(tmp_path / "mmsu" / f"{subject}-00000-of-00001.parquet", records)
    assert convert("mmsu", tmp_path / "mmsu", tmp_path / "mmsu.jsonl") == 2
    assert read_items(tmp_path / "mmsu.jsonl") == [
        MCQItem("biology-0", "mmsu_biology", "Which organ pumps blood?",
                [" The liver", " The heart", " The lung", " The skin"], 1, *QUESTION),
        MCQItem("law-0", "mmsu_law", "Who writes statutes?",
                [" A legislature", " A court", " A jury", " A sheriff"], 0, *QUESTION)]


def test_hub_parquet_layout_and_file_names_give_the_split():
    assert split_name(Path("mmsu/biology-00000-of-00001.parquet")) == "biology"
    assert split_name(Path("mmsu/history/0000.parquet")) == "history"      # the Hub's refs/convert/parquet layout
    assert split_name(Path("validation.jsonl")) == "validation"


def test_mmlu_pro_fields_and_a_letter_inside_the_question(tmp_path):
    src = tmp_path / "mmlu_pro.jsonl"
    src.write_text(json.dumps(MMLU_PRO) + "\n")
    convert("mmsu", src, tmp_path / "out.jsonl")
    [item] = read_items(tmp_path / "out.jsonl")
    assert (item.id, item.task, item.context, item.answer) == ("health-70", "mmsu_health", "What does vitamin A. help?",
                                                               2)
    assert item.choices == [" bones", " blood", " eyesight", " hair", " nails"]
    spoken = {"prompt": "What does vitamin A. help?\nA. bones\nB. blood\nC. eyesight", "reference": "C"}
    src.write_text(json.dumps(spoken) + "\n")
    convert("mmsu", src, tmp_path / "out.jsonl")
    [item] = read_items(tmp_path / "out.jsonl")
    assert (item.context, item.choices) == ("What does vitamin A. help?", [" bones", " blood", " eyesight"])


def test_storycloze_rochester_csv_equals_the_loader_fields(tmp_path):
    src = rochester(tmp_path / "cloze_test_val__spring2016 - cloze_test_ALL_val.csv")
    assert convert("storycloze", src, tmp_path / "csv.jsonl") == 2
    loader = [{"story_id": r[0], **{f"input_sentence_{k}": r[k] for k in range(1, 5)}, "sentence_quiz1": r[5],
               "sentence_quiz2": r[6], "answer_right_ending": int(r[7])} for r in ROCHESTER_ROWS]
    parquet(tmp_path / "validation.parquet", loader)
    convert("storycloze", tmp_path / "validation.parquet", tmp_path / "hub.jsonl")
    items = read_items(tmp_path / "csv.jsonl")
    assert items == read_items(tmp_path / "hub.jsonl")
    assert items[0] == MCQItem(
        "138d5bfb-05cc-41e3-bf2c-fa85ebad14e2", "storycloze",
        "Rick grew up in a troubled household. He never found good support in family, and turned to gangs. "
        "It wasn't long before Rick got shot. The incident caused him to turn a new leaf.",
        [" He is happy now.", " He joined a gang."], 0)
    assert items[1].answer == 1


def test_unreadable_csv_names_the_file_and_line(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text('InputStoryid,InputSentence1\n"unterminated,\n')
    with pytest.raises(BenchmarkError, match=r"bad\.csv:\d+: invalid CSV"):
        convert("storycloze", src, tmp_path / "out.jsonl")


@pytest.mark.parametrize("task, record, name, dataset, split", [
    ("hellaswag", HELLASWAG_TEST, "hellaswag_test.jsonl", "HellaSwag", "test"),
    ("piqa", PIQA_TEST, "test-00000-of-00001.jsonl", "PIQA", "test"),
    ("piqa", {k: v for k, v in PIQA_TEST.items() if k != "label"}, "tests.jsonl", "PIQA", "tests"),
])
def test_unlabelled_test_splits_stop_naming_the_split(tmp_path, task, record, name, dataset, split):
    src = tmp_path / name
    src.write_text(json.dumps(record) + "\n")
    with pytest.raises(BenchmarkError) as err:
        convert(task, src, tmp_path / "out.jsonl")
    message = str(err.value)
    assert message.startswith(f"{src}: record 0: label: ")
    assert f"{dataset}'s {split!r} split carries no labels" in message and "convert the validation split" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_folder_errors_and_limit_across_files(tmp_path):
    with pytest.raises(BenchmarkError, match="no data files in the folder"):
        convert("mmsu", tmp_path, tmp_path / "out.jsonl")
    for subject, records in VOICEBENCH_MMSU.items():
        parquet(tmp_path / "mmsu" / f"{subject}-00000-of-00001.parquet", records * 3)
    assert convert("mmsu", tmp_path / "mmsu", tmp_path / "out.jsonl", limit=4) == 4
    assert [it.id for it in read_items(tmp_path / "out.jsonl")] == ["biology-0", "biology-1", "biology-2", "law-0"]
    piqa = [{k: v for k, v in PIQA_TEST.items() if k != "label"} | {"label": 0}]
    for split in ("train", "validation"):    # PIQA has no ids: its position names it, and two files collide
        parquet(tmp_path / "piqa" / f"{split}.parquet", piqa)
    with pytest.raises(BenchmarkError, match="id: duplicate '0'"):
        convert("piqa", tmp_path / "piqa", tmp_path / "piqa.jsonl")
