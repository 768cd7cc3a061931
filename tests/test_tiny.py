"""The offline tiny model's helpers: the torch thread choice for a CPU that may be busy (issue 15, finding 7)."""

import os

import pytest
import torch

from forking_trl import tiny
from forking_trl.tiny import cpu_ticks, idle_cores, pick_threads, torch_threads


def test_cpu_ticks_reads_the_aggregate_line():
    # user nice system idle iowait irq softirq steal guest guest_nice: guest is inside user, so left out
    assert cpu_ticks("cpu  100 5 20 800 50 3 2 0 40 0\n") == (980, 850)
    assert cpu_ticks("cpu 1 2 3 4") == (10, 4)
    with pytest.raises(ValueError, match="aggregate cpu line"):
        cpu_ticks("cpu0 1 2 3 4 5")


def test_idle_cores_is_a_share_of_the_machine():
    idle = idle_cores(0.05)
    if idle is None:  # no /proc/stat (not Linux): pick_threads falls back to the usable cores
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= os.cpu_count()


@pytest.mark.parametrize(
    "idle, usable, expected",
    [(2.0, 2, 2), (1.85, 2, 2), (1.5, 2, 1), (1.0, 2, 1), (0.05, 2, 1), (7.9, 2, 2), (3.9, 16, 4), (None, 4, 4)],
)
def test_pick_threads_takes_the_idle_cores(monkeypatch, idle, usable, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(tiny, "idle_cores", lambda window_s=0.2: idle)
    monkeypatch.setattr(tiny, "usable_cores", lambda: usable)
    threads, why = pick_threads()
    assert threads == expected
    assert ("idle" in why) == (idle is not None)


def test_omp_num_threads_decides_when_set(monkeypatch):
    monkeypatch.setattr(tiny, "idle_cores", lambda window_s=0.2: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert pick_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")  # not a count: ignored
    assert pick_threads()[0] == 1


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
