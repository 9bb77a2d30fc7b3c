"""This test machine's CPU flags, read from ``/proc/cpuinfo`` — not from the targets the code under test makes."""

from pathlib import Path

import pytest


def host_flags() -> set[str]:
    """The ``/proc/cpuinfo`` flags (empty where it is unreadable)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def skip_without(*flags: str, why: str) -> None:
    """Skip the calling test where this CPU lacks any of ``flags``."""
    if not set(flags) <= host_flags():
        pytest.skip(why)


def needs_avx512() -> None:
    skip_without("avx512f", why="this CPU has no AVX-512: the default target keeps cpu_schedule.Matmul")


def needs_vnni() -> None:
    skip_without("avx512bw", "avx512_vnni", why="this CPU has no AVX-512 VNNI: the host library keeps its float kernels")
