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


def stat_text(per_cpu: dict[int, tuple[int, int]]) -> str:
    """A /proc/stat with the given (busy, idle) ticks per CPU."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in per_cpu.items()]
    return "\n".join([*lines, "intr 1 2 3", "ctxt 5"]) + "\n"


def test_idle_cores_counts_only_the_cpus_this_process_may_run_on(monkeypatch):
    """Issue 22, finding 8: a 64-CPU host, 62 CPUs idle, this process pinned to CPUs 0 and 1, both busy. The host-wide
    count said 62 idle cores (so as many threads as allowed); the allowed CPUs are busy: 1 thread."""
    before = {n: (0, 0) for n in range(64)}
    after = {n: ((100, 0) if n < 2 else (0, 100)) for n in range(64)}
    snapshots = iter([stat_text(before), stat_text(after)])
    monkeypatch.setattr(tiny, "read_proc_stat", lambda: next(snapshots))
    assert tiny.idle_cores(0.0, cpus={0, 1}) == 0.0
    snapshots = iter([stat_text(before), stat_text(after)])
    assert tiny.idle_cores(0.0, cpus=set(range(64))) == 62.0

    snapshots_for_pick = iter([stat_text(before), stat_text(after)])
    monkeypatch.setattr(tiny, "read_proc_stat", lambda: next(snapshots_for_pick))
    monkeypatch.setattr(tiny, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(tiny, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert pick_threads(0.0)[0] == 1


def test_per_cpu_ticks_reads_every_cpu_line():
    text = stat_text({0: (10, 90), 3: (50, 50)})
    assert tiny.per_cpu_ticks(text) == {0: (100, 90), 3: (100, 50)}
    with pytest.raises(ValueError, match="per-cpu"):
        tiny.per_cpu_ticks("cpu 1 2 3 4\n")


@pytest.mark.parametrize(
    "layout, expected",
    [
        ({"cgroup": "0::/job\n", "job/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, 1.5),
        ({"cgroup": "0::/a/b\n", "a/b/cpu.max": "max 100000\n", "a/cpu.max": "400000 100000\n"}, 4.0),  # a parent's
        ({"cgroup": "0::/\n", "cpu.max": "max 100000\n"}, None),
        (
            {
                "cgroup": "4:cpu,cpuacct:/docker/x\n",
                "cpu,cpuacct/docker/x/cpu.cfs_quota_us": "200000\n",
                "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            },
            2.0,
        ),  # fmt: skip
        ({"cgroup": "1:cpu:/\n", "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cgroup": "0::/gone\n"}, None),  # nothing readable: no limit known
    ],
)
def test_cgroup_cpu_limit_reads_v1_and_v2_quotas(tmp_path, layout, expected):
    for name, text in layout.items():
        if name != "cgroup":
            (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(layout["cgroup"])
    assert tiny.cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") == expected


def test_usable_cores_is_capped_by_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(tiny, "allowed_cpus", lambda: set(range(16)))
    monkeypatch.setattr(tiny, "cgroup_cpu_limit", lambda: 2.5)
    assert tiny.usable_cores() == 2
    monkeypatch.setattr(tiny, "cgroup_cpu_limit", lambda: 0.5)
    assert tiny.usable_cores() == 1
    monkeypatch.setattr(tiny, "cgroup_cpu_limit", lambda: None)
    assert tiny.usable_cores() == 16


def test_omp_num_threads_takes_the_first_level_of_a_list(monkeypatch):
    """Issue 22, finding 8: OMP_NUM_THREADS="4,2" (OpenMP's per-level list) was ignored."""
    monkeypatch.setattr(tiny, "idle_cores", lambda window_s=0.2: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert pick_threads() == (4, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", " 3 ")
    assert pick_threads() == (3, "OMP_NUM_THREADS")
    for bad in ("0", ",2", "x,2", ""):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        assert pick_threads()[1] != "OMP_NUM_THREADS"
