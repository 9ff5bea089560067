"""SystemdExecutor: components are systemd units, on this host or on other hosts over SSH
(`[executors.NAME] kind = "systemd"`, or `kind = "ssh"` where every component names its
host). Each step is one small shell script run where the unit lives (`runners.py`):

- start, stop, restart: `systemctl`; the unit's own TimeoutStopSec governs a stop;
- fence: `systemctl kill --signal=SIGKILL` (every process of the unit's cgroup, stopped ones
  too: SIGKILL needs no SIGCONT), then the cgroup is read until it is empty (PostgreSQL's
  backends call setsid(), but no process leaves its cgroup), then `systemctl stop`, and the
  unit must not be active again (a node's unit has no Restart=: the control plane decides
  when a node runs);
- a server tool (pg_rewind, pg_basebackup...): as the unit's user, in a session of its own so
  that a cancel kills it and whatever it forked.

An unreachable host is never taken for a fenced one: its steps raise HostUnreachable (nothing
ran) or HostHung (unknown whether it ran), and no step is repeated here."""

from __future__ import annotations

import base64
import logging
import shlex
import uuid
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from remediation.executors.base import Cancel, Cancelled, ExecutorError, Unreachable
from remediation.executors.params import SshParams, SystemdParams, UnitComponent
from remediation.executors.runners import (
    Done,
    LocalRunner,
    Runner,
    SshRunner,
    StepOverran,
)

logger = logging.getLogger(__name__)

ACTIVE_STATES = ("active", "activating", "reloading", "deactivating")
STOPPED_STATES = ("inactive", "failed")  # is-active's words for a unit with nothing running
# Where a unit's cgroup lives: unified (cgroup v2, or systemd's hybrid layout), else the
# named v1 hierarchy of systemd's.
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/sys/fs/cgroup/systemd")
FENCE_POLL_S = 0.02
STOP_STEP_S = 60.0  # a stop or restart step: the unit's TimeoutStopSec, and then some


def q(value: object) -> str:
    return shlex.quote(str(value))


def cgroup_procs_script(cgroup_var: str) -> str:
    """Shell: the pids in the cgroup named by `$cgroup_var` (none when it has no cgroup)."""
    roots = " ".join(CGROUP_ROOTS)
    return (
        f'procs=""; if [ -n "${cgroup_var}" ]; then for r in {roots}; do '
        f'if [ -f "$r${cgroup_var}/cgroup.procs" ]; then '
        f'procs=$(cat "$r${cgroup_var}/cgroup.procs" | tr "\\n" " "); break; fi; done; fi'
    )


class SystemdExecutor:
    Params = SystemdParams

    def __init__(self, params: SystemdParams) -> None:
        self.params = params
        self._runners: dict[str | None, Runner] = {None: LocalRunner()}
        for name, host in params.hosts.items():
            assert params.known_hosts is not None  # the params' validator says so
            self._runners[name] = SshRunner(
                name,
                address=host.address,
                port=host.port,
                user=host.user,
                key_file=host.key_file,
                known_hosts=params.known_hosts,
                connect_timeout_s=params.connect_timeout_s,
            )

    @classmethod
    def from_params(cls, params: SystemdParams) -> SystemdExecutor:
        return cls(params)

    def knows(self, component: str) -> bool:
        return component in self.params.components

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()

    # -- steps -----------------------------------------------------------------------------------
    def _unit(self, component: str) -> UnitComponent:
        comp = self.params.components.get(component)
        if comp is None:
            raise ExecutorError(f"no component {component!r} in this executor's units")
        return comp

    def _step(
        self,
        component: str,
        script: str,
        *,
        stdin: str | None = None,
        timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> Done:
        runner = self._runners[self._unit(component).host]
        return runner.run(
            script,
            stdin=stdin,
            timeout_s=timeout_s or self.params.step_timeout_s,
            idle_timeout_s=idle_timeout_s,
        )

    @property
    def _systemctl(self) -> str:
        return " ".join(q(part) for part in self.params.systemctl)

    def _checked(
        self,
        component: str,
        script: str,
        what: str,
        timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> str:
        done = self._step(component, script, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s)
        if done.returncode != 0:
            raise ExecutorError(f"{what} of {component} failed ({done.returncode}): {done.tail()}")
        return done.output

    # -- processes -----------------------------------------------------------------------------
    def is_running(self, component: str) -> bool:
        unit = self._unit(component).unit
        done = self._step(component, f"{self._systemctl} is-active -- {q(unit)}")
        return done.output.strip() in ACTIVE_STATES

    def restart(self, component: str) -> int:
        unit = self._unit(component).unit
        out = self._checked(
            component,
            f"{self._systemctl} restart -- {q(unit)} && "
            f"{self._systemctl} show -p MainPID --value -- {q(unit)}",
            "restart",
            timeout_s=STOP_STEP_S,
        )
        try:
            return int(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ExecutorError(f"{component} restarted, but no main pid: {out[-300:]}") from None

    def fence(self, component: str) -> bool:
        unit = q(self._unit(component).unit)
        s = self._systemctl
        wait_s = max(1, round(self.params.fence_timeout_s))
        # Every systemctl answer is checked: a unit systemd does not know (a typo), a bus it
        # cannot reach or a refused sudo must fail the fence, never pass for an empty cgroup.
        script = "\n".join(
            [
                # One call: NAME=value lines (systemd prints them in an order of its own).
                f"props=$({s} show -p LoadState -p ControlGroup -- {unit}) || "
                '{ echo "error: systemctl show failed"; exit 4; }',
                "load=$(printf '%s\\n' \"$props\" | sed -n 's/^LoadState=//p')",
                "cg=$(printf '%s\\n' \"$props\" | sed -n 's/^ControlGroup=//p')",
                '[ "$load" = loaded ] || { echo "error: the unit is $load"; exit 4; }',
                cgroup_procs_script("cg"),
                'echo "had: $procs"',
                f"{s} kill --signal=SIGKILL -- {unit} >/dev/null 2>&1",
                # Until the cgroup is empty, on the host's own clock (not a count of loops).
                f"end=$(( $(date +%s) + {wait_s} )); i=0",
                "while :; do",
                "  " + cgroup_procs_script("cg"),
                '  [ -z "$procs" ] && break',
                '  [ "$(date +%s)" -ge "$end" ] && break',
                "  kill -KILL $procs 2>/dev/null",  # what the unit's kill did not reach yet
                f"  sleep {FENCE_POLL_S}; i=$((i+1))",
                '  [ $((i % 25)) = 0 ] && echo "waiting: $procs"',  # it lives: not a hung host
                "done",
                'echo "left: $procs"',
                f"{s} stop -- {unit} >/dev/null 2>&1 || "
                '{ echo "error: systemctl stop failed"; exit 4; }',
                f'echo "state: $({s} is-active -- {unit})"',
            ]
        )
        out = self._checked(
            component,
            script,
            "fence",
            timeout_s=self.params.fence_timeout_s + 2 * self.params.step_timeout_s,
            idle_timeout_s=self.params.step_timeout_s,
        )
        fields = {
            key: value.strip()
            for key, _, value in (line.partition(":") for line in out.splitlines())
            if key in ("had", "left", "state")
        }
        if "left" not in fields or "state" not in fields:
            raise ExecutorError(f"the fence of {component} did not finish: {out[-300:]}")
        if fields["left"]:
            raise ExecutorError(
                f"{component} survived SIGKILL: pids {fields['left']} still in its cgroup"
            )
        if fields["state"] not in STOPPED_STATES:
            raise ExecutorError(
                f"{component} is {fields['state'] or 'in no known state'} after its fence: its "
                "unit must not have Restart= (the control plane decides when a node runs)"
            )
        return bool(fields.get("had"))

    def stop(self, component: str, timeout_s: float = 30) -> None:
        unit = q(self._unit(component).unit)
        s = self._systemctl
        done = self._step(
            component,
            "\n".join(
                [
                    f"{s} stop -- {unit}",
                    "rc=$?",
                    f"cg=$({s} show -p ControlGroup --value -- {unit})",
                    cgroup_procs_script("cg"),
                    'echo "left: $procs"',
                    "exit $rc",
                ]
            ),
            timeout_s=max(timeout_s, STOP_STEP_S),
        )
        left = done.output.rsplit("left:", 1)[-1].strip() if "left:" in done.output else "?"
        if done.returncode != 0 or left:
            logger.warning(
                "%s: stop left %s (%s): fencing", component, left or "nothing", done.tail(300)
            )
            self.fence(component)

    # -- tools and files -----------------------------------------------------------------------
    def _as_user(self, comp: UnitComponent) -> str:
        """Shell: prefix "$@" with runuser when the step runs as root and the unit has a user."""
        if not comp.user:
            return ""
        return f'[ "$(id -u)" = 0 ] && set -- runuser -u {q(comp.user)} -- "$@"\n'

    def run_tool(
        self,
        component: str,
        tool: str,
        args: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: float = 300,
        cancel: Cancel | None = None,
    ) -> str:
        comp = self._unit(component)
        tools_dir = self.params.tools_dir
        if tools_dir is None or "/" in tool or not tool:
            raise ExecutorError(f"no tool {tool!r} for {component}")
        step = f"${{TMPDIR:-/tmp}}/shopguard-step-{uuid.uuid4().hex}"
        env = f"export PGPASSFILE={q(self.params.passfile)}\n" if self.params.passfile else ""
        # The host kills it itself at its time (plus a little): a control plane that lost the
        # host must not leave a tool to go on writing when the host answers again.
        script = (
            f"set -- timeout -s KILL {int(timeout_s) + 2} "
            f"{q(PurePosixPath(tools_dir) / tool)} {' '.join(q(a) for a in args)}\n"
            + self._as_user(comp)
            # A session of its own, its id in a file: a cancel kills it and what it forked.
            + env
            + "exec setsid -w sh -c "
            + q('set -C; echo $$ > "$0"; "$@"; rc=$?; rm -f "$0"; exit $rc')
            + f' "{step}" "$@"'
        )
        if cancel is not None:
            cancel.check()

        def kill() -> None:
            runner = self._runners[comp.host]
            try:
                runner.run(
                    # Its whole session: `timeout` puts the tool in a process group of its own.
                    f'f="{step}"; [ -f "$f" ] && pkill -KILL -s "$(cat "$f")"; rm -f "$f"',
                    timeout_s=self.params.connect_timeout_s,
                )
            except ExecutorError as exc:
                logger.warning("could not stop %s on %s: %s", tool, component, exc)

        cancelling = cancel.on_cancel(kill) if cancel is not None else None
        try:
            if cancelling is not None:
                cancelling.__enter__()
            try:
                done = self._step(component, script, stdin=stdin, timeout_s=timeout_s)
            except (Unreachable, StepOverran) as exc:
                kill()  # a tool over its time must not go on writing
                raise ExecutorError(f"{tool} for {component}: {exc}") from exc
        finally:
            if cancelling is not None:
                cancelling.__exit__(None, None, None)
        if cancel is not None and cancel.reason is not None:
            raise Cancelled(cancel.reason)
        if done.returncode != 0:
            raise ExecutorError(f"{tool} for {component} failed ({done.returncode}): {done.tail()}")
        return done.output

    def data_dir(self, component: str) -> str:
        path = self._unit(component).data_dir
        if path is None:
            raise ExecutorError(f"{component} has no data directory")
        return str(path)

    def log_tail(self, component: str, max_chars: int = 1000) -> str:
        comp = self._unit(component)
        if comp.log is not None:
            script = f"tail -c {int(max_chars)} {q(comp.log)}"
        else:
            script = f"journalctl -u {q(comp.unit)} -n 6 --no-pager -q -o cat"
        try:
            done = self._step(component, script, timeout_s=self.params.connect_timeout_s + 2)
        except ExecutorError:
            return ""
        lines = [line.strip() for line in done.output.splitlines()[-6:] if line.strip()]
        return " | ".join(lines)

    def _not_running(self, component: str, what: str) -> str:
        """Shell: exit 3 (with a message) unless the unit is stopped (inactive or failed: not
        starting, not stopping)."""
        unit = q(self._unit(component).unit)
        message = q(f"{component} runs: stop it before {what}")
        return (
            f"state=$({self._systemctl} is-active -- {unit})\n"
            'case "$state" in inactive|failed) ;; *) '
            f'echo {message} "($state)"; exit 3 ;; esac\n'
        )

    def reset_data_dir(self, component: str) -> None:
        path = q(self.data_dir(component))
        self._checked(
            component,
            self._not_running(component, "emptying its data directory")
            + f'set -e\nd={path}\nowner=$(stat -c %u:%g "$d")\n'
            'rm -rf -- "$d"\nmkdir -m 700 -- "$d"\nchown "$owner" "$d"\n',
            "emptying the data directory",
        )

    def put_files(
        self,
        component: str,
        dest_dir: str,
        *,
        source_dir: str | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        comp = self._unit(component)
        own = self.data_dir(component)
        dest = PurePosixPath(dest_dir)
        lines = (
            [self._not_running(component, "replacing its data directory")]
            if (str(dest) == own)
            else []
        )
        lines.append("set -e")
        lines.append(f"owner=$(stat -c %u:%g {q(PurePosixPath(own).parent)})")
        if source_dir is not None:
            lines.append(f"rm -rf -- {q(dest)}")
            lines.append(f"set -- cp -a -- {q(source_dir)} {q(dest)}")
            lines.append(self._as_user(comp).strip())
            lines.append('"$@"')
        lines.append(f"mkdir -p -m 700 -- {q(dest)}")
        lines.append(f'chown "$owner" {q(dest)}; chmod 700 {q(dest)}')
        for name, text in (files or {}).items():
            if "/" in name or name in ("", ".", ".."):
                raise ExecutorError(f"{name!r}: a file name, not a path")
            target = q(dest / name)
            encoded = base64.b64encode(text.encode()).decode()
            lines.append(f"printf %s {encoded} | base64 -d > {target}")
            lines.append(f'chown "$owner" {target}')
        self._checked(component, "\n".join(line for line in lines if line), "copy of files")


class SshExecutor(SystemdExecutor):
    """The same, where every component names its host: the control plane acts on nothing of
    its own host."""

    Params = SshParams
