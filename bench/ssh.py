"""The cost of acting on another host over SSH (the `ssh` executor, on the multi-host lab's
hosts: network namespaces with Debian's sshd). Per run: the first step (the connection: TCP,
key exchange, the key's check), then `--steps` steps on the same connection (a unit's
`is-active`, and a bare `true`: the transport's own share); the fence of a unit with a
setsid'd child (kill, until its cgroup is empty); and how soon a fence of a partitioned host
gives up (it must fail, never pass for a fence). Goals: bench/goals.toml.

    .venv/bin/python bench/ssh.py [--steps 200] [--figures bench/out/ssh.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.bench_goals import Figure, save
from lab.hosts.lab import HostsLab
from lab.hosts.net import HostNet
from lab.process import wait_until
from remediation.executors.registry import build_executor
from remediation.executors.runners import HostHung, HostUnreachable
from remediation.executors.systemd import SystemdExecutor
from tests.test_real_hosts import SERVICE, unit_pids

STEP_TIMEOUT_S = 3.0


def headline(
    first_ms: float, bare: list[float], checks: list[float], fences: list[float], refused_s: float
) -> list[Figure]:
    return [
        Figure("ssh.first_step_ms", first_ms, "ms", "first step on a host (connect, keys, run)"),
        Figure("ssh.step_p50_ms", statistics.median(bare), "ms", "a step after the first, p50"),
        Figure(
            "ssh.step_p99_ms",
            statistics.quantiles(bare, n=100)[98],
            "ms",
            "a step after the first, p99",
        ),
        Figure("ssh.is_active_p50_ms", statistics.median(checks), "ms", "a unit's is-active, p50"),
        Figure("ssh.fence_p50_ms", statistics.median(fences), "ms", "fence of a unit, p50"),
        Figure(
            "ssh.partitioned_fence_fails_s",
            refused_s,
            "s",
            f"fence of a partitioned host fails after (step timeout {STEP_TIMEOUT_S:g} s)",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fences", type=int, default=10)
    parser.add_argument("--figures", type=Path)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="shop-bench-ssh", dir="/tmp"))
    data_dir.chmod(0o755)
    lab = HostsLab(data_dir, HostNet.new(("db-1",)))
    lab.up()
    try:
        (data_dir / "service.py").write_text(SERVICE)
        lab.add_unit(
            "db-1",
            "svc.service",
            {
                "argv": [sys.executable, str(data_dir / "service.py")],
                "log": str(data_dir / "svc.log"),
            },
        )
        params = lab.executor_params(
            {"svc": {"unit": "svc.service", "host": "db-1"}}, step_timeout_s=STEP_TIMEOUT_S
        )
        ex = build_executor("bench", "ssh", params)
        assert isinstance(ex, SystemdExecutor)
        started = time.perf_counter()
        ex._step("svc", "true")
        first_ms = (time.perf_counter() - started) * 1000
        bare = []
        for _ in range(args.steps):
            started = time.perf_counter()
            ex._step("svc", "true")
            bare.append((time.perf_counter() - started) * 1000)
        checks = []
        for _ in range(max(10, args.steps // 10)):
            started = time.perf_counter()
            ex.is_running("svc")
            checks.append((time.perf_counter() - started) * 1000)
        fences = []
        for _ in range(args.fences):
            ex.restart("svc")
            wait_until(lambda: len(unit_pids(lab, "db-1")) >= 2, timeout_s=10, what="its child")
            started = time.perf_counter()
            assert ex.fence("svc")
            fences.append((time.perf_counter() - started) * 1000)
            assert unit_pids(lab, "db-1") == []
        ex.restart("svc")
        lab.net.partition("db-1")
        started = time.perf_counter()
        try:
            ex.fence("svc")
            raise SystemExit("a fence of a partitioned host passed")
        except (HostHung, HostUnreachable):
            refused_s = time.perf_counter() - started
        lab.net.heal("db-1")
        ex.close()
    finally:
        left = lab.down()
    if left:
        print(f"the lab left {left}", file=sys.stderr)
        return 1
    figures = headline(first_ms, bare, checks, fences, refused_s)
    for figure in figures:
        print(f"{figure.id}: {figure.value:.2f} {figure.unit}  ({figure.what})")
    save(args.figures, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
