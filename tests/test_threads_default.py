"""The default `--threads`: the CPUs this process may use (affinity, cgroup v1/v2 quota), not os.cpu_count()."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgemm import cpu

ROOT = Path(__file__).resolve().parents[1]


def _cgroup(tmp_path, files: dict, own: str = "0::/\n") -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup (files: relative path -> text) and a fake /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return root, proc


def _default(root, proc, affinity=8, cores=64):
    return cpu.default_threads(root, proc, affinity=lambda: affinity, cpu_count=lambda: cores)


@pytest.mark.parametrize("cpu_max, want", [
    ("200000 100000\n", (2, "cgroup quota")),           # docker --cpus 2
    ("150000 100000\n", (2, "cgroup quota")),           # 1.5 CPUs: rounded up
    ("50000 100000\n", (1, "cgroup quota")),            # half a CPU: at least 1
    ("max 100000\n", (8, "affinity")),                  # no limit: the affinity binds
    ("garbage\n", (8, "affinity")),                     # unreadable: ignored
])
def test_cgroup_v2_quota(tmp_path, cpu_max, want):
    root, proc = _cgroup(tmp_path, {"cpu.max": cpu_max})
    assert _default(root, proc) == want


def test_cgroup_v2_a_parent_limit_binds(tmp_path):
    root, proc = _cgroup(tmp_path, {"a/b/cpu.max": "max 100000", "a/cpu.max": "300000 100000",
                                    "cpu.max": "max 100000"}, own="0::/a/b\n")
    assert cpu.cgroup_cpu_quota(root, proc) == 3.0
    assert _default(root, proc) == (3, "cgroup quota")


@pytest.mark.parametrize("ctrl_dir, own", [("cpu,cpuacct", "4:cpu,cpuacct:/\n"), ("cpu", "1:cpu:/\n2:cpuacct:/\n")])
def test_cgroup_v1_quota(tmp_path, ctrl_dir, own):
    root, proc = _cgroup(tmp_path, {f"{ctrl_dir}/cpu.cfs_quota_us": "400000\n",
                                    f"{ctrl_dir}/cpu.cfs_period_us": "100000\n"}, own=own)
    assert _default(root, proc) == (4, "cgroup quota")


def test_cgroup_v1_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
                         own="1:cpu:/\n")
    assert cpu.cgroup_cpu_quota(root, proc) is None
    assert _default(root, proc, affinity=64) == (64, "cpu_count")


def test_affinity_below_the_quota_and_no_limit_at_all(tmp_path):
    root, proc = _cgroup(tmp_path, {"cpu.max": "400000 100000"})
    assert _default(root, proc, affinity=3) == (3, "affinity")
    empty, proc2 = _cgroup(tmp_path / "none", {})
    assert _default(empty, proc2, affinity=None, cores=12) == (12, "cpu_count")     # no sched_getaffinity
    assert cpu.threads_or_default(5) == 5


def test_backends_take_the_default(monkeypatch):
    """A backend opened without threads runs the default (here faked to 1), not os.cpu_count()."""
    import torch
    from edgemm.runtimes import load_backend
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "default_threads", lambda *a, **k: (1, "cgroup quota"))
    try:
        torch.set_num_threads(2)
        load_backend("torch", model="tiny-shapes", device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_no_thread_default_reads_cpu_count_any_more():
    """os.cpu_count() stays only where a report states the machine's cores (benchmarks' JSON too)."""
    allowed = {"edgemm/cpu.py", "edgemm/doctor.py", "edgemm/bench.py"}
    found = []
    for d in ("edgemm", "runtimes", "export", "calib", "benchmarks"):
        for p in (ROOT / d).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            for i, line in enumerate(p.read_text().splitlines(), 1):
                as_default = re.search(r"(or\s+(int\()?|default=)os\.cpu_count", line)
                if "cpu_count()" in line and (as_default or (rel not in allowed and d != "benchmarks")):
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, found


def test_doctor_prints_the_default_and_where_it_came_from():
    from edgemm.doctor import facts, report
    f = facts(llama=False)
    n, source = cpu.default_threads()
    assert (f["cpu"]["default_threads"], f["cpu"]["threads_from"]) == (n, source)
    lines = [x for x in report(f).splitlines() if x.startswith("threads:")]
    assert len(lines) == 1 and re.match(rf"threads: +{n} by default \(", lines[0]), lines


def test_threads_help_says_the_default():
    from click.testing import CliRunner
    from edgemm.cli import main
    with_threads = [name for name, c in main.commands.items() if any(p.name == "threads" for p in c.params)]
    assert {"run", "serve", "export", "bench", "calibrate"} <= set(with_threads)
    for name in with_threads:
        out = CliRunner().invoke(main, [name, "--help"], terminal_width=400).output
        assert "affinity and cgroup CPU quota" in " ".join(out.split()), (name, out)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_under_taskset_one_cpu_the_default_is_1():
    code = ("from edgemm.cpu import default_threads, threads_or_default; "
            "print(*default_threads(), threads_or_default(None))")
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "affinity", "1"], r.stdout
