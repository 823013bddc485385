"""The one process-group module: nothing else calls torch.distributed, and its helpers work across ranks.

Why the scan: gloo (CPU, CI) accepts CPU tensors in collectives, NCCL (every GPU cluster) refuses them, so a
collective called directly on a CPU tensor passes every CPU test and stops a GPU run at its first step. The
helpers in ``train.distributed`` send each tensor through the group of its own device.
"""

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import _get_default_group

from train import distributed
from train.distributed import free_port, launcher_ranks

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {"train/distributed.py"}
SCANNED = ("train", "model", "shards", "eval", "selection", "toy", "bench")


def torch_distributed_uses(source: str) -> list[str]:
    """Where a module imports or names ``torch.distributed`` (other than its launcher, ``torch.distributed.run``,
    which starts processes and joins no group)."""
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            uses += [f"line {node.lineno}: import {a.name}" for a in node.names
                     if a.name.startswith("torch.distributed") and a.name != "torch.distributed.run"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") and node.module != "torch.distributed.run" \
                    or node.module == "torch" and any(a.name == "distributed" for a in node.names):
                uses.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" \
                and isinstance(node.value, ast.Name) and node.value.id == "torch":
            uses.append(f"line {node.lineno}: torch.distributed")
    return uses


def test_scan_finds_every_way_to_reach_torch_distributed():
    found = torch_distributed_uses("import torch.distributed as dist\nfrom torch import distributed\n"
                                   "from torch.distributed import all_reduce\nimport torch\n"
                                   "torch.distributed.barrier()\n")
    assert len(found) == 4, found
    assert torch_distributed_uses("import torch\nx = torch.zeros(2)\ncmd = 'python -m torch.distributed.run'\n") == []


def test_no_module_but_train_distributed_calls_torch_distributed():
    offenders = {}
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            uses = torch_distributed_uses(path.read_text())
            if uses and rel not in ALLOWED:
                offenders[rel] = uses
    assert not offenders, f"call train.distributed's helpers instead: {offenders}"
    assert torch_distributed_uses((REPO / "train/distributed.py").read_text())   # the scan does see it


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8, 3)),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (5, 8, 1)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, (2, 4, 0)),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}, (7, 16, 3)),
])
def test_launcher_ranks_without_joining(env, expected):
    assert launcher_ranks(env) == expected


def test_one_rank_without_a_group_leaves_values_alone():
    assert not distributed.active() and distributed.world() == 1 and distributed.rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.gather_lists([1, 2]) == [1, 2]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()   # no group: returns at once


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    got = {"join": distributed.join(timeout_minutes=1)}
    got["join_again"] = distributed.join(timeout_minutes=1)   # idempotent
    # the configured timeout reached the group
    got["timeout_s"] = _get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    counts = torch.tensor([rank + 1.0, 10.0 * rank])
    got["sum"] = distributed.all_reduce(counts.clone()).tolist()
    got["max"] = distributed.all_reduce(counts.clone(), "max").tolist()
    got["min"] = distributed.all_reduce(counts.clone(), "min").tolist()
    got["int_max"] = int(distributed.all_reduce(torch.tensor(3 + 4 * rank), "max"))
    got["objects"] = distributed.all_gather_object({"rank": rank})
    got["lists"] = distributed.gather_lists([rank] * (rank + 1))
    got["broadcast"] = distributed.broadcast_object(f"from {rank}", src=1)
    distributed.barrier()
    got["world"] = (distributed.rank(), distributed.world())
    distributed.finish()
    got["after_finish"] = (distributed.active(), distributed.world())
    Path(out, f"{rank}.json").write_text(json.dumps(got))


def test_helpers_on_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank, g in enumerate(got):
        assert g["join"] == g["join_again"] == [rank, 2] and g["timeout_s"] == 60
        assert g["sum"] == [3.0, 10.0] and g["max"] == [2.0, 10.0] and g["min"] == [1.0, 0.0]
        assert g["int_max"] == 7
        assert g["objects"] == [{"rank": 0}, {"rank": 1}]
        assert g["lists"] == [0, 1, 1]
        assert g["broadcast"] == "from 1"
        assert g["world"] == [rank, 2]
        assert g["after_finish"] == [False, 1]
