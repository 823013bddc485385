"""Report across rounds: the gap per task and the diagnostics M and F, as JSON, markdown and plots.

    python -m eval.report --config CONFIG [key=value ...]

Reads every ``runs/<name>/round-R/eval.json`` (written by ``python -m eval``) and writes, in
``runs/<name>/``: ``report.json``, ``report.md``, ``gap_per_task.png`` and ``diagnostics.png``.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from config import ConfigError
from shards.format import atomic_write_bytes, atomic_write_json
from train.layout import RunFolder

MEASURES = ("teacher_text", "student_text", "student_speech", "gap", "text_gap")
DIAGNOSTICS = ("M", "F")
TASK_HEADER = ("round", "task", "n", "teacher text", "student text", "student speech", "gap [95% CI]",
               "text gap [95% CI]")
DIAG_HEADER = ("round", "M", "F", "avg student speech", "avg gap")


class ReportError(ValueError):
    """An eval.json that does not follow the schema; the message names the file and the key."""


def _number(value: Any, where: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{where}: {key}: must be a number, got {value!r}")
    return float(value)


def _check_task(task: Any, where: Path, key: str) -> None:
    if not isinstance(task, dict):
        raise ReportError(f"{where}: {key}: must be an object, got {type(task).__name__}")
    for name in MEASURES:
        _number(task.get(name), where, f"{key}.{name}")
    n = task.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ReportError(f"{where}: {key}.n: must be a positive integer, got {n!r}")
    ci = task.get("ci95")
    if not isinstance(ci, dict):
        raise ReportError(f"{where}: {key}.ci95: must be an object {{measure: [lo, hi]}}, got {ci!r}")
    for name in MEASURES:
        bounds = ci.get(name)
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ReportError(f"{where}: {key}.ci95.{name}: must be [lo, hi], got {bounds!r}")
        for b in bounds:
            _number(b, where, f"{key}.ci95.{name}")


def read_eval(path: Path) -> dict:
    """One round's eval.json, checked against the schema (M and F may be absent: no held-out set)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: must be a JSON object, got {type(data).__name__}")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ReportError(f"{path}: tasks: must be a non-empty object {{task: results}}, got {tasks!r}")
    for name, task in tasks.items():
        _check_task(task, path, f"tasks.{name}")
    for key in DIAGNOSTICS:
        if data.get(key) is not None:
            _number(data[key], path, key)
    return data


def average(tasks: dict[str, dict]) -> dict[str, float]:
    """Macro average over tasks, as the paper reports it."""
    return {name: sum(t[name] for t in tasks.values()) / len(tasks) for name in MEASURES}


def build_report(run_dir: Path) -> dict:
    """``{"rounds": [{"round", "tasks", "M", "F", "average", ...}]}`` from every round-R/eval.json, by round.

    Keys of eval.json beyond the schema (e.g. "cascade") are kept; "average" is the macro average over tasks.
    """
    run = RunFolder(Path(run_dir))
    found = [(r, run.eval_json(r)) for r in run.rounds() if run.eval_json(r).is_file()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no round-R/eval.json; evaluate a round first (python -m eval)")
    rounds = []
    for round_, path in found:
        data = read_eval(path)
        entry = {"round": round_, "tasks": data["tasks"], "M": data.get("M"), "F": data.get("F")}
        rounds.append(entry | {k: v for k, v in data.items() if k not in entry} | {"average": average(data["tasks"])})
    return {"rounds": rounds}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_ci(result: dict, name: str) -> str:
    lo, hi = result["ci95"][name]
    return f"{_pct(result[name])} [{_pct(lo)}, {_pct(hi)}]"


def _diag(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def task_rows(report: dict) -> list[list[str]]:
    """Rows of the round x task table (accuracy in %), one "average" row per round."""
    rows = []
    for r in report["rounds"]:
        for name, t in r["tasks"].items():
            rows.append([str(r["round"]), name, str(t["n"]), _pct(t["teacher_text"]), _pct(t["student_text"]),
                         _pct(t["student_speech"]), _with_ci(t, "gap"), _with_ci(t, "text_gap")])
        avg = r["average"]
        rows.append([str(r["round"]), "average", str(sum(t["n"] for t in r["tasks"].values())),
                     *(_pct(avg[k]) for k in MEASURES)])
    return rows


def diag_rows(report: dict) -> list[list[str]]:
    return [[str(r["round"]), _diag(r["M"]), _diag(r["F"]), _pct(r["average"]["student_speech"]),
             _pct(r["average"]["gap"])] for r in report["rounds"]]


def _md_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(report: dict, name: str) -> str:
    return "\n".join([
        f"# Evaluation report: {name}",
        "",
        "Accuracy in %, gaps in accuracy points. gap = teacher text - student speech; text gap = teacher text - "
        "student text. 95% intervals: paired bootstrap over items. average: mean over tasks (n: their sum).",
        "",
        _md_table(TASK_HEADER, task_rows(report)),
        "",
        "## Diagnostics",
        "",
        "M (misalignment) = KL(student on text || student on speech); F (forgetting) = KL(teacher || student) "
        "on held-out text; — where the round had no held-out set.",
        "",
        _md_table(DIAG_HEADER, diag_rows(report)),
        "",
        "![gap per task](gap_per_task.png)",
        "",
        "![M and F](diagnostics.png)",
        "",
    ])


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)   # Agg, without touching pyplot's global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plot_gaps(report: dict) -> bytes:
    """Gap per task per round with its 95% interval; tasks shifted a little on x so the bars do not overlap."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    rounds = [r["round"] for r in report["rounds"]]
    tasks = list(dict.fromkeys(name for r in report["rounds"] for name in r["tasks"]))
    width = 0.3 / max(len(tasks) - 1, 1)
    for i, name in enumerate(tasks):
        pts = [(r["round"], r["tasks"][name]) for r in report["rounds"] if name in r["tasks"]]
        x = [rd + (i - (len(tasks) - 1) / 2) * width for rd, _ in pts]
        y = [100 * t["gap"] for _, t in pts]
        err = [[100 * (t["gap"] - t["ci95"]["gap"][0]) for _, t in pts],
               [100 * (t["ci95"]["gap"][1] - t["gap"]) for _, t in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.plot(rounds, [100 * r["average"]["gap"] for r in report["rounds"]], "k--", marker="s", label="average")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("gap: teacher text - student speech (accuracy points)")
    ax.set_title("Text-speech gap per task (95% CI)")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_diagnostics(report: dict) -> bytes:
    """M and F per round, side by side (their scales differ)."""
    fig = Figure(figsize=(8, 3.5))
    rounds = [r["round"] for r in report["rounds"]]
    for i, (key, title) in enumerate([("M", "misalignment M"), ("F", "forgetting F")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(rounds, [math.nan if r[key] is None else r[key] for r in report["rounds"]], marker="o")
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("KL (nats per token)")
        ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def render(report: dict, run_dir: Path) -> list[Path]:
    """Write report.json, report.md and the two plots into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    paths = [run_dir / n for n in ("report.json", "report.md", "gap_per_task.png", "diagnostics.png")]
    atomic_write_json(paths[0], report)
    atomic_write_bytes(paths[1], markdown(report, run_dir.name).encode("utf-8"))
    atomic_write_bytes(paths[2], plot_gaps(report))
    atomic_write_bytes(paths[3], plot_diagnostics(report))
    return paths


def print_report(report: dict, console: Console | None = None) -> None:
    """The report's two tables; into a log (not a terminal) 150 columns wide so that rows do not wrap."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    for title, header, rows in [("Accuracy (%) and gap per task", TASK_HEADER, task_rows(report)),
                                ("Diagnostics", DIAG_HEADER, diag_rows(report))]:
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col == "task" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    from rounds.experiment import job_parser, parse_job  # the command line reads an experiment

    _, cfg = parse_job(job_parser("python -m eval.report", __doc__), argv)
    try:
        report = build_report(cfg.run.path())
    except (ConfigError, ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = render(report, cfg.run.path())
    print_report(report)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
