"""The tiny workflow through a real single-node Slurm with Snakemake's Slurm executor plugin.

tests/slurm/setup_slurm.sh installs (Debian's slurm-wlm + munge) and starts slurmctld/slurmd/munged
when they are not running; the test skips with the reason when Slurm cannot start here (no root,
no package access). Every non-local job must have been submitted with sbatch and completed as a Slurm
job (Slurm's job-completion log), and the bundles must equal a local build's, file for file (sha256).
"""

import json
import os
import re
import subprocess

import pytest

from conftest import REPO, copy_workflow, run_snakemake

pytestmark = pytest.mark.slurm

SLURM_FLAGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]
JOBCOMP = "/var/log/slurm/jobcomp.log"


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm needs root (to install and run slurmctld/slurmd/munged)")
    proc = subprocess.run(["bash", str(REPO / "tests/slurm/setup_slurm.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"Slurm cannot start here: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    yield
    subprocess.run(["bash", str(REPO / "tests/slurm/teardown_slurm.sh")], check=False)


def _files(dist):
    manifest = json.loads((dist / "MANIFEST.json").read_text())
    return {name: rec["sha256"] for name, rec in manifest["files"].items()}


def test_tiny_workflow_on_slurm_equals_local_build(slurm, tmp_path):
    (tmp_path / "local").mkdir()
    local = copy_workflow(tmp_path / "local")
    run_snakemake(local, "--configfile", "config/tiny.yaml")

    remote_dir = tmp_path / "slurm"
    remote_dir.mkdir()
    remote = copy_workflow(remote_dir)
    proc = run_snakemake(remote, "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml", *SLURM_FLAGS)
    out = proc.stdout + proc.stderr
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", out)
    done, total = map(int, re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)[-1])
    assert done == total
    local_jobs = len(re.findall(r"^localrule \w+:", out, re.M))
    assert local_jobs == 1  # rule all
    assert len(submitted) == total - local_jobs > 0  # includes the shard jobs added by the checkpoint
    slurm_ids = {int(s) for _, s, _ in submitted}
    completed = {
        int(m.group(1))
        for m in re.finditer(r"JobId=(\d+) .*?JobState=COMPLETED .*?WorkDir=(\S+)", open(JOBCOMP).read())
        if m.group(2) == str(remote)
    }
    assert slurm_ids <= completed, f"not completed as Slurm jobs: {sorted(slurm_ids - completed)}"

    for quant in ("q0f16", "q4f16_0"):
        name = f"tiny-neox-ja-{quant}"
        assert _files(remote / "dist" / name) == _files(local / "dist" / name)

    again = run_snakemake(remote, "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml", *SLURM_FLAGS, "-n")
    assert "Nothing to be done" in again.stdout
