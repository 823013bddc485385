"""The ablation: eval.compare's table over variants and seeds, and ./run.sh ablation with a fake launcher."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.compare import Z, compare, load_run, main, t975
from eval.report import ReportError
from shards.format import atomic_write_json

REPO = Path(__file__).resolve().parent.parent
TEACHER = 0.9


def task(speech: float, ci: tuple[float, float] | None = None) -> dict:
    """One task's eval.json entry; the speech interval is ``ci`` (default +-0.05), the gap's mirrors it."""
    lo, hi = ci or (speech - 0.05, speech + 0.05)
    measures = {"teacher_text": TEACHER, "student_text": 0.85, "student_speech": speech, "gap": TEACHER - speech,
                "text_gap": TEACHER - 0.85}
    ci95 = {k: [v - 0.05, v + 0.05] for k, v in measures.items()} | {"student_speech": [lo, hi],
                                                                       "gap": [TEACHER - hi, TEACHER - lo]}
    return measures | {"n": 100, "ci95": ci95}


def write_run(root: Path, name: str, variant: str, seed: int, stage1: dict, last: dict, last_round: int = 1,
              config: dict | None = None, diagnostics: tuple[dict, dict] = ({}, {"M": 0.1, "F": 0.01})) -> Path:
    """A run folder as train and eval leave it: round-0 and round-R eval.json (with ``diagnostics``: M, F,
    cascade_wer), round-R/config.json."""
    run = root / name
    atomic_write_json(run / "round-0" / "eval.json", {"tasks": stage1} | diagnostics[0])
    atomic_write_json(run / f"round-{last_round}" / "eval.json", {"tasks": last} | diagnostics[1])
    atomic_write_json(run / f"round-{last_round}" / "config.json",
                      config if config is not None else {"seed": seed, "selection": {"strategy": variant}})
    return run


def three_seeds(root: Path) -> list[Path]:
    """Non-narrative speech accuracy per seed: active .6 .7 .8, uniform .5 .65 .65, natural .35 each;
    stage I .30 .31 .32; narrative .85 after the round. M after the round: 1 - that accuracy (stage I 2.0);
    cascade word error: facts 0.2 below math's, math 1 - the accuracy (stage I: math 1.0, facts 0.8,
    narrative 0.1 throughout). Names say nothing: the configs tell the variant."""
    runs = []
    non_narrative = {"active": [0.6, 0.7, 0.8], "uniform": [0.5, 0.65, 0.65], "natural": [0.35, 0.35, 0.35]}
    for variant, values in non_narrative.items():
        for seed, x in enumerate(values):
            stage1 = {"narrative": task(0.8), "facts": task(0.3 + 0.01 * seed), "math": task(0.3 + 0.01 * seed)}
            last = {"narrative": task(0.85), "facts": task(x), "math": task(x)}
            diagnostics = ({"M": 2.0, "cascade_wer": {"narrative": 0.1, "facts": 0.8, "math": 1.0}},
                           {"M": 1 - x, "F": 0.01, "cascade_wer": {"narrative": 0.1, "facts": 0.8 - x, "math": 1 - x}})
            runs.append(write_run(root, f"run{len(runs)}", variant, seed, stage1, last, diagnostics=diagnostics))
    return runs[::-1]


def assert_stat(stat: dict, mean: float, half: float, seeds: int) -> None:
    assert stat["mean"] == pytest.approx(mean)
    assert stat["ci95"] == pytest.approx([mean - half, mean + half])
    assert stat["seeds"] == seeds


def test_t_quantiles():
    assert (t975(1), t975(2), t975(30)) == (12.706, 4.303, 2.042)
    assert t975(100) == pytest.approx(1.984, abs=1e-3) and t975(10_000) == pytest.approx(Z, abs=1e-3)


def test_three_seeds_means_t_intervals_and_paired_differences(tmp_path):
    result = compare([load_run(p) for p in three_seeds(tmp_path)], ["narrative"])
    assert result["round"] == 1 and result["scope_of_differences"] == "average excl. narrative"
    assert {v: sorted(seeds) for v, seeds in result["runs"].items()} == {v: ["0", "1", "2"] for v in
                                                                          ("active", "uniform", "natural")}
    table = result["table"]
    assert list(table) == ["narrative", "facts", "math", "average", "average excl. narrative"]
    assert list(table["math"]["student_speech"]) == ["stage I", "active", "uniform", "natural"]
    t2 = 4.303 / math.sqrt(3)   # t quantile (2 degrees of freedom) / sqrt(seeds)
    other = table["average excl. narrative"]
    assert_stat(other["student_speech"]["active"], 0.7, t2 * 0.1, 3)
    assert_stat(other["gap"]["active"], TEACHER - 0.7, t2 * 0.1, 3)
    assert_stat(other["student_speech"]["uniform"], 0.6, t2 * math.sqrt(0.0075), 3)   # sd of .5 .65 .65
    assert_stat(other["student_speech"]["natural"], 0.35, 0.0, 3)
    assert_stat(other["student_speech"]["stage I"], 0.31, t2 * 0.01, 3)
    assert_stat(table["narrative"]["student_speech"]["active"], 0.85, 0.0, 3)
    assert_stat(table["average"]["student_speech"]["active"], (0.85 + 2 * 0.7) / 3, t2 * 0.1 * 2 / 3, 3)
    diff = result["differences"]
    assert list(diff) == ["active - uniform", "active - natural"] and diff["active - uniform"]["seeds"] == [0, 1, 2]
    assert_stat(diff["active - uniform"]["student_speech"], 0.1, t2 * 0.05, 3)   # paired: .1 .05 .15
    assert_stat(diff["active - uniform"]["gap"], -0.1, t2 * 0.05, 3)
    assert_stat(diff["active - natural"]["student_speech"], 0.35, t2 * 0.1, 3)
    diagnostics = result["diagnostics"]   # M, and the word error averaged over facts and math
    assert list(diagnostics) == ["M", "cascade word error"]
    assert_stat(diagnostics["M"]["stage I"], 2.0, 0.0, 3)
    assert_stat(diagnostics["M"]["active"], 0.3, t2 * 0.1, 3)
    assert_stat(diagnostics["cascade word error"]["stage I"], 0.9, 0.0, 3)
    assert_stat(diagnostics["cascade word error"]["uniform"], 0.9 - 0.6, t2 * math.sqrt(0.0075), 3)
    assert_stat(diff["active - uniform"]["M"], -0.1, t2 * 0.05, 3)   # paired, like the accuracy
    assert_stat(diff["active - natural"]["cascade word error"], -0.35, t2 * 0.1, 3)


def test_one_seed_uses_the_bootstrap_intervals(tmp_path):
    stage1 = {"narrative": task(0.8), "facts": task(0.2), "math": task(0.2)}
    active = write_run(tmp_path, "a", "active", 5, stage1, {
        "narrative": task(0.8, (0.7, 0.88)), "facts": task(0.5, (0.4, 0.6)), "math": task(0.3, (0.22, 0.38))},
        diagnostics=({"M": 1.5}, {"M": 1.0}))
    uniform = write_run(tmp_path, "u", "uniform", 5, stage1, {
        "narrative": task(0.8), "facts": task(0.4, (0.3, 0.5)), "math": task(0.3, (0.22, 0.38))},
        diagnostics=({"M": 1.5}, {"M": 1.25}))
    result = compare([load_run(uniform), load_run(active)], ["narrative"])
    table = result["table"]
    assert table["narrative"]["student_speech"]["active"]["ci95"] == [0.7, 0.88]   # eval.json's, asymmetric
    assert table["narrative"]["gap"]["active"]["ci95"] == pytest.approx([TEACHER - 0.88, TEACHER - 0.7])
    half = math.sqrt(0.1 ** 2 + 0.08 ** 2) / 2   # the tasks' half-widths combined as independent, / 2 tasks
    assert_stat(table["average excl. narrative"]["student_speech"]["active"], 0.4, half, 1)
    assert_stat(table["average excl. narrative"]["student_speech"]["uniform"], 0.35, half, 1)
    assert_stat(result["differences"]["active - uniform"]["student_speech"], 0.05, math.hypot(half, half), 1)
    assert "active - natural" not in result["differences"] and list(table["facts"]["gap"]) == [
        "stage I", "active", "uniform"]
    assert list(result["diagnostics"]) == ["M"]   # no cascade in these eval.json: no word error row
    assert_stat(result["diagnostics"]["M"]["uniform"], 1.25, 0.0, 1)   # one seed: no interval
    assert_stat(result["differences"]["active - uniform"]["M"], -0.25, 0.0, 1)
    assert "cascade word error" not in result["differences"]["active - uniform"]


def test_natural_tasks_option(tmp_path):
    runs = [load_run(p) for p in three_seeds(tmp_path)]
    both = compare(runs, ["narrative", "facts", "absent"])
    assert both["scope_of_differences"] == "average excl. narrative, facts"
    assert both["differences"]["active - uniform"]["student_speech"]["mean"] == pytest.approx(0.1)
    none = compare(runs, [])
    assert list(none["table"])[-1] == "average" and none["scope_of_differences"] == "average"
    assert none["differences"]["active - uniform"]["student_speech"]["mean"] == pytest.approx(0.2 / 3)
    with pytest.raises(ReportError, match="every task .* is in --natural-tasks"):
        compare(runs, ["narrative", "facts", "math"])


def test_bad_runs_are_named(tmp_path):
    t = {"narrative": task(0.8), "facts": task(0.5)}
    good = load_run(write_run(tmp_path, "good", "active", 0, t, t))
    later = load_run(write_run(tmp_path, "later", "uniform", 0, t, t, last_round=2))
    with pytest.raises(ReportError, match="later: last evaluated round is 2"):
        compare([good, later], ["narrative"])
    twin = load_run(write_run(tmp_path, "twin", "active", 0, t, t))
    with pytest.raises(ReportError, match="both are active with seed 0"):
        compare([good, twin], ["narrative"])
    other = load_run(write_run(tmp_path, "other", "uniform", 0, t, {"narrative": task(0.8), "logic": task(0.5)}))
    with pytest.raises(ReportError, match="other: tasks"):
        compare([good, other], ["narrative"])
    with pytest.raises(ReportError, match="selection.strategy: must be one of"):
        load_run(write_run(tmp_path, "odd", "active", 0, t, t, config={"seed": 0, "selection": {"strategy": "x"}}))
    with pytest.raises(ReportError, match="seed: must be an integer"):
        load_run(write_run(tmp_path, "noseed", "active", 0, t, t, config={"selection": {}}))
    assert load_run(write_run(tmp_path, "old", "", 4, t, t, config={"seed": 4, "selection": {}})).variant == "active"
    only0 = tmp_path / "only0"
    atomic_write_json(only0 / "round-0" / "eval.json", {"tasks": t})
    with pytest.raises(ReportError, match="only round 0 is evaluated"):
        load_run(only0)
    (tmp_path / "good" / "round-1" / "config.json").unlink()
    with pytest.raises(ReportError, match=r"round-1/config.json: cannot read"):
        load_run(tmp_path / "good")


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    runs = three_seeds(tmp_path)
    prefix = tmp_path / "toy-ablation"
    assert main([*map(str, runs), "--out", str(prefix)]) == 0
    written = json.loads((tmp_path / "toy-ablation.json").read_text())
    assert written == json.loads(json.dumps(compare([load_run(p) for p in runs], ["narrative"])))
    md = (tmp_path / "toy-ablation.md").read_text()
    assert "| task | stage I | active | uniform | natural |" in md
    assert "| average excl. narrative | 31.0 [" in md and "| active - uniform | 10.0 [" in md
    assert "| cascade word error | 0.900 | 0.200 [" in md   # stage I is the same in every seed: no interval
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # atomic: no temp files left
    assert "Differences on the average excl. narrative" in capsys.readouterr().out
    assert main([str(runs[0]), str(tmp_path / "missing")]) == 2
    assert "missing: no round-R/eval.json" in capsys.readouterr().err


def test_where_each_selection_round_spent_its_budget(tmp_path):
    """Beside the result, the allocation's spread: texts, plays per text (that round's shards in its own
    data_mix.json, whatever the runs folder's path) and effective clusters, per variant, seed and round; a run
    that selected nothing (natural) has no rows, and a round without data_mix.json shows no plays."""
    runs = three_seeds(tmp_path)
    clusters = [{"cluster": 0, "texts": 30}, {"cluster": 1, "texts": 10}, {"cluster": 2, "texts": 0}]
    for i, run in enumerate(runs):
        variant = json.loads((run / "round-1" / "config.json").read_text())["selection"]["strategy"]
        if variant == "natural":
            continue
        atomic_write_json(run / "round-1" / "selection" / "allocation.json",
                          {"strategy": variant, "clusters": clusters, "spread": {"effective_clusters": 1 + i / 4}})
        if i % 2 == 0:
            atomic_write_json(run / "round-1" / "data_mix.json",
                              {"plays": {"assets/speech": 1.0, f"runs/x/{run.name}/round-1/selection/shards": 4.0 + i,
                                         "runs/x/round-2/selection/shards": 99.0}})
    result = compare([load_run(p) for p in runs], ["narrative"])
    assert set(result["selection"]) == {"active", "uniform"}
    by_run = {str(r.path.name): r for r in map(load_run, runs)}
    for i, run in enumerate(runs):
        summary = by_run[run.name].selection
        if json.loads((run / "round-1" / "config.json").read_text())["selection"]["strategy"] == "natural":
            assert summary == []
            continue
        assert summary == [{"round": 1, "texts": 40, "plays": 4.0 + i if i % 2 == 0 else None, "clusters": 3,
                            "effective_clusters": 1 + i / 4}]
    prefix = tmp_path / "out"
    assert main([*map(str, runs), "--out", str(prefix)]) == 0
    md = (tmp_path / "out.md").read_text()
    assert "| variant | seed | round | texts | plays per text | effective clusters |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| active | ", "| uniform | ")) and " of 3 |" in line]
    assert len(rows) == 6 and sum("| 40 | - | " in row for row in rows) == 3


# ----------------------------------------------------------------------------- ./run.sh ablation

FAKE_LAUNCHER = '''
"""Stands in for `python -m <job>`: writes what train, eval and selection leave, logs whether it ran."""
import json, sys
from pathlib import Path

job, args = sys.argv[1], sys.argv[2:]
opts = dict(a.split("=", 1) for a in args if "=" in a)
round_ = int(args[args.index("--round") + 1])
run = Path(opts["run.dir"]) / opts["run.name"]
strategy, seed = opts["selection.strategy"], int(opts["seed"])
folder = run / f"round-{round_}"
marker = {"train": folder / "DONE", "eval": folder / "eval.json", "selection": folder / "selection" / "DONE"}[job]
ran = not marker.exists()
if ran:
    marker.parent.mkdir(parents=True, exist_ok=True)
    if job == "train":
        (folder / "config.json").write_text(json.dumps({"seed": seed, "selection": {"strategy": strategy}}))
    if job == "selection":
        (run / "pool_embeddings").mkdir(exist_ok=True)
        (run / "pool_embeddings" / "cache.npy").write_text("vectors")
        if strategy != "natural":
            with open(run / "data.yaml", "a") as f:
                f.write(f"{run.name} round {round_}\\n")
    if job == "eval":
        lift = {"active": 0.2, "uniform": 0.1, "natural": 0.05}[strategy] * round_
        tasks = {}
        for name, speech in (("narrative", 0.8), ("facts", 0.3 + lift)):
            m = {"teacher_text": 0.9, "student_text": 0.85, "student_speech": speech, "gap": 0.9 - speech,
                 "text_gap": 0.05}
            tasks[name] = m | {"n": 50, "ci95": {k: [v - 0.05, v + 0.05] for k, v in m.items()}}
        marker.write_text(json.dumps({"tasks": tasks}))
    else:
        marker.write_text("{}")
with open(run.parent / "jobs.log", "a") as f:
    f.write(f"{run.name} {job} {round_} {'ran' if ran else 'skip'}\\n")
'''


def ablation(*args: str, launcher: Path | None = None, timeout: int = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if launcher is not None:
        env["SALAD_LAUNCH"] = f"{sys.executable} {launcher}"
    return subprocess.run(["./run.sh", "ablation", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["configs/smoke.yaml", "--seeds", "0,x"], "--seeds '0,x': expected seeds separated by commas"),
    (["--seeds"], "--seeds '': expected seeds"),
    (["configs/smoke.yaml", "extra"], "unexpected argument 'extra'"),
    (["configs/missing.yaml", "--seeds=1"], "config configs/missing.yaml not found"),
])
def test_run_sh_ablation_bad_arguments(args, message):
    done = ablation(*args)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.slow
def test_run_sh_ablation_reuses_round_0_and_compares(tmp_path):
    launcher = tmp_path / "fake_launch.py"
    launcher.write_text(FAKE_LAUNCHER)
    runs = tmp_path / "runs"
    done = ablation("configs/smoke.yaml", "--seeds", "7", f"run.dir={runs}", "eval.natural_tasks=[narrative, story]",
                    launcher=launcher, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (runs / "jobs.log").read_text().splitlines()
    variants = {"smoke-s7": "active", "smoke-s7-uniform": "uniform", "smoke-s7-natural": "natural"}
    names = list(variants)
    for name in names:   # the smoke config has 2 rounds
        jobs = [line.split(" ", 1)[1] for line in log if line.split()[0] == name]
        stage1 = ["train 0 ran", "eval 0 ran"] if name == "smoke-s7" else ["train 0 skip", "eval 0 skip"]
        assert jobs == stage1 + ["selection 1 ran", "train 1 ran", "eval 1 ran",
                                 "selection 2 ran", "train 2 ran", "eval 2 ran"], name
        assert (runs / name / "report.json").is_file()
        config = json.loads((runs / name / "round-2" / "config.json").read_text())
        assert config == {"seed": 7, "selection": {"strategy": variants[name]}}
    for variant in names[1:]:   # the same stage-I files (hard links) and caches; not the active data.yaml
        for shared in ("round-0/DONE", "round-0/eval.json", "pool_embeddings/cache.npy"):
            assert (runs / variant / shared).stat().st_ino == (runs / "smoke-s7" / shared).stat().st_ino
    selected = (runs / "smoke-s7-uniform" / "data.yaml").read_text()
    assert selected == "smoke-s7-uniform round 1\nsmoke-s7-uniform round 2\n"
    assert not (runs / "smoke-s7-natural" / "data.yaml").exists()
    assert not [p for p in runs.rglob(".*partial")]
    result = json.loads((runs / "smoke-ablation.json").read_text())
    assert result["runs"] == {v: {"7": str(runs / n)} for n, v in variants.items()}
    assert result["natural_tasks"] == ["narrative", "story"]   # the config's, passed on to eval.compare
    diff = result["differences"]
    assert diff["active - uniform"]["student_speech"]["mean"] == pytest.approx(0.2)    # (.2 - .1) x round 2
    assert diff["active - natural"]["student_speech"]["mean"] == pytest.approx(0.3)
    assert (runs / "smoke-ablation.md").is_file()
