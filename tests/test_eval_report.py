"""The salad_gap metric module (loaded by path through evaluate) and the cross-round report."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from eval.report import ReportError, build_report, m_fit, main, render

METRIC_DIR = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "salad_gap"
MEASURES = ("teacher_text", "student_text", "student_speech", "gap", "text_gap")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def random_correct(n: int, rates: tuple[float, float, float], seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    modes = ("teacher_text", "student_text", "student_speech")
    return {m: (rng.random(n) < p).astype(int).tolist() for m, p in zip(modes, rates, strict=True)}


def test_metric_exact_values(metric):
    r = metric.compute(teacher_text=[1] * 8 + [0] * 2, student_text=[1] * 7 + [0] * 3,
                       student_speech=[1] * 5 + [0] * 5, n_bootstrap=200)
    assert r["n"] == 10
    assert r["teacher_text"] == pytest.approx(0.8)
    assert r["student_text"] == pytest.approx(0.7)
    assert r["student_speech"] == pytest.approx(0.5)
    assert r["gap"] == pytest.approx(0.3)
    assert r["text_gap"] == pytest.approx(0.1)
    assert set(r["ci95"]) == set(MEASURES)


def test_metric_bootstrap_is_paired(metric):
    """Speech right exactly where the teacher is right: every resample has gap 0, so the interval is [0, 0]."""
    c = random_correct(60, (0.7, 0.6, 0.0))
    r = metric.compute(teacher_text=c["teacher_text"], student_text=c["student_text"],
                       student_speech=c["teacher_text"], n_bootstrap=300)
    assert r["gap"] == 0.0 and r["ci95"]["gap"] == [0.0, 0.0]
    assert r["ci95"]["teacher_text"][1] - r["ci95"]["teacher_text"][0] > 0.1


def test_metric_ci_contains_estimate_and_narrows(metric):
    small = metric.compute(**random_correct(40, (0.8, 0.75, 0.6)), n_bootstrap=500)
    large = metric.compute(**random_correct(4000, (0.8, 0.75, 0.6)), n_bootstrap=500)
    for r in (small, large):
        for name in MEASURES:
            lo, hi = r["ci95"][name]
            assert lo <= r[name] <= hi, (name, r)
    for name in MEASURES:
        width = {k: r["ci95"][name][1] - r["ci95"][name][0] for k, r in (("small", small), ("large", large))}
        assert width["large"] < width["small"] / 3, (name, width)


def test_metric_deterministic_with_seed(metric):
    c = random_correct(200, (0.8, 0.7, 0.5), seed=3)
    a = metric.compute(**c, n_bootstrap=300, seed=7)
    b = metric.compute(**c, n_bootstrap=300, seed=7)
    other = metric.compute(**c, n_bootstrap=300, seed=8)
    assert a == b
    assert other["ci95"] != a["ci95"]
    assert {k: other[k] for k in MEASURES} == {k: a[k] for k in MEASURES}


def test_metric_rejects_non_binary(metric):
    with pytest.raises(ValueError, match="0 or 1"):
        metric.compute(teacher_text=[1, 2], student_text=[1, 0], student_speech=[0, 0])


def fake_task(teacher: float, student_text: float, speech: float, n: int) -> dict:
    values = {"teacher_text": teacher, "student_text": student_text, "student_speech": speech,
              "gap": teacher - speech, "text_gap": teacher - student_text}
    return values | {"n": n, "ci95": {k: [v - 0.05, v + 0.05] for k, v in values.items()}}


ROUNDS = {   # round -> eval.json; rounds 2 and 10 check numeric (not lexicographic) order
    0: {"tasks": {"arc": fake_task(0.8, 0.78, 0.5, 100), "piqa": fake_task(0.7, 0.7, 0.6, 50)}, "M": 0.9, "F": 0.1},
    10: {"tasks": {"arc": fake_task(0.8, 0.8, 0.74, 100), "piqa": fake_task(0.7, 0.69, 0.66, 50)},
         "M": 0.3, "F": 0.05, "cascade": {"arc": 0.79}},
    2: {"tasks": {"arc": fake_task(0.8, 0.79, 0.62, 100), "piqa": fake_task(0.7, 0.7, 0.64, 50)}},
}


def write_rounds(run_dir: Path, rounds: dict) -> None:
    for r, data in rounds.items():
        (run_dir / f"round-{r}").mkdir(parents=True)
        (run_dir / f"round-{r}" / "eval.json").write_text(json.dumps(data))


def test_report_files(tmp_path):
    write_rounds(tmp_path, ROUNDS)
    (tmp_path / "round-3").mkdir()   # a round not evaluated yet is skipped
    report = build_report(tmp_path)
    paths = render(report, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "gap_per_task.png", "diagnostics.png"]

    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 2, 10]
    for entry in saved["rounds"]:
        data = ROUNDS[entry["round"]]
        assert entry["tasks"] == data["tasks"]
        assert (entry["M"], entry["F"]) == (data.get("M"), data.get("F"))
        assert entry["average"]["gap"] == pytest.approx(np.mean([t["gap"] for t in data["tasks"].values()]))
    assert saved["rounds"][2]["cascade"] == {"arc": 0.79}

    md = (tmp_path / "report.md").read_text()
    assert "| 10 | arc | 100 | 80.0 | 80.0 | 74.0 | 6.0 [1.0, 11.0] | 0.0 [-5.0, 5.0] | 79.0 |" in md   # + cascade
    assert "| 10 | piqa | 50 | 70.0 | 69.0 | 66.0 | 4.0 [-1.0, 9.0] | 1.0 [-4.0, 6.0] | — |" in md
    assert "| 0 | average | 150 | 75.0 | 74.0 | 55.0 | 20.0 | 1.0 |" in md
    assert "| 0 | 0.9 | 0.1 | 55.0 | 20.0 |" in md
    assert "| 2 | — | — |" in md
    for name in ("gap_per_task.png", "diagnostics.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_report(tmp_path)
    bad = json.loads(json.dumps(ROUNDS[0]))
    bad["tasks"]["piqa"]["gap"] = "high"
    write_rounds(tmp_path, {1: ROUNDS[0], 4: bad})
    path = tmp_path / "round-4" / "eval.json"
    with pytest.raises(ReportError, match=rf"{path}: tasks\.piqa\.gap: must be a number"):
        build_report(tmp_path)
    del bad["tasks"]["piqa"]["ci95"]["text_gap"]
    bad["tasks"]["piqa"]["gap"] = 0.1
    path.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match=rf"{path}: tasks\.piqa\.ci95\.text_gap"):
        build_report(tmp_path)
    path.write_text('{"tasks": ')
    with pytest.raises(ReportError, match=rf"{path}: cannot read JSON"):
        build_report(tmp_path)


def test_cli(tmp_path, capsys):
    write_rounds(tmp_path / "exp", {1: ROUNDS[0]})
    config = tmp_path / "exp.yaml"
    config.write_text(f"run: {{name: exp, dir: {tmp_path}}}\n")
    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "10.0 [5.0, 15.0]" in out
    assert (tmp_path / "exp" / "report.md").is_file()
    assert main(["--config", str(config), "run.name=none"]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_report_fits_m_to_speech_and_shows_coverage_and_selection(tmp_path):
    """M per task predicts speech accuracy: an exact line gives R^2 1 with its slope; the coverage table and the
    selection plot come from eval.json's "coverage" and the round's allocation.json."""
    rounds = copy.deepcopy({0: ROUNDS[0], 1: ROUNDS[10]})
    for data in rounds.values():
        for t in data["tasks"].values():
            t["M"] = (0.9 - t["student_speech"]) / 0.5      # speech = 0.9 - 0.5 M exactly
        data["coverage"] = {"arc": 0.02, "piqa": 0.5}
    rounds[1]["tasks"]["piqa"]["M"] += 0.1                 # one point off the line: R^2 below 1
    write_rounds(tmp_path, rounds)
    clusters = [{"cluster": c, "pool_texts": 10, "score": s, "target_share": 0.5, "texts": n, "seconds": n,
                 "share": n / 4} for c, s, n in ((0, 2.0, 3), (1, 0.5, 1))]
    (tmp_path / "round-1/selection").mkdir()
    (tmp_path / "round-1/selection/allocation.json").write_text(json.dumps(
        {"strategy": "active", "gamma": 5, "budget_s": 4, "spread": {"effective_clusters": 1.75},
         "clusters": clusters}))
    report = build_report(tmp_path)
    fit = report["M_fit"]
    assert fit["points"] == 4 and 0.8 < fit["r2"] < 1.0 and fit["slope"] == pytest.approx(-0.5, abs=0.1)
    exact = m_fit({"rounds": [report["rounds"][0]]})   # round 0 alone: 2 points, too few for a fit
    assert exact is None
    names = [p.name for p in render(report, tmp_path)]
    assert names[-2:] == ["m_vs_speech.png", "selection_share.png"]
    for name in names[-2:]:
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "report.md").read_text()
    assert "| arc | 2.0 | 30.0 | 0.8 | 6.0 | 0.32 |" in md and "| piqa | 50.0 | 10.0 | 0.6 |" in md
    assert f"R^2 = {fit['r2']:.3f} over 4 task-rounds" in md
    assert report["rounds"][1]["selection"]["clusters"] == clusters and "selection" not in report["rounds"][0]


def test_report_fits_speech_to_the_cascade(tmp_path):
    """cascade_fit: speech accuracy on the cascade's over every task and round, with the mean of speech - cascade;
    a round without the cascade adds no points, and fewer than 3 points give no fit."""
    rounds = copy.deepcopy({0: ROUNDS[0], 1: ROUNDS[10]})
    rounds[0]["cascade"] = {"arc": 0.60, "piqa": 0.80}
    rounds[1]["cascade"] = {"arc": 0.70, "piqa": 0.50}
    write_rounds(tmp_path, rounds)
    report = build_report(tmp_path)
    x = np.array([0.60, 0.80, 0.70, 0.50])
    y = np.array([t["student_speech"] for r in (rounds[0], rounds[1]) for t in r["tasks"].values()])
    fit = report["cascade_fit"]
    assert fit["points"] == 4 and fit["mean_difference"] == pytest.approx((y - x).mean())
    assert fit["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    render(report, tmp_path)
    assert f"{100 * fit['mean_difference']:+.1f} points on average, R^2 = {fit['r2']:.3f} over 4 task-rounds" in (
        tmp_path / "report.md").read_text()
    del rounds[1]["cascade"]
    write_rounds(tmp_path / "without", rounds)
    assert "cascade_fit" not in build_report(tmp_path / "without")


def test_eval_reads_the_coverage_of_its_tasks_and_names_a_bad_file(tmp_path):
    from eval.__main__ import read_coverage

    good = tmp_path / "coverage.json"
    good.write_text(json.dumps({"shares": {"arc": 0.02, "piqa": 0.5, "other": 0.48}, "documents": {}}))
    assert read_coverage(str(good), ["arc", "piqa", "new"]) == {"arc": 0.02, "piqa": 0.5}
    for content in ('{"share": {}}', '{"shares": {"arc": "a lot"}}', '{"shares": {"arc": 2}}', "not json"):
        good.write_text(content)
        with pytest.raises(ValueError, match=f"eval.coverage {good}"):
            read_coverage(str(good), ["arc"])
