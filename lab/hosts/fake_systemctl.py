"""A fake `systemctl` for the multi-host lab's hosts: systemd cannot run in a network
namespace here (it is no host's PID 1), so this stands in for the part of it the control
plane uses, with the same command line and the same guarantees the executor checks:

- a unit is a JSON file `ROOT/UNIT.json` (what a unit file says: ExecStart's argv, User,
  Environment, WorkingDirectory, its log, KillSignal, TimeoutStopSec, Restart);
- its processes live in a real cgroup of their own (the named `systemd` v1 hierarchy, or the
  unified one), created at its start: PostgreSQL's backends call setsid(), but none leaves
  it; `show -p ControlGroup` names it, as systemd does, and `kill` signals all of it;
- `start`, `stop` (KillSignal to the main process, SIGCONT to all, then SIGKILL to what is
  left after TimeoutStopSec), `restart`, `kill --signal=SIG`, `is-active`, `show -p PROP
  --value`, `reset-failed`, `daemon-reload`;
- `supervise`: what stands in for systemd itself, per host: it starts again every unit with
  `restart: "always"` that was started and is gone, with systemd's backoff.

Run as `python -m lab.hosts.fake_systemctl --lab DIR COMMAND [UNIT]` on a host of the lab
in DIR (its units: those of the host whose network namespace it runs in, as a host's own
systemctl knows only its host's units), or with `--root UNITS_DIR`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# remediation.executors.processes (~40 ms of imports) is imported by the commands that look at
# a main process only: a fence's first two calls (`show`, `kill`) cost a Python start and no
# more, nearer to systemctl's few ms.

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
ACTIVE, INACTIVE = "active", "inactive"


class UnitError(Exception):
    pass


def cgroup_root() -> Path:
    """The cgroup hierarchy the units' groups are made in (the first writable one)."""
    for root in CGROUP_ROOTS:
        if (root / "cgroup.procs").exists():
            return root
    raise UnitError("no cgroup hierarchy (/sys/fs/cgroup/systemd or unified)")


class Units:
    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            config = json.loads((root / "host.json").read_text())
        except (OSError, ValueError):
            raise UnitError("System has not been booted with systemd (no host.json)") from None
        self.cgroup_base: str = config["cgroup"]  # e.g. /shopguard/<lab>/<host>

    def spec(self, unit: str) -> dict[str, Any]:
        if "/" in unit or not unit.endswith(".service"):
            raise UnitError(f"Unit {unit} not found.")
        try:
            spec: dict[str, Any] = json.loads((self.root / f"{unit}.json").read_text())
        except FileNotFoundError:
            raise UnitError(f"Unit {unit} not found.") from None
        return spec

    def names(self) -> list[str]:
        return sorted(p.name.removesuffix(".json") for p in self.root.glob("*.service.json"))

    def _state_file(self, unit: str) -> Path:
        return self.root / "state" / f"{unit}.json"

    def state(self, unit: str) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_file(unit).read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        return state

    def _save(self, unit: str, state: dict[str, Any]) -> None:
        path = self._state_file(unit)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def control_group(self, unit: str) -> str:
        return f"{self.cgroup_base}/{unit}"

    def cgroup_dir(self, unit: str) -> Path:
        return cgroup_root() / self.control_group(unit).lstrip("/")

    def procs(self, unit: str) -> list[int]:
        try:
            text = (self.cgroup_dir(unit) / "cgroup.procs").read_text()
        except (FileNotFoundError, UnitError):
            return []
        return [int(x) for x in text.split()]

    def main_pid(self, unit: str) -> int:
        state = self.state(unit)
        pid = state.get("main_pid") or 0
        spec = self.spec(unit)
        from remediation.executors.processes import runs_program

        return pid if pid and runs_program(pid, spec["argv"][0]) else 0

    def is_active(self, unit: str) -> bool:
        return self.main_pid(unit) != 0

    def start(self, unit: str) -> None:
        spec = self.spec(unit)
        if self.is_active(unit):
            return
        group = self.cgroup_dir(unit)
        group.mkdir(parents=True, exist_ok=True)
        # Into the unit's group first: whatever this process starts is born in it.
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            from remediation.executors.processes import spawn_detached

            pid = spawn_detached(
                spec["argv"],
                log_path=Path(spec["log"]),
                env_overrides=spec.get("env") or {},
                cwd=Path(spec["cwd"]) if spec.get("cwd") else None,
                user=spec.get("user"),
            )
        except OSError as exc:
            raise UnitError(f"Job for {unit} failed: {exc}") from exc
        finally:  # this process leaves the group (to the hierarchy's root)
            (cgroup_root() / "cgroup.procs").write_text(str(os.getpid()))
        self._save(unit, {"main_pid": pid, "wanted": True, "started_at": time.time()})
        from remediation.executors.processes import is_pid_alive

        if not is_pid_alive(pid):
            raise UnitError(f"Job for {unit} failed: its main process exited at once")

    def kill(self, unit: str, sig: int) -> None:
        for pid in self.procs(unit):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_empty(self, unit: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.procs(unit):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, unit: str) -> None:
        spec = self.spec(unit)
        state = self.state(unit)
        self._save(unit, {**state, "wanted": False, "main_pid": 0})
        pid = state.get("main_pid") or 0
        sig = getattr(signal, spec.get("kill_signal", "SIGTERM"))
        from remediation.executors.processes import runs_program

        if pid and runs_program(pid, spec["argv"][0]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        self.kill(unit, signal.SIGCONT)  # a stopped process could not act on its signal
        if not self._wait_empty(unit, float(spec.get("timeout_stop_s", 10))):
            self.kill(unit, signal.SIGKILL)
            self._wait_empty(unit, 5.0)

    def show(self, unit: str, prop: str) -> str:
        try:  # as systemd: an unknown unit shows, not-found and empty
            self.spec(unit)
        except UnitError:
            return {"LoadState": "not-found", "MainPID": "0", "ActiveState": INACTIVE}.get(prop, "")
        if prop == "LoadState":
            return "loaded"
        if prop == "MainPID":
            return str(self.main_pid(unit))
        if prop == "ControlGroup":
            self.spec(unit)
            return self.control_group(unit)
        if prop == "ActiveState":
            return ACTIVE if self.is_active(unit) else INACTIVE
        raise UnitError(f"unknown property {prop}")

    def supervise_once(self, starts: dict[str, list[float]]) -> None:
        """Start again what should run (`restart: always`, started, not stopped) and is gone."""
        now = time.monotonic()
        for unit in self.names():
            spec = self.spec(unit)
            if spec.get("restart") != "always" or not self.state(unit).get("wanted"):
                continue
            if self.is_active(unit):
                continue
            recent = [t for t in starts.get(unit, []) if now - t < 10.0]
            if recent and now - recent[-1] < min(5.0, 0.25 * 2 ** (len(recent) - 1)):
                continue  # RestartSec and StartLimit: a unit that keeps dying, less often
            starts[unit] = [*recent, now]
            try:
                self.start(unit)
            except UnitError as exc:
                print(f"supervise: {exc}", file=sys.stderr, flush=True)


def units_of_this_host(lab_dir: Path) -> Path:
    """The units directory of the lab's host whose network namespace this process is in."""
    try:
        state = json.loads((lab_dir / "hosts.json").read_text())
        mine = os.stat("/proc/self/ns/net").st_ino
    except (OSError, ValueError) as exc:
        raise UnitError(f"no multi-host lab in {lab_dir}: {exc}") from None
    for host in state["hosts"]:
        try:
            if os.stat(f"/run/netns/sg{state['lab_id']}-{host}").st_ino == mine:
                return lab_dir / "hosts" / str(host) / "units"
        except OSError:
            continue
    raise UnitError("System has not been booted with systemd (not on a host of the lab)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="systemctl")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", type=Path)
    where.add_argument("--lab", type=Path)
    parser.add_argument("--quiet", "-q", action="store_true")
    parser.add_argument("--value", action="store_true")
    parser.add_argument("-p", "--property", action="append", default=[])
    parser.add_argument("--signal", "-s", default="SIGTERM")
    parser.add_argument("command")
    parser.add_argument("units", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        units = Units(args.root or units_of_this_host(args.lab))
        if args.command == "supervise":
            starts: dict[str, list[float]] = {}
            while (units.root / "host.json").exists():
                units.supervise_once(starts)
                time.sleep(0.1)
            return 0
        if args.command in ("daemon-reload", "reset-failed"):
            return 0
        if not args.units:
            raise UnitError("Too few arguments.")
        rc = 0
        for unit in args.units:
            if args.command == "start":
                units.start(unit)
            elif args.command == "stop":
                units.stop(unit)
            elif args.command == "restart":
                units.stop(unit)
                units.start(unit)
            elif args.command == "kill":
                name = args.signal if args.signal.startswith("SIG") else f"SIG{args.signal}"
                units.kill(unit, getattr(signal, name))
            elif args.command == "is-active":
                active = units.is_active(unit)
                if not args.quiet:
                    print(ACTIVE if active else INACTIVE)
                rc = rc or (0 if active else 3)
            elif args.command == "show":  # each property asked, in order (systemd: by name)
                for prop in args.property or ["ActiveState"]:
                    value = units.show(unit, prop)
                    print(value if args.value else f"{prop}={value}")
            else:
                raise UnitError(f"Unknown command verb {args.command}.")
        return rc
    except UnitError as exc:
        print(exc, file=sys.stderr)
        return 5 if "not found" in str(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
