"""The README is a user's guide that runs as written: every module its commands start answers ``--help``, and
nothing points to notes a clone does not have."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
CODE = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", README, re.S))
MODULES = sorted({m.group(1) or m.group(2) for m in re.finditer(r"python -m ([\w.]+)|--module ([\w.]+)", CODE)})


def test_the_readme_commands_name_the_modules_users_run():
    assert {"train", "eval", "selection", "bench.kd_loss", "bench.mcq", "model.infer"} <= set(MODULES), MODULES


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_every_module_in_the_readme_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


def test_the_first_screen_has_the_two_commands_and_the_result():
    first = "\n".join(README.splitlines()[:60])
    assert "./run.sh test" in first and re.search(r"^\./run\.sh ", first, re.M)
    assert "| task |" in first and "gap" in first


def test_nothing_points_to_notes_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [f for f in tracked.split() if f.endswith((".py", ".md", ".sh", ".yaml")) and not f.startswith("tests/")]
    assert not [f for f in files if "../shared" in (REPO / f).read_text(errors="ignore")]


def test_benches_run_as_modules_everywhere():
    """Running a file under bench/ as a script puts bench/ first on sys.path, where bench/shards.py hides the
    shards package."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    script_runs = re.compile(r'(?:python[\w.]*|\$PY"?|sys\.executable,)\s*"?(bench/\w+\.py)')
    found = [(f, m.group(1)) for f in tracked.split() if f.endswith((".py", ".md", ".sh", ".yaml"))
             for m in script_runs.finditer((REPO / f).read_text(errors="ignore"))]
    assert not found, found
