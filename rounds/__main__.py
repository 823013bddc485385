"""The rounds of an experiment, and the ablation: what ``./run.sh`` runs once it has set up.

    python -m rounds [CONFIG] [key=value ...]
    python -m rounds ablation [CONFIG] [--seeds 0,1,2] [key=value ...]

Rounds: round 0 = stage-I training and eval; round r >= 1 = selection, stage-II training, eval; then the report.
With ``train.monitor`` on, each round's selection and eval figures go to the run's monitor once its eval is new
(``train/monitor.py``).
Every job skips what it finished, so a killed run continues where it stopped. Jobs run under a launcher:
``SALAD_LAUNCH`` (default ``python -m``), e.g. ``torchrun --standalone --nproc_per_node 8 -m`` or
``deepspeed --hostfile hosts --num_gpus 8 --module``; ``SALAD_EVAL_LAUNCH`` overrides it for eval alone. Without
either, on a machine without GPUs, eval runs one process per core (at most 8; items split across ranks): its many
small per-item passes keep one core busy each, where one process with several threads does not.

The ablation runs, per seed (default: the config's), the rounds of ``<name>-s<seed>`` (active selection), then of
``<name>-s<seed>-uniform`` (gamma 0) and ``-natural`` (no selection: the same steps on natural speech) from the
active run's round 0 (hard links: the same stage-I student, its pool embeddings and spoken benchmarks), then the
side-by-side table ``runs/<name>-ablation.{json,md}`` (``eval.compare``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from config import ConfigError, split_overrides
from model.card import write_model_card
from rounds.experiment import ExperimentConfig, load_experiment
from train.layout import RunFolder
from train.monitor import log_round

DEFAULT_CONFIG = "configs/toy.yaml"
STAGE_I_PARTS = ("round-0", "pool_embeddings", "spoken")   # what an ablation variant shares with the active run


def log(message: str) -> None:
    print(f"\033[1m[run.sh]\033[0m {message}", file=sys.stderr, flush=True)


class UsageError(ValueError):
    """A bad command line: the message says what was expected (exit status 2)."""


def launcher(env: str, default: list[str]) -> list[str]:
    """The command a job module is appended to: the variable's words, or ``default``."""
    value = os.environ.get(env, "").strip()
    return shlex.split(value) if value else default


def eval_launcher() -> list[str]:
    """SALAD_EVAL_LAUNCH, else SALAD_LAUNCH, else one eval process per core (at most 8) on a machine without
    GPUs, else ``python -m``."""
    plain = [sys.executable, "-m"]
    for env in ("SALAD_EVAL_LAUNCH", "SALAD_LAUNCH"):
        if os.environ.get(env, "").strip():
            return launcher(env, plain)
    cores = min(os.cpu_count() or 1, 8)
    if shutil.which("nvidia-smi") or cores < 2:
        return plain
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cores), "-m"]


def run_job(command: list[str], module: str, config: str, overrides: list[str], round_: int | None = None) -> None:
    args = [*command, module, "--config", config, *([] if round_ is None else ["--round", str(round_)]), *overrides]
    done = subprocess.run(args, check=False)
    if done.returncode:
        raise SystemExit(done.returncode)


def run_rounds(config: str, overrides: list[str], cfg: ExperimentConfig) -> None:
    """Rounds 0..cfg.rounds, then the report."""
    jobs = launcher("SALAD_LAUNCH", [sys.executable, "-m"])
    evals = eval_launcher()
    run = cfg.run.folder()
    for r in range(cfg.rounds + 1):
        if r > 0:
            log(f"round {r}: selection")
            run_job(jobs, "selection", config, overrides, r)
        log(f"round {r}: training")
        run_job(jobs, "train", config, overrides, r)
        log(f"round {r}: evaluation")
        logged = run.eval_json(r).is_file()   # an eval of an earlier invocation: its figures are logged already
        run_job(evals, "eval", config, overrides, r)
        if not logged:
            log_round(cfg, r)
        if run.export(r).is_dir():   # the model card gets the round's eval table
            write_model_card(run.export(r))
    run_job([sys.executable, "-m"], "eval.report", config, overrides)


def link_copy(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` as hard links, unless ``target`` exists (files are replaced by rename,
    never written in place, so the copies stay independent); a killed copy leaves only a temp folder, removed on
    the next try."""
    if target.exists():
        return
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(source, partial, copy_function=os.link)
    except OSError:   # another file system, or no hard links there
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
    partial.rename(target)


def reuse_stage_one(source: RunFolder, target: RunFolder) -> None:
    """An ablation variant starts from the active run's round 0 (the same stage-I student) and its caches (pool
    embeddings, spoken benchmarks); not its data.yaml, which lists the active run's selected speech."""
    if not source.trained(0).is_file() or not source.eval_json(0).is_file():
        log(f"{source.round(0)} is not complete: cannot start {target.root} from it")
        raise SystemExit(1)
    target.root.mkdir(parents=True, exist_ok=True)
    for part in STAGE_I_PARTS:
        if (source.root / part).is_dir():
            link_copy(source.root / part, target.root / part)


def run_ablation(config: str, overrides: list[str], seeds: list[int] | None) -> int:
    """Every variant's rounds for every seed, then eval.compare's table; its exit status."""
    cfg = load_experiment(config, overrides)
    runs = []
    for seed in seeds if seeds is not None else [cfg.seed]:
        base = f"{cfg.run.name}-s{seed}"
        variants = [("active", base), ("uniform", f"{base}-uniform"), ("natural", f"{base}-natural")]
        for strategy, name in variants:
            log(f"ablation, seed {seed}: {strategy} ({Path(cfg.run.dir) / name}"
                + ("" if strategy == "active" else f", from {base}'s round 0") + ")")
            if strategy != "active":
                reuse_stage_one(RunFolder(Path(cfg.run.dir) / base), RunFolder(Path(cfg.run.dir) / name))
            variant = [*overrides, f"seed={seed}", f"run.name={name}", f"selection.strategy={strategy}"]
            run_rounds(config, variant, load_experiment(config, variant))
            runs.append(str(Path(cfg.run.dir) / name))
    out = Path(cfg.run.dir) / f"{cfg.run.name}-ablation"
    return subprocess.run([sys.executable, "-m", "eval.compare", *runs, "--out", str(out),
                           "--natural-tasks", ",".join(cfg.eval.natural_tasks)], check=False).returncode


def parse_seeds(text: str) -> list[int]:
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", text):
        raise UsageError(f"--seeds '{text}': expected seeds separated by commas, e.g. --seeds 0,1,2")
    return [int(s) for s in text.split(",")]


def parse(argv: list[str]) -> tuple[str, str, list[str], list[int] | None]:
    """(command, config, overrides, seeds) from the command line."""
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        raise SystemExit(0)
    command = "ablation" if argv[:1] == ["ablation"] else "rounds"
    args = argv[1:] if command == "ablation" else argv
    config, seeds = DEFAULT_CONFIG, None
    if args and "=" not in args[0] and not args[0].startswith("-"):
        config, args = args[0], args[1:]
    rest, overrides = split_overrides(args)
    while rest:
        arg = rest.pop(0)
        if command == "ablation" and arg == "--seeds":
            seeds = parse_seeds(rest.pop(0) if rest else "")
        elif command == "ablation" and arg.startswith("--seeds="):
            seeds = parse_seeds(arg.removeprefix("--seeds="))
        else:
            usage = "./run.sh ablation [CONFIG] [--seeds 0,1,2] [key=value...]" if command == "ablation" else \
                "./run.sh [CONFIG] [key=value...]"
            raise UsageError(f"{command}: unexpected argument '{arg}' (usage: {usage})")
    if not Path(config).is_file():
        raise UsageError(f"config {config} not found (the toy default is not built yet: try ./run.sh "
                         "configs/smoke.yaml)")
    return command, config, overrides, seeds


def main(argv: list[str] | None = None) -> int:
    try:
        command, config, overrides, seeds = parse(sys.argv[1:] if argv is None else argv)
        if command == "ablation":
            return run_ablation(config, overrides, seeds)
        run_rounds(config, overrides, load_experiment(config, overrides))
    except (UsageError, ConfigError) as exc:
        log(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
