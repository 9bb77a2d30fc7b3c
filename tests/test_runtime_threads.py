"""The decode thread-count chooser (neox_mlc.runtime.ThreadChooser), on measured step times fed to it."""

import pytest

from neox_mlc.common import WorkflowError
from neox_mlc.runtime import ThreadChooser, thread_candidates


def _run(chooser: ThreadChooser, seconds_for: dict[int, float], steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        n = chooser.next_threads()
        used.append(n)
        chooser.record(n, seconds_for[n])
    return used


def test_chooser_keeps_the_faster_count_and_follows_a_load_that_comes_and_goes():
    chooser = ThreadChooser([2, 1], probe_steps=2, period=10)
    quiet, loaded = {2: 0.010, 1: 0.013}, {2: 0.080, 1: 0.020}  # quiet: close, so both rounds run
    used = _run(chooser, quiet, 4 + 10)
    assert used[:4] == [2, 1, 2, 1] and set(used[4:]) == {2} and chooser.choice == 2
    used = _run(chooser, loaded, 2 + 10)  # next probe sees the load: one thread wins, 4x faster, after one round
    assert used[:2] == [2, 1] and set(used[2:]) == {1}
    _run(chooser, quiet, 4)
    assert chooser.choice == 2


def test_chooser_with_one_candidate_never_probes():
    chooser = ThreadChooser([1])
    assert _run(chooser, {1: 0.01}, 50) == [1] * 50


def test_candidates_and_bad_counts():
    assert thread_candidates(8) == [8, 4, 1] and thread_candidates(2) == [2, 1] and thread_candidates(1) == [1]
    with pytest.raises(WorkflowError, match="positive"):
        ThreadChooser([0, 2])


def test_tvm_num_threads_must_be_a_count():
    from neox_mlc.runtime import _pool_threads

    assert _pool_threads("2") == 2 and _pool_threads("0") == 1
    with pytest.raises(WorkflowError, match="TVM_NUM_THREADS='two'"):
        _pool_threads("two")


def test_no_probe_of_more_threads_when_other_processes_hold_the_cpus():
    """Under load a single probe step on 2 threads cost more than one-thread decode gained (25.5 vs 46 tok/s)."""
    free = {"cpus": 0.4}
    chooser = ThreadChooser([2, 1], probe_steps=2, period=10, free_cpus=lambda: free["cpus"])
    slow_if_shared = {2: 0.500, 1: 0.020}
    assert set(_run(chooser, slow_if_shared, 40)) == {1}  # never a step on 2 threads
    free["cpus"] = 1.5  # the load half went away: the next probe times both counts again
    used = _run(chooser, {2: 0.010, 1: 0.013}, 20)
    assert used[:4] == [2, 1, 2, 1] and chooser.choice == 2


def test_no_probe_at_all_when_every_thread_has_a_free_cpu():
    """Probe steps on one thread cost 4 % of a 64-step decode on an idle machine; they are run only under load."""
    free = {"cpus": 1.9}
    chooser = ThreadChooser([2, 1], probe_steps=2, period=10, free_cpus=lambda: free["cpus"])
    assert _run(chooser, {2: 0.010, 1: 0.013}, 40) == [2] * 40
    free["cpus"] = 0.6  # a load came: the next check (within one period) moves to one thread, untimed
    used = _run(chooser, {2: 0.500, 1: 0.020}, 20)
    assert 1 in used[:11] and set(used[11:]) == {1}
    free["cpus"] = 2.0
    used = _run(chooser, {2: 0.010, 1: 0.013}, 20)
    assert set(used[11:]) == {2}


def test_cpu_meter_reads_this_machines_idle_cpus():
    import os
    import time

    from neox_mlc.runtime import CpuMeter

    cpus = set(os.sched_getaffinity(0))
    meter = CpuMeter(cpus)
    time.sleep(0.2)
    assert 0.0 <= meter() <= len(cpus)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process's own work is not counted as another's
        pass
    assert meter() >= len(cpus) - 1.0 - 0.3 or os.getloadavg()[0] > len(cpus)
