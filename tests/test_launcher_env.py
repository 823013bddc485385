"""Which rank a process is, whichever launcher started it (torchrun/deepspeed, mpirun, srun, none)."""

import pytest

from train.distributed import rank_env


def test_torchrun_and_deepspeed_ranks_are_left_alone():
    assert rank_env({"RANK": "3", "WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}) == {}


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, ("5", "8", "1")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, ("2", "4", "0")),
    ({"SLURM_PROCID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}, ("7", "16", "3")),
])
def test_mpi_and_slurm_ranks_join_one_world(env, expected):
    got = rank_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"})
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == expected
    assert got["MASTER_PORT"] == "29555"


def test_mpi_launch_without_master_addr_says_what_to_export():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rank_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_no_launcher_is_a_one_rank_world_on_a_free_port():
    got = rank_env({})
    assert (got["RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(got["MASTER_PORT"]) < 65536
