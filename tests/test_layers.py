"""Layers point one way: each package imports only the packages below it.

    config  <  shards  <  model  <  train  <  eval, selection  <  rounds, toy

``config`` (YAML into typed dataclasses) imports nothing of the project and no torch, so every layer can use
it and reading a config is quick. A module's command line (``__main__.py``, or a function ``main``) composes
the layers and may import any of them: ``python -m train`` reads the experiment config that ``rounds`` composes.
"""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BELOW = {
    "config": set(),
    "shards": {"config"},
    "model": {"config", "shards"},
    "train": {"config", "shards", "model"},
    "eval": {"config", "shards", "model", "train"},
    "selection": {"config", "shards", "model", "train"},
    "rounds": {"config", "shards", "model", "train", "eval", "selection"},
    "toy": {"config", "shards", "model", "train", "eval", "selection"},
}


def imported_packages(source: str) -> dict[str, int]:
    """Project packages a module's library code imports (not its command line), with a line of each."""
    tree = ast.parse(source)
    skip = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main" for n in ast.walk(f)}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in BELOW:
                found.setdefault(top, node.lineno)
    return found


def test_the_scan_sees_imports_at_any_depth_and_leaves_command_lines_alone():
    source = ("import torch\nfrom train.engine import x\n\ndef f():\n    import eval.mcq\n\n"
              "def main():\n    from rounds.experiment import parse_job\n")
    assert imported_packages(source) == {"train": 2, "eval": 5}


def test_a_model_module_importing_train_is_refused(tmp_path):
    assert not BELOW["model"] >= set(imported_packages("from train.config import require\n"))


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for package, allowed in BELOW.items():
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            for other, line in imported_packages(path.read_text()).items():
                if other != package and other not in allowed:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_loading_a_config_imports_no_torch():
    code = ("import sys, config\n"
            "heavy = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]\n"
            "print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
