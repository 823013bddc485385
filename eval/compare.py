"""Side by side: active selection vs uniform selection vs the natural-speech control, over seeds.

    python -m eval.compare RUN_DIR [RUN_DIR ...] [--natural-tasks narrative] [--out PREFIX]

A run's variant (``selection.strategy``) and seed come from its last round's ``config.json`` (written by
``python -m train``), not from its folder name, so run folders may be given in any order. Every run must
have its last round evaluated at the same round R >= 1 on the same tasks. Prints, per task and on average
over all tasks and over the tasks not in ``--natural-tasks``, student-speech accuracy and gap at stage I
(round 0) and after round R for each variant, and the differences active - uniform and active - natural
on that second average, and the diagnostics that say whether selection reached the student's ears: M and,
where eval.json has it, the cascade's word error averaged over the same tasks; and where each selection round
spent its budget: texts chosen, plays per text in its stage II, and the allocation's spread (the number of even
clusters its entropy equals: 1 is an argmax). Writes them to ``PREFIX.json`` and ``PREFIX.md`` (default
``<runs folder>/ablation``).

95% intervals: with several seeds, a t interval over seeds (differences paired by seed, since the variants of
a seed share its stage-I student); with one seed, the item bootstrap intervals of eval.json (an average or a
difference: normal approximation from them, tasks and runs taken as independent).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from eval.report import ReportError, build_report
from model.card import markdown_table, percent
from shards.format import atomic_write_bytes, atomic_write_json
from train.layout import RunFolder

VARIANTS = ("active", "uniform", "natural")
MEASURES = {"student_speech": "Student speech accuracy (%)", "gap": "Gap: teacher text - student speech (points)"}
DIAGNOSTICS = ("M", "cascade word error")   # whether the selected speech reached the student's ears
STAGE_I = "stage I"
Z = 1.959964
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

Point = tuple[float, float, float]   # value, 95% interval of one run


@dataclass
class Run:
    path: Path
    variant: str
    seed: int
    round: int
    stage1: dict[str, dict]   # task -> eval.json results of round 0
    last: dict[str, dict]     # task -> eval.json results of the last round
    diagnostics: tuple[dict, dict]   # round 0's and the last round's M and cascade_wer (task -> error)
    selection: list[dict]            # per selection round: round, texts, plays per text, effective clusters


def t975(df: int) -> float:
    """97.5% quantile of Student's t (table to 30 degrees of freedom, then its first-order expansion)."""
    return T975[df - 1] if df <= len(T975) else Z + (Z ** 3 + Z) / (4 * df)


def load_run(path: Path) -> Run:
    """A run's round-0 and last-round results, its variant and its seed."""
    path = Path(path)
    rounds = build_report(path)["rounds"]
    if rounds[0]["round"] != 0:
        raise ReportError(f"{path}: no round-0/eval.json (stage I is the reference)")
    last = rounds[-1]
    if last["round"] < 1:
        raise ReportError(f"{path}: only round 0 is evaluated; a comparison needs a selection round")
    config_path = RunFolder(path).round(last["round"]) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{config_path}: cannot read the run's config ({exc})") from None
    variant = (config.get("selection") or {}).get("strategy", "active")
    seed = config.get("seed")
    if variant not in VARIANTS:
        raise ReportError(f"{config_path}: selection.strategy: must be one of {list(VARIANTS)}, got {variant!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReportError(f"{config_path}: seed: must be an integer, got {seed!r}")
    diagnostics = tuple({k: r.get(k) for k in ("M", "cascade_wer")} for r in (rounds[0], last))
    selection = [selection_summary(RunFolder(path), r) for r in rounds if "selection" in r]
    return Run(path, variant, seed, last["round"], rounds[0]["tasks"], last["tasks"], diagnostics, selection)


def selection_summary(run: RunFolder, report_round: dict) -> dict:
    """Where one round's selection went: texts, plays per text in that round's stage II (``data_mix.json``'s
    entry for the round's shards; None where it is missing), and the allocation's effective clusters."""
    round_, allocation = report_round["round"], report_round["selection"]
    mix = run.round(round_) / "data_mix.json"
    plays = json.loads(mix.read_text()).get("plays", {}) if mix.is_file() else {}
    own = [v for k, v in plays.items() if Path(k).parts[-3:] == (f"round-{round_}", "selection", "shards")]
    return {"round": round_, "texts": sum(c["texts"] for c in allocation["clusters"]),
            "plays": own[0] if own else None, "clusters": len(allocation["clusters"]),
            "effective_clusters": (allocation.get("spread") or {}).get("effective_clusters")}


def scope_point(tasks: dict[str, dict], names: list[str], measure: str) -> Point:
    """One run's measure on one task (with its bootstrap interval) or averaged over tasks (normal
    approximation: the tasks' standard errors, read off their intervals, combined as independent)."""
    if len(names) == 1:
        lo, hi = tasks[names[0]]["ci95"][measure]
        return tasks[names[0]][measure], lo, hi
    value = sum(tasks[n][measure] for n in names) / len(names)
    se = math.sqrt(sum(_se(tasks[n]["ci95"][measure]) ** 2 for n in names)) / len(names)
    return value, value - Z * se, value + Z * se


def _se(interval: list[float] | tuple[float, float]) -> float:
    return (interval[1] - interval[0]) / (2 * Z)


def difference(a: Point, b: Point) -> Point:
    """a - b for one seed, its interval from the two runs' intervals taken as independent."""
    value, se = a[0] - b[0], math.hypot(_se(a[1:]), _se(b[1:]))
    return value, value - Z * se, value + Z * se


def summarize(points: list[Point]) -> dict:
    """Mean over seeds with a 95% interval: t over the seeds, or with one seed that seed's own interval."""
    values = np.array([p[0] for p in points], dtype=np.float64)
    mean = float(values.mean())
    if len(points) == 1:
        lo, hi = points[0][1:]
    else:
        half = t975(len(points) - 1) * float(values.std(ddof=1)) / math.sqrt(len(points))
        lo, hi = mean - half, mean + half
    return {"mean": mean, "ci95": [float(lo), float(hi)], "seeds": len(points)}


def diagnostic_values(diagnostics: dict, other: list[str]) -> dict[str, float | None]:
    """M, and the cascade's word error averaged over ``other`` (None where the round did not measure it)."""
    wer = diagnostics.get("cascade_wer") or {}
    mean_wer = float(np.mean([wer[t] for t in other])) if all(t in wer for t in other) else None
    return dict(zip(DIAGNOSTICS, (diagnostics.get("M"), mean_wer), strict=True))


def over_seeds(values: list[float]) -> dict:
    """``summarize`` for a value without an interval of its own (M, word error): the t interval over seeds."""
    return summarize([(v, v, v) for v in values])


def group(runs: list[Run]) -> dict[str, dict[int, Run]]:
    """variant -> seed -> run, checking that all runs end at one round on one task set."""
    first = runs[0]
    by_variant: dict[str, dict[int, Run]] = {}
    for run in runs:
        if run.round != first.round:
            raise ReportError(f"{run.path}: last evaluated round is {run.round}, but {first.path}'s is {first.round}")
        if set(run.last) != set(first.last) or set(run.stage1) != set(first.last):
            raise ReportError(f"{run.path}: tasks {list(run.last)} differ from {first.path}'s {list(first.last)}")
        seeds = by_variant.setdefault(run.variant, {})
        if run.seed in seeds:
            raise ReportError(f"{run.path} and {seeds[run.seed].path}: both are {run.variant} with seed {run.seed}")
        seeds[run.seed] = run
    return {v: dict(sorted(by_variant[v].items())) for v in VARIANTS if v in by_variant}


def compare(runs: list[Run], natural_tasks: list[str]) -> dict:
    """The side-by-side table and the differences (fractions; gaps and differences in [-1, 1])."""
    if not runs:
        raise ReportError("no runs to compare")
    by_variant = group(runs)
    tasks = list(runs[0].last)
    other = [t for t in tasks if t not in natural_tasks]
    if not other:
        raise ReportError(f"every task ({', '.join(tasks)}) is in --natural-tasks: nothing to compare on")
    excluded = [t for t in tasks if t in natural_tasks]
    other_name = f"average excl. {', '.join(excluded)}" if excluded else "average"
    scopes = {**{t: [t] for t in tasks}, "average": tasks, other_name: other}
    seed_runs: dict[int, Run] = {}
    for seeds in by_variant.values():   # a seed's variants share round 0: take it from the first variant
        for seed, run in seeds.items():
            seed_runs.setdefault(seed, run)
    stage1 = [seed_runs[s] for s in sorted(seed_runs)]
    columns = {STAGE_I: [r.stage1 for r in stage1],
               **{v: [r.last for r in seeds.values()] for v, seeds in by_variant.items()}}
    table = {scope: {m: {col: summarize([scope_point(res, names, m) for res in results])
                         for col, results in columns.items()} for m in MEASURES}
             for scope, names in scopes.items()}
    last_diag = {v: {s: diagnostic_values(r.diagnostics[1], other) for s, r in seeds.items()}
                 for v, seeds in by_variant.items()}
    diag_columns = {STAGE_I: [diagnostic_values(r.diagnostics[0], other) for r in stage1],
                    **{v: list(by_seed.values()) for v, by_seed in last_diag.items()}}
    diagnostics = {name: {col: over_seeds([d[name] for d in ds]) for col, ds in diag_columns.items()}
                   for name in DIAGNOSTICS   # a diagnostic some run lacks is left out
                   if all(d[name] is not None for ds in diag_columns.values() for d in ds)}
    differences = {}
    active = by_variant.get("active", {})
    for variant in ("uniform", "natural"):
        paired = sorted(set(active) & set(by_variant.get(variant, {})))
        if paired:
            differences[f"active - {variant}"] = {
                "seeds": paired,
                **{m: summarize([difference(scope_point(active[s].last, other, m),
                                            scope_point(by_variant[variant][s].last, other, m)) for s in paired])
                   for m in MEASURES}}
            for name in diagnostics:
                differences[f"active - {variant}"][name] = over_seeds(
                    [last_diag["active"][s][name] - last_diag[variant][s][name] for s in paired])
    selection = {v: {str(s): r.selection for s, r in seeds.items()} for v, seeds in by_variant.items()
                 if any(r.selection for r in seeds.values())}
    return {"round": runs[0].round, "natural_tasks": list(natural_tasks), "scope_of_differences": other_name,
            "runs": {v: {str(s): str(r.path) for s, r in seeds.items()} for v, seeds in by_variant.items()},
            "table": table, "differences": differences, "diagnostics": diagnostics, "selection": selection}


def _cell(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{percent(stat['mean'])} [{percent(lo)}, {percent(hi)}]"


def table_rows(result: dict, measure: str) -> tuple[tuple[str, ...], list[list[str]]]:
    columns = list(next(iter(result["table"].values()))[measure])
    rows = [[scope, *(_cell(by[measure][c]) for c in columns)] for scope, by in result["table"].items()]
    return ("task", *columns), rows


def _diag_cell(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.3f}" if lo == hi else f"{stat['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def difference_rows(result: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    names = list(result["diagnostics"])
    rows = [[name, *(_cell(d[m]) for m in MEASURES), *(_diag_cell(d[n]) for n in names),
             ", ".join(map(str, d["seeds"]))] for name, d in result["differences"].items()]
    return ("contrast", "student speech", "gap", *names, "seeds"), rows


def diagnostic_rows(result: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    columns = list(next(iter(result["table"].values()))["student_speech"])
    rows = [[name, *(_diag_cell(by[c]) for c in columns)] for name, by in result["diagnostics"].items()]
    return ("diagnostic", *columns), rows


def selection_rows(result: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [[variant, seed, str(r["round"]), str(r["texts"]), number(r["plays"], 1),
             f"{number(r['effective_clusters'], 1)} of {r['clusters']}"]
            for variant, seeds in result["selection"].items() for seed, rounds in seeds.items() for r in rounds]
    return ("variant", "seed", "round", "texts", "plays per text", "effective clusters"), rows


def sections(result: dict) -> list[tuple[str, tuple[str, ...], list[list[str]]]]:
    """(title, header, rows) of every table, in the order they are printed."""
    out = [(title, *table_rows(result, m)) for m, title in MEASURES.items()]
    out.append((f"Differences on the {result['scope_of_differences']} (accuracy and gap in points)",
                *difference_rows(result)))
    if result["diagnostics"]:
        scope = result["scope_of_differences"]
        out.append((f"Diagnostics: M (held-out speech), the cascade's word error on the {scope}",
                    *diagnostic_rows(result)))
    if result["selection"]:
        out.append(("Selection: texts chosen, plays per text in stage II, the allocation's spread",
                    *selection_rows(result)))
    return out


def _seeds_note(result: dict) -> str:
    counts = ", ".join(f"{v} {len(seeds)}" for v, seeds in result["runs"].items())
    return (f"Seeds per variant: {counts}. Mean over seeds [95% interval]: t over seeds; with one seed, the "
            "bootstrap over items (normal approximation for averages and differences), and no interval for M and "
            "the word error.")


def markdown(result: dict) -> str:
    lines = [f"# Ablation after round {result['round']}: active vs uniform selection vs natural speech only", "",
             "stage I: round 0, shared by the variants of a seed. " + _seeds_note(result), ""]
    for title, header, rows in sections(result):
        lines += [f"## {title}", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def print_result(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    for title, header, rows in sections(result):
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col in ("task", "contrast", "diagnostic", "variant") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(_seeds_note(result))


def write(result: dict, prefix: Path) -> list[Path]:
    paths = [prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")]
    atomic_write_json(paths[0], result)
    atomic_write_bytes(paths[1], markdown(result).encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--natural-tasks", default="narrative",
                        help="comma-separated tasks the natural speech covers (left out of the second average)")
    parser.add_argument("--out", type=Path, default=None, help="PREFIX of PREFIX.json and PREFIX.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = compare([load_run(p) for p in args.runs], [t for t in args.natural_tasks.split(",") if t])
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_result(result)
    paths = write(result, args.out or args.runs[0].parent / "ablation")
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
