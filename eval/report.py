"""Report across rounds: the gap per task and the diagnostics M and F, as JSON, markdown and plots.

    python -m eval.report --config CONFIG [key=value ...]

Reads every ``runs/<name>/round-R/eval.json`` (written by ``python -m eval``) and, where selection ran, its
``round-R/selection/allocation.json``, and writes, in ``runs/<name>/``: ``report.json``, ``report.md``,
``gap_per_task.png``, ``diagnostics.png``, and where eval.json has each task's M ``m_vs_speech.png`` (with the R^2 of
a line fitted through every task and round, the paper's test of M), where selection ran ``selection_share.png``.
Where eval.json has the cascade, ``report.json``'s ``cascade_fit`` says how far the student's spoken answers are
from its own transcript read by the teacher: the part of the gap that is recognition, not alignment.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from config import ConfigError
from model.card import markdown_table, percent
from shards.format import atomic_write_bytes, atomic_write_json
from train.layout import RunFolder

MEASURES = ("teacher_text", "student_text", "student_speech", "gap", "text_gap")
DIAGNOSTICS = ("M", "F")
TASK_HEADER = ("round", "task", "n", "teacher text", "student text", "student speech", "gap [95% CI]",
               "text gap [95% CI]", "cascade")
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
        allocation = run.selection(round_) / "allocation.json"
        if allocation.is_file():
            entry["selection"] = json.loads(allocation.read_text())
        rounds.append(entry | {k: v for k, v in data.items() if k not in entry} | {"average": average(data["tasks"])})
    report = {"rounds": rounds}
    fits = {"M_fit": m_fit(report), "cascade_fit": cascade_fit(report)}
    return report | {key: fit for key, fit in fits.items() if fit}


def m_points(report: dict) -> list[tuple[int, str, float, float]]:
    """(round, task, M, student speech accuracy) of every task and round whose eval.json has the task's M."""
    return [(r["round"], name, float(t["M"]), float(t["student_speech"])) for r in report["rounds"]
            for name, t in r["tasks"].items() if isinstance(t.get("M"), int | float)]


def line_fit(x: np.ndarray, y: np.ndarray) -> dict | None:
    """Least-squares line of y on x and its R^2 (None: fewer than 3 points, or x constant)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = ((y - (slope * x + intercept)) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return {"r2": float(1 - residual / total) if total > 0 else 1.0, "slope": float(slope),
            "intercept": float(intercept), "points": len(x)}


def m_fit(report: dict) -> dict | None:
    """Speech accuracy on M over every task and round: how well misalignment predicts the spoken answers."""
    points = m_points(report)
    return line_fit(np.array([p[2] for p in points]), np.array([p[3] for p in points]))


def cascade_fit(report: dict) -> dict | None:
    """Speech accuracy on the cascade's (the teacher reading the student's own transcript) over every task and
    round, with the mean of speech - cascade: near 0 and R^2 near 1 say the student answers as well as it hears,
    so what remains of its gap is recognition, which alignment cannot close."""
    points = [(float(r["cascade"][name]), float(t["student_speech"])) for r in report["rounds"]
              for name, t in r["tasks"].items() if isinstance(r.get("cascade"), dict) and name in r["cascade"]]
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    fit = line_fit(x, y)
    return fit | {"mean_difference": float((y - x).mean())} if fit else None


def _with_ci(result: dict, name: str) -> str:
    lo, hi = result["ci95"][name]
    return f"{percent(result[name])} [{percent(lo)}, {percent(hi)}]"


def _diag(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def task_rows(report: dict) -> list[list[str]]:
    """Rows of the round x task table (accuracy in %), one "average" row per round; cascade: the teacher reading
    the student's transcripts, where eval.json has it."""
    rows = []
    for r in report["rounds"]:
        cascade = r.get("cascade") or {}
        for name, t in r["tasks"].items():
            rows.append([str(r["round"]), name, str(t["n"]), percent(t["teacher_text"]), percent(t["student_text"]),
                         percent(t["student_speech"]), _with_ci(t, "gap"), _with_ci(t, "text_gap"),
                         percent(cascade[name]) if name in cascade else "—"])
        avg = r["average"]
        mean_cascade = [cascade[n] for n in r["tasks"] if n in cascade]
        rows.append([str(r["round"]), "average", str(sum(t["n"] for t in r["tasks"].values())),
                     *(percent(avg[k]) for k in MEASURES),
                     percent(sum(mean_cascade) / len(mean_cascade)) if len(mean_cascade) == len(r["tasks"]) else "—"])
    return rows


def coverage_rows(report: dict) -> list[list[str]]:
    """Per task: the natural speech's share of its domain (where eval.json has it), and the gap and M of the
    first round and the last."""
    first, last = report["rounds"][0], report["rounds"][-1]
    coverage = first.get("coverage") or {}
    rows = []
    for name, t in first["tasks"].items():
        end = last["tasks"].get(name, {})
        rows.append([name, "—" if name not in coverage else percent(coverage[name]), percent(t["gap"]),
                     _diag(t.get("M")), percent(end["gap"]) if end else "—", _diag(end.get("M"))])
    return rows


def diag_rows(report: dict) -> list[list[str]]:
    return [[str(r["round"]), _diag(r["M"]), _diag(r["F"]), percent(r["average"]["student_speech"]),
             percent(r["average"]["gap"])] for r in report["rounds"]]


def markdown(report: dict, name: str) -> str:
    first, last = report["rounds"][0]["round"], report["rounds"][-1]["round"]
    fit = report.get("M_fit")
    return "\n".join([
        f"# Evaluation report: {name}",
        "",
        "Accuracy in %, gaps in accuracy points. gap = teacher text - student speech; text gap = teacher text - "
        "student text. 95% intervals: paired bootstrap over items. average: mean over tasks (n: their sum).",
        "",
        markdown_table(TASK_HEADER, task_rows(report)),
        "",
        "## Diagnostics",
        "",
        "M (misalignment) = KL(student on text || student on speech); F (forgetting) = KL(teacher || student) "
        "on held-out text; — where the round had no held-out set.",
        "",
        markdown_table(DIAG_HEADER, diag_rows(report)),
        "",
        "## Per task: natural-speech coverage, gap and M",
        "",
        "coverage: the share of the natural speech that speaks the task's domain (eval.coverage). M per task: "
        "KL(student after the text prompt || after the spoken prompt) over the right answer's tokens.",
        "",
        markdown_table(coverage_header(first, last), coverage_rows(report)),
        "",
        *([f"M predicts speech accuracy: R^2 = {fit['r2']:.3f} over {fit['points']} task-rounds "
           f"(slope {100 * fit['slope']:.1f} points per nat).", ""] if fit else []),
        *([cascade_sentence(report["cascade_fit"]), ""] if report.get("cascade_fit") else []),
        "![gap per task](gap_per_task.png)",
        "",
        "![M and F](diagnostics.png)",
        "",
        *(["![M vs speech accuracy](m_vs_speech.png)", ""] if fit else []),
        *(["![selection share per cluster](selection_share.png)", ""] if selections(report) else []),
    ])


def coverage_header(first: int, last: int) -> tuple[str, ...]:
    return ("task", "coverage (%)", f"gap round {first}", f"M round {first}", f"gap round {last}", f"M round {last}")


def selections(report: dict) -> list[dict]:
    """The rounds that ran selection: round, allocation (clusters, spread)."""
    return [r for r in report["rounds"] if "selection" in r]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)   # Agg, without touching pyplot's global backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def task_colour(i: int) -> tuple[float, float, float, float]:
    """tab10's colours, then tab20's lighter shades of them: 20 tasks before a colour repeats."""
    return colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20 % 2)


def plot_gaps(report: dict) -> bytes:
    """Gap per task per round with its 95% interval; tasks shifted a little on x so the bars do not overlap, each
    in its own colour and marker (more tasks than a 10-colour cycle), the legend beside the axes, off the data."""
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
        ax.errorbar(x, y, yerr=err, marker="os^Dv"[i % 5], capsize=3, label=name, color=task_colour(i))
    ax.plot(rounds, [100 * r["average"]["gap"] for r in report["rounds"]], "k--", marker="s", label="average")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(rounds)
    _label(ax, "round", "gap: teacher text - student speech (accuracy points)", "Text-speech gap per task (95% CI)")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def plot_diagnostics(report: dict) -> bytes:
    """M and F per round, side by side (their scales differ)."""
    fig = Figure(figsize=(8, 3.5))
    rounds = [r["round"] for r in report["rounds"]]
    for i, (key, title) in enumerate([("M", "misalignment M"), ("F", "forgetting F")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(rounds, [math.nan if r[key] is None else r[key] for r in report["rounds"]], marker="o")
        ax.set_xticks(rounds)
        _label(ax, "round", "KL (nats per token)", title)
    fig.tight_layout()
    return _png(fig)


def plot_m_vs_speech(report: dict) -> bytes:
    """Speech accuracy against M, one point per task and round (colour: round), and the fitted line."""
    fit = report["M_fit"]
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    points = m_points(report)
    for round_ in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == round_]
        ax.scatter([p[2] for p in mine], [100 * p[3] for p in mine], s=18, label=f"round {round_}")
    xs = np.linspace(min(p[2] for p in points), max(p[2] for p in points), 2)
    ax.plot(xs, 100 * (fit["slope"] * xs + fit["intercept"]), "k--", linewidth=1, label=f"fit, R² {fit['r2']:.2f}")
    _label(ax, "M on the task's items (nats per answer token)", "student speech accuracy (%)",
           "Misalignment M predicts speech accuracy")
    ax.legend(fontsize="small")
    return _png(fig)


def plot_selection(report: dict) -> bytes:
    """Per selection round: the share of the selected speech each cluster got, beside its share of the pool,
    clusters ordered by their score (M for active selection)."""
    rounds = selections(report)
    fig = Figure(figsize=(7, 2.6 * len(rounds)))
    for i, r in enumerate(rounds):
        sel = r["selection"]
        table = sorted(sel["clusters"], key=lambda row: row["score"])
        pool = sum(row["pool_texts"] for row in table) or 1
        ax = fig.add_subplot(len(rounds), 1, i + 1)
        x = np.arange(len(table))
        ax.bar(x - 0.2, [100 * row["pool_texts"] / pool for row in table], 0.4, label="pool", color="lightgrey")
        ax.bar(x + 0.2, [100 * row["share"] for row in table], 0.4, label="selected speech")
        ax.set_xticks(x, [f"{row['score']:.2g}" for row in table], fontsize="x-small", rotation=90)
        spread = sel.get("spread", {}).get("effective_clusters")
        ax.set_title(f"round {r['round']}: {sel['strategy']}, gamma {sel['gamma']:g}"
                     + ("" if spread is None else f", spread like {spread:.1f} even clusters"), fontsize="small")
        ax.set_ylabel("share (%)")
        ax.legend(fontsize="x-small")
    fig.axes[-1].set_xlabel("clusters, by score")
    fig.tight_layout()
    return _png(fig)


def render(report: dict, run_dir: Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "report.json", report)
    files = {"report.md": markdown(report, run_dir.name).encode("utf-8"), "gap_per_task.png": plot_gaps(report),
             "diagnostics.png": plot_diagnostics(report)}
    if report.get("M_fit"):
        files["m_vs_speech.png"] = plot_m_vs_speech(report)
    if selections(report):
        files["selection_share.png"] = plot_selection(report)
    for name, data in files.items():
        atomic_write_bytes(run_dir / name, data)
    return [run_dir / "report.json", *(run_dir / name for name in files)]


def cascade_sentence(fit: dict) -> str:
    return (f"Student speech against the cascade (the teacher reading the student's transcript): "
            f"{100 * fit['mean_difference']:+.1f} points on average, R^2 = {fit['r2']:.3f} over {fit['points']} "
            f"task-rounds.")


def print_report(report: dict, console: Console | None = None) -> None:
    """The report's two tables; into a log (not a terminal) 150 columns wide so that rows do not wrap."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    first, last = report["rounds"][0]["round"], report["rounds"][-1]["round"]
    for title, header, rows in [("Accuracy (%) and gap per task", TASK_HEADER, task_rows(report)),
                                ("Diagnostics", DIAG_HEADER, diag_rows(report)),
                                ("Per task: natural-speech coverage, gap and M", coverage_header(first, last),
                                 coverage_rows(report))]:
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col == "task" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if report.get("M_fit"):
        fit = report["M_fit"]
        console.print(f"M predicts speech accuracy across tasks and rounds: R^2 = {fit['r2']:.3f} "
                      f"({fit['points']} points)")
    if report.get("cascade_fit"):
        console.print(cascade_sentence(report["cascade_fit"]))


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
