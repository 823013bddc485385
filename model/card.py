"""The export's model card (README.md): what the model is, how to load it, what it was trained on, how it scored.

``train.export`` writes it from the round folder (``round-R/config.json``, ``data_mix.json``). Evaluation runs
after training, so the card has no scores then; ``write_model_card(export_dir)`` rewrites it with the round's
``eval.json`` once that exists (the rounds driver calls it after ``python -m eval``; by hand:
``python -m model.card runs/<name>/round-R/export``). Reads JSON files only; imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def percent(x: float) -> str:
    """A share as a percentage with one decimal, as every table of the reports and the card prints it."""
    return f"{100 * x:.1f}"


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _fields(d: dict, skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if k not in skip)


def model_section(config: dict, experiment: dict) -> str:
    """The parts: the LLM (base and how it trained), the encoder, the adapter, from the export's config.json and
    the run's model section."""
    llm, text = experiment.get("model", {}).get("llm", {}), config.get("text_config") or {}
    mode = llm.get("mode", "?")
    trained = {"lora": f"LoRA r {llm.get('lora_r')}, alpha {llm.get('lora_alpha')}, merged into the weights",
               "full": "all weights trained", "frozen": "frozen"}.get(mode, mode)
    shape = (f"{text.get('model_type', '?')}, {text.get('num_hidden_layers', '?')} layers, hidden "
             f"{text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', '?')}")
    encoder = config.get("encoder") or {}
    source = experiment.get("model", {}).get("encoder", {}).get("path")
    rows = [["LLM (`llm/`)", f"base `{llm.get('path', '?')}` ({shape}); {trained}"],
            ["speech encoder", f"`{encoder.get('kind', '?')}`, frozen; "
             + (f"from `{source}`, copied into `encoder/`" if encoder.get("path") else "no weights")],
            ["adapter (`speech.safetensors`)", _fields(config.get("adapter") or {})],
            ["input layout", "`[bos] prompt [begin] speech vectors [end]`, then the text it continues"
             + ("" if (config.get("adapter") or {}).get("end_marker", True) else " (no `[end]`)")]]
    return "## Model\n\n" + markdown_table(["part", "what"], rows)


USAGE = '''## Use

```python
import soundfile as sf
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("path/to/export", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/to/export", trust_remote_code=True)
wave, rate = sf.read("question.wav", dtype="float32")          # mono
inputs = processor(audio=[wave], sampling_rate=rate, text="Answer the spoken question:")
ids = model.generate(**inputs, max_new_tokens=32)             # greedy; do_sample, num_beams, ... as usual
print(processor.batch_decode(ids, skip_special_tokens=True)[0])
```

The code (`modeling_salad.py` and the `salad_*.py` it imports) is saved with the weights; it needs torch,
torchaudio, transformers and the training repository's requirements, not the repository itself. From the
repository: `python -m model.infer --model path/to/export --audio question.wav`.'''


def data_section(experiment: dict, data_mix: dict | None) -> str:
    """The speech sets with their share of the round's speech documents (data_mix.json, selected sets included),
    the text sets with their weights, and the text-only share."""
    data = experiment.get("data")
    if not data:
        return "## Training data\n\nNot recorded (exported without the round's config.json)."
    shares = (data_mix or {}).get("speech_shares") or {}
    plays = (data_mix or {}).get("plays") or {}
    speech = shares or {s["path"]: s.get("weight", 1.0) / sum(t.get("weight", 1.0) for t in data["speech"])
                        for s in data.get("speech", [])}
    rows = [["speech", f"`{p}`", percent(v) + "% of speech documents"
             + (f", each heard {plays[p]:.2g}x" if plays.get(p) is not None else "")] for p, v in speech.items()]
    rows += [["text", f"`{t['path']}`", f"weight {t.get('weight', 1.0)}"] for t in data.get("text", [])]
    return ("## Training data\n\n" + markdown_table(["kind", "shard set", "share"], rows)
            + f"\n\nText-only micro-batches: {percent(data.get('text_ratio', 0.0))}%.")


def config_section(experiment: dict) -> str:
    picked = {k: experiment[k] for k in ("seed", "inputs", "train", "loss") if k in experiment}
    if not picked:
        return ""
    text = yaml.safe_dump(picked, sort_keys=False, default_flow_style=None, width=110)
    return "## Training config\n\n```yaml\n" + text + "```"


def eval_section(evaluation: dict | None) -> str:
    """The round's eval.json as a table (accuracy in %, gap in points), or how to add it."""
    if not evaluation:
        return ("## Evaluation\n\nNot evaluated yet: `python -m eval --config CONFIG --round R`, then "
                "`python -m model.card path/to/export` adds the table here.")
    tasks = evaluation.get("tasks", {})
    rows = [[name, str(t.get("n", "")), percent(t["teacher_text"]), percent(t["student_text"]),
             percent(t["student_speech"]), percent(t["gap"]), f"{t['M']:.4g}" if "M" in t else "—"]
            for name, t in tasks.items()]
    if tasks:
        mean = {k: sum(t[k] for t in tasks.values()) / len(tasks)
                for k in ("teacher_text", "student_text", "student_speech", "gap")}
        rows.append(["**average**", str(sum(t.get("n", 0) for t in tasks.values())),
                     *(percent(mean[k]) for k in ("teacher_text", "student_text", "student_speech", "gap")), ""])
    header = ["task", "items", "teacher text", "student text", "student speech", "gap (points)", "M"]
    extra = ", ".join(f"{k} {evaluation[k]:.4g}" for k in ("M", "F") if evaluation.get(k) is not None)
    return ("## Evaluation\n\nAccuracy in %, k-shot, the gap = teacher on text - student on speech "
            "(`eval.json` beside this export).\n\n" + markdown_table(header, rows)
            + (f"\n\nHeld-out {extra}." if extra else ""))


def model_card(config: dict, experiment: dict, data_mix: dict | None, evaluation: dict | None, title: str) -> str:
    parts = [f"---\nlibrary_name: transformers\npipeline_tag: audio-text-to-text\ntags: [speech, salad, "
             f"custom_code]\n---\n\n# {title}\n\nA text LLM adapted to spoken input (frozen speech encoder -> "
             f"adapter -> LLM), trained with SALAD: distillation from the text LLM, active selection of synthetic "
             f"speech.", model_section(config, experiment), USAGE, data_section(experiment, data_mix),
             config_section(experiment), eval_section(evaluation)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_model_card(export_dir: str | Path, round_dir: str | Path | None = None,
                     fallback: dict[str, Any] | None = None) -> Path:
    """(Re)write ``export_dir/README.md`` from the export's config.json and the round folder (default: the
    export's parent): its config.json (the run's config; else ``fallback``), data_mix.json and eval.json."""
    export_dir = Path(export_dir)
    round_dir = Path(round_dir) if round_dir is not None else export_dir.parent
    experiment = _read(round_dir / "config.json") or fallback or {}
    found = re.fullmatch(r"round-(\d+)", round_dir.name)
    name = (experiment.get("run") or {}).get("name")
    title = " ".join(x for x in (name, f"round {found.group(1)}" if found else None) if x) or "SALAD speech LLM"
    text = model_card(_read(export_dir / "config.json") or {}, experiment, _read(round_dir / "data_mix.json"),
                      _read(round_dir / "eval.json"), title)
    path, tmp = export_dir / CARD, export_dir / f".{CARD}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m model.card runs/<name>/round-R/export", file=sys.stderr)
        return 2
    print(write_model_card(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
