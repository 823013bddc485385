"""SALAD text-speech gap: accuracy in three modes, the gaps, and paired-bootstrap 95% intervals.

Loaded by path (no Hub): ``evaluate.load("<repo>/eval/metrics/salad_gap")``. evaluate copies this one
file into its module cache, so it imports nothing from the repo.
"""

import datasets
import evaluate
import numpy as np

MODES = ("teacher_text", "student_text", "student_speech")
MEASURES = (*MODES, "gap", "text_gap")
CHUNK = 128   # bootstrap replicates resampled at once: bounds memory to CHUNK x n indices

_DESCRIPTION = """
Per-item correctness of one multiple-choice task scored three ways: the original LLM on text
(`teacher_text`), the adapted model on text (`student_text`) and the adapted model on the spoken
context (`student_speech`). Returns each accuracy, `gap = teacher_text - student_speech` (the
text-speech gap of SALAD), `text_gap = teacher_text - student_text` (forgetting), `n`, and `ci95`:
a percentile 95% interval for each of the five numbers from a paired bootstrap over items (one
resample of item indices per replicate, shared by all five, so the gaps keep the pairing).
"""

_KWARGS_DESCRIPTION = """
Args:
    teacher_text (list of int): 1 where the teacher on text got item i right, else 0.
    student_text (list of int): the same for the student on text.
    student_speech (list of int): the same for the student on speech. All three lists are aligned by item.
    n_bootstrap (int): bootstrap replicates, default 1000.
    seed (int): seed of the resampling, default 0.
Returns:
    dict: `teacher_text`, `student_text`, `student_speech`, `gap`, `text_gap` as fractions in [0, 1]
    (gaps in [-1, 1]), `n` (items), `ci95` ({measure: [lo, hi]} for those five).
Examples:
    >>> metric = evaluate.load("eval/metrics/salad_gap", keep_in_memory=True)
    >>> r = metric.compute(teacher_text=[1, 1, 0, 1], student_text=[1, 1, 0, 1], student_speech=[1, 0, 0, 1])
    >>> r["gap"]
    0.25
"""


def measures(correct: np.ndarray) -> np.ndarray:
    """(..., n, 3) correctness -> (..., 5): three accuracies, gap, text_gap."""
    acc = correct.mean(axis=-2)
    teacher, student_text, student_speech = acc[..., 0], acc[..., 1], acc[..., 2]
    return np.stack([teacher, student_text, student_speech, teacher - student_speech, teacher - student_text], -1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SaladGap(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Closing the Gap Between Text and Speech Understanding in LLMs, arXiv 2510.13632",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({mode: datasets.Value("int32") for mode in MODES}),
        )

    def _compute(self, teacher_text, student_text, student_speech, n_bootstrap: int = 1000, seed: int = 0) -> dict:
        correct = np.stack([np.asarray(teacher_text), np.asarray(student_text), np.asarray(student_speech)], -1)
        n = len(correct)
        if n == 0:
            raise ValueError("salad_gap: no items")
        bad = sorted(set(np.unique(correct).tolist()) - {0, 1})
        if bad:
            raise ValueError(f"salad_gap: correctness must be 0 or 1, got {bad}")
        if n_bootstrap < 1:
            raise ValueError(f"salad_gap: n_bootstrap must be >= 1, got {n_bootstrap}")
        rng = np.random.default_rng(seed)
        replicates = np.concatenate([
            measures(correct[rng.integers(0, n, size=(min(CHUNK, n_bootstrap - start), n))])
            for start in range(0, n_bootstrap, CHUNK)
        ])
        point = measures(correct.astype(np.float64))
        lo, hi = np.percentile(replicates, [2.5, 97.5], axis=0)
        out = {name: float(v) for name, v in zip(MEASURES, point, strict=True)}
        out["n"] = n
        out["ci95"] = {name: [float(a), float(b)] for name, a, b in zip(MEASURES, lo, hi, strict=True)}
        return out
