"""The tiny workflow through a real single-node Slurm with Snakemake's Slurm executor plugin.

tests/slurm/setup_slurm.sh installs (Debian's slurm-wlm + munge) and starts slurmctld/slurmd/munged
when they are not running; the test skips with the reason when Slurm cannot start here (no root,
no package access). During the run one compile job is cancelled through Slurm, as a cluster kills a
job over its memory or time limit: Snakemake must report it with its rule and log, retry it with
twice the memory, and finish. Every other non-local job must have been submitted with sbatch and
completed as a Slurm job (Slurm's job-completion log), the bundles must equal a local build's, file
for file (sha256), and a rerun must find nothing to do.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

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


def _run_cancelling_one(workdir, rule, *args):
    """Run Snakemake and, the first time a job of ``rule`` is running on Slurm, ``scancel`` it:
    what a cluster does to a job over its memory or time limit. Returns (output, cancelled id)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "-d", str(workdir), "-c2", *args]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks, cancelled = [], None
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        if cancelled is None:
            running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True).stdout
            for line in running.splitlines():
                job_id, _, comment = line.partition(" ")
                if comment.startswith(f"rule_{rule}"):
                    subprocess.run(["scancel", job_id], check=True)
                    cancelled = int(job_id)
                    break
        time.sleep(0.5)
    reader.join()
    assert proc.returncode == 0, "".join(chunks)[-4000:]
    return "".join(chunks), cancelled


def test_tiny_workflow_on_slurm_equals_local_build(slurm, tmp_path):
    (tmp_path / "local").mkdir()
    local = copy_workflow(tmp_path / "local")
    run_snakemake(local, "--configfile", "config/tiny.yaml")

    remote_dir = tmp_path / "slurm"
    remote_dir.mkdir()
    remote = copy_workflow(remote_dir)
    out, killed = _run_cancelling_one(remote, "compile", "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml", *SLURM_FLAGS)

    # the killed job is reported with its rule and log, then retried with twice the memory
    assert killed is not None, "no compile job was seen running on Slurm"
    report = out[out.index("Error in rule compile:") :]
    assert re.search(r"log: logs/tiny-neox-ja/\S+/compile_\S+\.log", report.split("\n\n")[0])
    assert "Trying to restart job" in out
    assert "mem_mb=16000" in out  # compile's 8000 MB × attempt 2 (rules/common.smk per_attempt)

    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", out)
    done, total = map(int, re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)[-1])
    assert done == total
    local_jobs = len(re.findall(r"^localrule \w+:", out, re.M))
    assert local_jobs == 1  # rule all
    # every job once, plus the retry of the killed one (shard jobs were added by the checkpoint)
    assert len(submitted) == total - local_jobs + 1 > 1
    slurm_ids = {int(s) for _, s, _ in submitted}
    states = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r"JobId=(\d+) .*?JobState=(\w+) .*?WorkDir=(\S+)", open(JOBCOMP).read())
        if m.group(3) == str(remote)
    }
    assert states.get(killed) == "CANCELLED"
    not_completed = sorted(j for j in slurm_ids - {killed} if states.get(j) != "COMPLETED")
    assert not not_completed, f"not completed as Slurm jobs: {not_completed}"

    for quant in ("q0f16", "q4f16_0"):
        name = f"tiny-neox-ja-{quant}"
        assert _files(remote / "dist" / name) == _files(local / "dist" / name)

    again = run_snakemake(remote, "--profile", "profiles/slurm", "--configfile", "config/tiny.yaml", *SLURM_FLAGS, "-n")
    assert "Nothing to be done" in again.stdout
