"""Student/teacher layouts: every aligned pair predicts the same token; packing; span sampling."""

import numpy as np
import pytest
import torch

from config import ConfigError, from_dict
from model.inputs import (
    SPEECH,
    TEXT,
    Document,
    InputsConfig,
    Layout,
    Span,
    interleave,
    pack,
    pieces,
    text_document,
)
from shards.format import Chunk, Segment

SR = 1000  # samples per second in these hand-built documents


def vectors_for(samples: int) -> int:
    return -(-samples // 250)  # 4 vectors per second of audio


def student_tokens(batch, layout):
    """Student grid with token ids at text positions, -2 at boundaries, -3 at vectors, -1 at padding."""
    grid = torch.full((batch.rows, layout.student_len), -1)
    grid[layout.text_row, layout.text_pos] = layout.text_token
    grid[layout.span_row, layout.begin_pos] = -2
    grid[layout.span_row[: len(layout.end_pos)], layout.end_pos] = -2
    grid[layout.vector_row, layout.vector_pos] = -3
    return grid


def hand_docs():
    audio = lambda s: np.zeros(int(s * SR), dtype=np.float32)  # noqa: E731
    return [
        Document([Span(TEXT, [5, 6, 7]), Span(SPEECH, [8, 9], audio(1.0)), Span(TEXT, [10, 11])]),
        Document([Span(SPEECH, [12, 13, 14], audio(0.5)), Span(TEXT, [15]), Span(SPEECH, [16], audio(0.25))]),
        Document([Span(TEXT, [17, 18, 19, 20])]),
    ]


@pytest.mark.parametrize("bos", [None, 1])
def test_every_mapped_pair_predicts_the_same_token(bos):
    docs = hand_docs()
    batch = pack(docs, vectors_for, context=64, bos_id=bos)
    vectors = torch.tensor([vectors_for(int(n)) for n in batch.wave_lengths])
    layout = Layout.build(batch, vectors)
    grid = student_tokens(batch, layout)
    r, s, t = layout.map_row, layout.map_student, layout.map_teacher
    assert torch.equal(layout.teacher_ids[r, t + 1], layout.map_target)
    assert torch.equal(grid[r, s + 1], layout.map_target)
    # every text token but each document's first (when nothing precedes it) is a target
    expected = [5, 6, 7, 10, 11, 15, 17, 18, 19, 20]
    if bos is None:
        expected = [6, 7, 10, 11, 15, 18, 19, 20]
    assert sorted(layout.map_target.tolist()) == expected
    # the token after a speech span is predicted from its end boundary, against the transcript's last token
    i = layout.map_target.tolist().index(10)
    assert grid[r[i], s[i]] == -2 and layout.teacher_ids[r[i], t[i]] == 9
    # all three documents fit one row; the teacher row is the concatenated text
    assert batch.rows == 1
    teacher = layout.teacher_ids[0, layout.teacher_mask[0]].tolist()
    body = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert [x for x in teacher if x != bos] == body
    # speech spans: begin, n vectors, end; n = 4 per second
    assert (grid == -3).sum() == 4 + 2 + 1
    assert int(layout.student_mask.sum()) == (grid != -1).sum()


def test_without_end_markers_the_last_vector_predicts_the_next_text():
    batch = pack(hand_docs(), vectors_for, context=64, bos_id=1)
    vectors = torch.tensor([vectors_for(int(n)) for n in batch.wave_lengths])
    marked, bare = Layout.build(batch, vectors), Layout.build(batch, vectors, end_marker=False)
    assert bare.end_pos.numel() == 0 and bare.student_len == marked.student_len - 3      # one position per span
    grid = student_tokens(batch, bare)
    r, s, t = bare.map_row, bare.map_student, bare.map_teacher
    assert torch.equal(grid[r, s + 1], bare.map_target) and torch.equal(t, marked.map_teacher)
    i = bare.map_target.tolist().index(10)          # after "[begin] 4 vectors": the 4th vector predicts 10
    assert grid[r[i], s[i]] == -3 and s[i] == bare.begin_pos[0] + 4 and bare.teacher_ids[r[i], t[i]] == 9


def test_packing_respects_context_and_compressed_vectors():
    docs = hand_docs() * 3
    batch = pack(docs, vectors_for, context=16, bos_id=None)
    full = Layout.build(batch, torch.tensor([vectors_for(int(n)) for n in batch.wave_lengths]))
    assert batch.rows > 1 and full.student_len <= 16 and full.teacher_len <= 16
    # fewer vectors than planned (compression): positions shift, pairs stay aligned
    fewer = torch.ones(batch.num_speech, dtype=torch.long)
    layout = Layout.build(batch, fewer)
    grid = student_tokens(batch, layout)
    assert torch.equal(grid[layout.map_row, layout.map_student + 1], layout.map_target)
    assert torch.equal(layout.teacher_ids[layout.map_row, layout.map_teacher + 1], layout.map_target)
    assert layout.student_len < full.student_len


def test_long_document_is_cut_into_pieces_never_dropped():
    """A document longer than the context is packed as pieces cut between spans (a text span longer than the
    context alone between tokens): every token is trained on. Before, everything past the first overflow was
    dropped, and a span that alone overflowed took the whole document with it."""
    doc = Document([Span(TEXT, list(range(2, 12))), Span(TEXT, list(range(12, 30)))], key="k")
    cut = pieces(doc, vectors_for, context=16, bos=False)
    assert [d.key for d in cut] == ["k", "k#1", "k#2"] and [len(d.spans[0].ids) for d in cut] == [10, 16, 2]
    assert [t for d in cut for s in d.spans for t in s.ids] == list(range(2, 30))
    batch = pack([doc], vectors_for, context=16, bos_id=None)   # the short last piece joins the first row
    assert sorted(batch.unit_token.tolist()) == list(range(2, 30)) and batch.rows == 2
    audio = lambda s: np.zeros(int(s * SR), dtype=np.float32)  # noqa: E731
    spoken = Document([Span(TEXT, [5, 6]), Span(SPEECH, [7, 8], audio(2.0)), Span(TEXT, [9, 10, 11]),
                       Span(SPEECH, [12], audio(60.0)),   # 240 vectors: more than the context on its own
                       Span(SPEECH, [13, 14], audio(1.0)), Span(TEXT, [15, 16])], key="s")
    batch = pack([spoken], vectors_for, context=16, bos_id=1)
    assert sorted(batch.span_tokens.tolist()) == [7, 8, 13, 14] and batch.num_speech == 2   # the long one left out
    assert sorted(t for t in batch.unit_token.tolist() if t > 1) == [5, 6, 9, 10, 11, 15, 16]
    assert batch.layout.student_len <= 16 and batch.layout.teacher_len <= 16


def test_a_long_text_document_keeps_every_word(tokenizer):
    words = ("the quick brown fox jumps over the lazy dog near the river " * 90).split()   # 990 words
    doc = text_document(Chunk("k", "doc", segments=[Segment(" ".join(words))]), tokenizer)
    whole = tokenizer.encode(" ".join(words), add_special_tokens=False)
    assert [t for span in doc.spans for t in span.ids] == whole   # spans of <= 64 words: the same tokens
    cut = pieces(doc, lambda n: 0, context=128, bos=True)
    assert [t for d in cut for s in d.spans for t in s.ids] == whole and len(cut) > 5
    assert all(max(d.lengths(lambda n: 0, True)) <= 128 for d in cut)
    batch = pack([doc], lambda n: 0, context=128, bos_id=0)
    assert len(batch.unit_token) == len(whole) + len(cut)   # every token, and a BOS per piece


def test_an_empty_pack_is_an_empty_batch():
    batch = pack([], vectors_for, context=16, bos_id=1)
    assert batch.rows == 0 and batch.layout.student_len == 0 and batch.layout.map_row.numel() == 0


def chunk_with_words(tokenizer):
    words = "the cat sat on the mat and looked at the red ball near the river".split()
    timed = [(w, 0.3 * i, 0.3 * i + 0.25) for i, w in enumerate(words)]
    audio = np.random.default_rng(0).standard_normal(int(0.3 * len(words) * SR)).astype(np.float32)
    return Chunk("k", "doc", segments=[Segment(" ".join(words), audio, SR, timed)]), words


def test_interleave_word_level_spans(tokenizer):
    chunk, words = chunk_with_words(tokenizer)
    cfg = InputsConfig(text_words=[2, 3], speech_words=[2, 3], word_margin_s=0.0)
    doc = interleave(chunk, tokenizer, cfg, np.random.default_rng(1))
    kinds = [s.kind for s in doc.spans]
    assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)), "spans must alternate"
    assert TEXT in kinds and SPEECH in kinds
    # the teacher's text is the document's text, token for token
    teacher = [t for s in doc.spans for t in s.ids]
    assert tokenizer.decode(teacher) == " ".join(words)
    for span in doc.spans:
        if span.kind == SPEECH:
            n_words = len(tokenizer.decode(span.ids).split())
            assert 2 <= n_words <= 4 and len(span.audio) == pytest.approx((n_words - 1) * 0.3 * SR + 250, abs=2)
    # deterministic for a seed, different for another
    again = interleave(chunk, tokenizer, cfg, np.random.default_rng(1))
    assert [s.ids for s in again.spans] == [s.ids for s in doc.spans]


def test_interleave_segment_level_and_text_only(tokenizer):
    segs = [Segment(f"alice met bob number {i}", np.ones(500, np.float32), SR) for i in range(6)]
    segs.append(Segment("a text line with no audio"))
    chunk = Chunk("k", "doc", segments=segs)
    doc = interleave(chunk, tokenizer, InputsConfig(text_words=[4, 4], speech_words=[4, 4]),
                     np.random.default_rng(0))
    speech = [s for s in doc.spans if s.kind == SPEECH]
    assert speech and all(len(s.audio) % 500 == 0 for s in speech)
    assert doc.spans[-1].kind == TEXT and tokenizer.decode(doc.spans[-1].ids).endswith("no audio")
    only = text_document(chunk, tokenizer)
    assert [s.kind for s in only.spans] == [TEXT]


@pytest.mark.parametrize("prob, first", [(1.0, SPEECH), (0.0, TEXT)])
def test_speech_first_prob_sets_the_first_span(tokenizer, prob, first):
    chunk, _ = chunk_with_words(tokenizer)
    cfg = InputsConfig(text_words=[2, 3], speech_words=[2, 3], speech_first_prob=prob)
    for seed in range(5):
        assert interleave(chunk, tokenizer, cfg, np.random.default_rng(seed)).spans[0].kind == first


def test_inputs_config_validation():
    with pytest.raises(ConfigError, match="^text_words:"):
        from_dict(InputsConfig, {"text_words": [5, 2]})
