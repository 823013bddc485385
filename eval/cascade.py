"""The cascade reference: the student's own CTC path as the recogniser, the teacher as the reader.

The paper sets SALAD beside an ASR + LLM cascade. A student with a CTC head carries its own recogniser:
every spoken context is greedy-decoded (``SpeechLM.transcribe``) to LLM tokens, turned into text, and the
teacher scores the k-shot prompt built from those words exactly as in teacher_text (``eval.mcq.CASCADE``).
The examples' contexts are decoded too, since student_speech hears them as well. Cascade minus
student_speech is what the adapter's continuous vectors lose (or gain) beyond recognising the words; the
word error rate of the decoded contexts against the benchmark's text says how well they were recognised.
"""

from __future__ import annotations

import jiwer
import torch

from eval.mcq import CASCADE
from model.speech_lm import AdapterOutput, SpeechLM

# The words a word error rate compares: lower case, punctuation dropped (a word-level tokenizer decodes
# "rome." as "rome ."), single spaces.
WORDS = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                       jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])


def has_ctc_head(model: SpeechLM, ctc_weight: float) -> bool:
    """Whether the student's CTC path over the LLM's vocabulary means anything: trained by the alignment
    loss (``loss.ctc_weight > 0``) or used to compress its inputs (the export's ``adapter.compress: ctc``).
    Every SpeechLM can decode, but an untrained path decodes noise."""
    return ctc_weight > 0 or model.adapter.cfg.compress == "ctc"


@torch.no_grad()
def transcribe_contexts(model: SpeechLM, tokenizer, encoded: dict[str, AdapterOutput]) -> dict[str, str]:
    """Item id -> its spoken context decoded to text, from its adapter outputs (``eval.mcq.encode_contexts``:
    each utterance encoded alone, so its words never depend on the rank or the batch it falls in)."""
    return {key: tokenizer.decode(model.decode(out)[0], skip_special_tokens=True).strip()
            for key, out in encoded.items()}


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) of one utterance; summed over a task, their ratio is its WER."""
    m = jiwer.process_words(reference, hypothesis, reference_transform=WORDS, hypothesis_transform=WORDS)
    return m.substitutions + m.deletions + m.insertions, m.substitutions + m.deletions + m.hits


def summarise(rows: list[dict[str, int]]) -> dict[str, float]:
    """Accuracy and word error rate of a task from its items' rows (CASCADE, "errors", "words"): integer
    sums, so every split of the items across ranks gives the same bits."""
    words = sum(r["words"] for r in rows)
    return {"accuracy": sum(r[CASCADE] for r in rows) / len(rows),
            "wer": sum(r["errors"] for r in rows) / max(1, words)}
