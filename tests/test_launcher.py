"""What the launcher's environment says about this process: rank and world size, and the job's name."""

from __future__ import annotations

import pytest

from capfilt.launcher import Rank, current_rank, job_label

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CAPFILT_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
                 "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_no_launcher_is_one_process():
    assert current_rank() == Rank(0, 1)


def test_an_sbatch_script_is_one_process_whatever_the_allocations_task_count(monkeypatch):
    """`sbatch --ntasks 4` runs its script once, with SLURM_NTASKS=4 and SLURM_PROCID=0: a process that took
    itself for one of 4 would refuse --overwrite and label its log lines [rank 0/4]."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert current_rank() == Rank(0, 1)


def test_an_srun_step_is_as_many_processes_as_the_step_has_tasks(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the allocation's
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # this step's
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert current_rank() == Rank(2, 4)
    monkeypatch.setenv("RANK", "5")  # torchrun under srun: torchrun's ranks count
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert current_rank() == Rank(5, 16)


def test_the_job_label_names_the_job_as_its_launcher_does(monkeypatch):
    assert job_label() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: names nothing
    assert job_label() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert job_label() == "torchrun abc"
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert job_label() == "slurm 1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert job_label() == "slurm 1200_7"
    monkeypatch.setenv("CAPFILT_JOB_ID", "mine")
    assert job_label() == "mine"
