"""`controlplane check-config FILE`: is this targets file one the control plane can run, and
can each policy act where it points? It never acts: it reads the file, builds the probes and
executors (no connection is made), and with `--probe` runs each probe once.

A problem names its key and, where the file has it, its line: `line 41: policies[3].params.
nodes: Field required`. Beyond what the control plane refuses at start, it names a policy
that matches no probe (it can never fire), and one whose action cannot reach its target: the
action starts or fences processes and the target has no executor, or it restarts a process
and the target names none (`component`)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from controlplane.config import Settings, read_targets
from controlplane.errors import ConfigError
from controlplane.logsafe import printable
from probes.base import ProbeResult
from probes.registry import build_probe
from remediation.executors.base import Executor
from remediation.executors.registry import ExecutorConfigError, build_executor
from remediation.registry import ACTIONS, action_class

ARRAYS = ("services", "probes", "policies")


@dataclass(frozen=True, slots=True)
class Problem:
    where: str  # `policies[3].params.nodes`
    line: int | None
    what: str

    def __str__(self) -> str:
        at = f"line {self.line}: " if self.line else ""
        return f"{at}{self.where}: {self.what}" if self.where else f"{at}{self.what}"


def line_of(text: str, loc: Sequence[str | int]) -> int | None:
    """The line of the targets file that `loc` (a validation error's location) points at,
    as far as it can be told: the table (`[[policies]]`, the n-th; `[controlplane]`;
    `[executors.NAME]`...), then the key within it. None if it is not written there."""
    lines = text.splitlines()
    headers = [
        (i, m.group(1) or m.group(2))
        for i, raw in enumerate(lines)
        if (m := re.match(r"\s*(?:\[\[\s*([^\]]+?)\s*\]\]|\[\s*([^\]]+?)\s*\])", raw))
    ]
    if not loc:
        return None
    head, rest = str(loc[0]), list(loc[1:])
    start: int | None = None
    if head in ARRAYS and rest and isinstance(rest[0], int):
        tables = [i for i, name in headers if name == head]
        if rest[0] < len(tables):
            start = tables[rest[0]]
        rest = rest[1:]
    elif head in ("executors", "backups"):
        start = next((i for i, name in headers if name == head), None)
        if head == "executors" and rest:
            named = f"executors.{rest[0]}"
            start = next((i for i, name in headers if name == named), start)
            rest = rest[1:]
    else:
        start = next((i for i, name in headers if name == "controlplane"), None)
        rest = [head, *rest]
    if start is None:
        return None
    found = start
    for key in (k for k in rest if isinstance(k, str)):
        for i in range(found + 1, len(lines)):
            if i != found + 1 and any(h == i for h, _ in headers) and i > found:
                # the next table: a sub-table of this one ([policies.params]) may hold the key
                name = next(n for h, n in headers if h == i)
                if not name.endswith(f".{key}") and not name.startswith(f"{head}."):
                    break
            if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]) or re.search(
                rf"[{{,]\s*{re.escape(key)}\s*=", lines[i]
            ):
                found = i
                break
    return found + 1


SAID_WHERE = re.compile(
    r"^(?:Value error, )?([a-z_]+(?:\[\d+\])?(?:\.[A-Za-z0-9_]+)*): (.+)$", re.S
)


def _located(loc: list[str | int], msg: str) -> tuple[list[str | int], str]:
    """A check across fields (Settings' own validator) says where in its message:
    `policies[15].params.instances: Field required`."""
    if loc or not (m := SAID_WHERE.match(msg)):
        return loc, msg
    parts: list[str | int] = []
    for part in m.group(1).split("."):
        name, _, index = part.partition("[")
        parts.append(name)
        if index:
            parts.append(int(index.rstrip("]")))
    return parts, m.group(2)


def _problems_of(exc: ValidationError, text: str) -> list[Problem]:
    found = []
    for e in exc.errors()[:50]:
        loc, msg = _located([p for p in e["loc"] if p != ""], e["msg"])
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        found.append(Problem(printable(where, limit=200), line_of(text, loc), msg))
    return found


def _reach(settings: Settings, text: str) -> list[Problem]:
    """Policies that can never act where they point."""
    found = []
    for i, policy in enumerate(settings.policies):
        where = f"policies[{i}]"
        line = line_of(text, ["policies", i])
        if policy.action not in ACTIONS:
            continue  # named by the settings' own checks
        needs = action_class(policy.action).needs
        targets = settings.targets_of(policy)
        if policy.source == "probe" and not targets:
            found.append(Problem(where, line, f"{policy.name!r} matches no probe: it never acts"))
            continue
        for target in sorted(targets or ()):
            service = settings.service(target)
            executor = settings.executor_of(target)
            kind = settings.executors[executor].kind if executor else None
            if "executor" in needs and kind in (None, "none"):
                found.append(
                    Problem(
                        where,
                        line,
                        f"{policy.name!r} ({policy.action}) cannot reach {target}: no executor "
                        "acts on it (`executor` on the service, or one `[executors.NAME]`)",
                    )
                )
            if "component" in needs and (service is None or not service.component):
                found.append(
                    Problem(
                        where,
                        line,
                        f"{policy.name!r} ({policy.action}) cannot reach {target}: the service "
                        "names no `component` (its process, as the executor knows it)",
                    )
                )
    return found


def check(path: Path) -> tuple[Settings | None, list[Problem]]:
    """The settings the file gives (None if it gives none) and every problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem("", None, f"cannot read {path}: {exc.strerror}")]
    except UnicodeDecodeError as exc:
        return None, [Problem("", None, f"{path} is not UTF-8 text (byte {exc.start})")]
    try:
        values = read_targets(path)
    except ConfigError as exc:
        return None, [Problem("", None, str(exc))]
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        return None, _problems_of(exc, text)
    problems: list[Problem] = []
    for i, spec in enumerate(settings.probes):
        try:
            build_probe(spec.kind, spec.name, spec.params, spec.timeout_s)
        except (ValueError, KeyError) as exc:
            problems.append(Problem(f"probes[{i}]", line_of(text, ["probes", i]), str(exc)))
    built: dict[str, Executor] = {}
    for name, executor in settings.executors.items():
        try:
            # its params; connects nowhere
            built[name] = build_executor(name, executor.kind, executor.params)
        except ExecutorConfigError as exc:
            problems.append(
                Problem(f"executors.{name}", line_of(text, ["executors", name]), str(exc))
            )
    for i, service in enumerate(settings.services):
        acting = built.get(settings.executor_of(service.name) or "")
        knows = getattr(acting, "knows", None)  # an executor that lists its components
        if service.component and knows is not None and not knows(service.component):
            problems.append(Problem(
                f"services[{i}].component", line_of(text, ["services", i]),
                f"{service.component!r} is none of its executor's components: no action on "
                f"{service.name} can start, stop or fence it",
            ))  # fmt: skip
    problems += _reach(settings, text)
    return settings, problems


def probe_once(settings: Settings) -> list[tuple[str, ProbeResult]]:
    """Each probe run once, in the file's order (what it would report now)."""
    results = []
    for spec in settings.probes:
        probe = build_probe(spec.kind, spec.name, spec.params, spec.timeout_s)
        try:
            results.append((spec.name, probe.run()))
        except Exception as exc:  # a probe bug: report it, run the others
            results.append((spec.name, ProbeResult(probe.unreachable, f"crashed: {exc!r}")))
    return results


def describe(value: Any) -> str:
    return printable(str(value), limit=300)


@click.command("check-config")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--probe", "run_probes", is_flag=True, help="run each probe once, print results")
def check_config_command(file: Path, run_probes: bool) -> None:
    """Check the targets FILE: keys, types, references, and whether each policy can act where
    it points. Never acts. Exit status 1 when anything is wrong."""
    settings, problems = check(file)
    for problem in problems:
        click.echo(str(problem))
    if settings is not None and run_probes:
        for name, result in probe_once(settings):
            click.echo(f"probe {name}: {result.health} ({result.latency_ms:.0f} ms) "
                       f"{describe(result.summary)}")  # fmt: skip
    if problems:
        click.echo(f"{file}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    assert settings is not None
    click.echo(
        f"{file}: ok ({len(settings.services)} services, {len(settings.probes)} probes, "
        f"{len(settings.policies)} policies, {len(settings.executors)} executors)"
    )
