"""Shared fixtures: a tiny tokenizer and LM built offline once per session."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

CORPUS = [
    "the cat sat on the mat and looked at the red ball",
    "a dog ran to the park with seven friends from the city",
    "numbers one two three four five six seven eight nine ten",
    "the quick brown fox jumps over the lazy dog near the river",
    "alice met bob in paris and they ate bread with cheese",
] * 4


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder with a saved tiny Qwen2-style LM and its BPE tokenizer."""
    from toy.tiny import tiny_llm, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_llm")
    tokenizer = train_tokenizer(CORPUS, out, vocab_size=300)
    tiny_llm(tokenizer, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A job called in-process (selection's ``select``, eval's ``main``) joins a one-rank process group; the next
    test starts without one (a forked worker inheriting it crashes, and helpers would take it for a job's group)."""
    yield
    from train import distributed

    distributed.finish()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its ranks in their own sessions, so
    killing the launcher's process group alone would leave them running)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
