"""Dividing the machine's cores among concurrent trainings: disjoint near-equal shares, pinned children."""

import os
import subprocess
import sys

import pytest

from fedllm.core.cores import CoreShare, available_cores, divide_cores


def test_shares_are_disjoint_cover_every_core_and_differ_by_at_most_one():
    for n_cores in range(1, 9):
        cores = tuple(range(10, 10 + n_cores))
        for parts in range(1, n_cores + 1):
            # Act
            shares = divide_cores(parts, cores)
            # Assert
            flat = [c for s in shares for c in s.cores]
            sizes = [s.threads for s in shares]
            assert len(shares) == parts and sorted(flat) == list(cores) and len(set(flat)) == len(flat)
            assert max(sizes) - min(sizes) <= 1 and not any(s.shared for s in shares)


def test_two_silos_on_two_cores_get_one_core_each():
    assert divide_cores(2, [0, 1]) == [CoreShare((0,)), CoreShare((1,))]
    assert divide_cores(2, [0, 1, 2]) == [CoreShare((0, 1)), CoreShare((2,))]


def test_more_processes_than_cores_get_one_core_each_dealt_round_robin():
    shares = divide_cores(5, [3, 7])
    assert [s.cores for s in shares] == [(3,), (7,), (3,), (7,), (3,)]
    assert all(s.shared for s in shares)
    assert [s.shared for s in divide_cores(3, [0, 1])] == [True, False, True]  # core 1 serves one process only


def test_bad_requests_name_the_problem():
    with pytest.raises(ValueError, match="at least 1"):
        divide_cores(0, [0])
    with pytest.raises(ValueError, match="no cores"):
        divide_cores(1, [])


def test_a_pinned_child_runs_on_its_share_and_sizes_its_threads_to_it():
    # Arrange: the last core this process may use, as a share of one.
    share = CoreShare((available_cores()[-1],))
    code = ("import os; from fedllm.train.engine import set_threads; "
            "print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'], set_threads(None))")
    # Act
    out = subprocess.run(share.argv([sys.executable, "-c", code]), env={**os.environ, **share.env()},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")[-2]
    # Assert
    assert out == f"{list(share.cores)} 1 1"
