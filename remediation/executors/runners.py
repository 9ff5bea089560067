"""Where an executor's steps run: a shell on this host (`LocalRunner`) or on another host over
SSH (`SshRunner`, paramiko). A step is one small shell script, and one round trip: a step's
cost over SSH is one channel on a connection kept open (the first step pays the handshake).

What reaches a host is never assumed to have run there: a host that cannot be reached raises
`HostUnreachable`, one that stops answering mid-step `HostHung`, and neither is repeated here
(the caller decides: a fence that did not run is no fence)."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from remediation.executors.base import ExecutorError, Unreachable

logger = logging.getLogger(__name__)


class HostUnreachable(Unreachable):
    """No connection to the host (refused, no route, no answer): nothing ran there, and what
    runs there is unknown. A node on it is not fenced by this."""


class HostHung(Unreachable):
    """The host said nothing within a step's timeout: whether the step ran is unknown."""


class StepOverran(ExecutorError):
    """The host answered, then the step went quiet or ran over its time: the host lives, so
    this is not `Unreachable` (a fence that overran never counts as one that could not run)."""


def unreached(exc: BaseException, transport: paramiko.Transport | None) -> bool:
    """Did a connection attempt fail for want of the host (no route, no answer, never its
    SSH banner), rather than for what it said? A host whose every process is stopped accepts
    the TCP connection (the kernel does) and then says nothing: paramiko's error is then
    whatever step came next ("No existing session"), so what counts is whether the host ever
    spoke, not the error's words."""
    if isinstance(exc, OSError | EOFError):
        return True
    spoke = transport is not None and bool(getattr(transport, "remote_version", ""))
    return not spoke


@dataclass(frozen=True, slots=True)
class Done:
    returncode: int
    output: str  # stdout and stderr, as they came

    def tail(self, max_chars: int = 1500) -> str:
        return self.output.strip()[-max_chars:]


class Runner(Protocol):
    where: str  # "this host", "db-1 (10.0.0.11)": for messages

    def run(
        self,
        script: str,
        *,
        stdin: str | None = None,
        timeout_s: float,
        idle_timeout_s: float | None = None,
    ) -> Done:
        """Run `script`; HostHung after `timeout_s`, or after `idle_timeout_s` without a byte
        of output (a long step says it lives: a silent host is not waited on for all of it)."""
        ...

    def close(self) -> None: ...


class LocalRunner:
    where = "this host"

    def run(
        self,
        script: str,
        *,
        stdin: str | None = None,
        timeout_s: float,
        idle_timeout_s: float | None = None,  # this host does not go silent: the whole only
    ) -> Done:
        try:
            done = subprocess.run(
                ["sh", "-c", script],
                input=stdin or "",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # this host is never "unreached"
            raise StepOverran(f"a step on {self.where} ran over {timeout_s:g} s") from exc
        except ValueError as exc:  # a NUL in the script or its input
            raise ExecutorError(f"a step on {self.where} cannot be run: {exc}") from exc
        except OSError as exc:
            raise ExecutorError(f"cannot run a shell on {self.where}: {exc}") from exc
        return Done(done.returncode, done.stdout)

    def close(self) -> None:
        pass


class SshRunner:
    """One host over SSH: its key checked against `known_hosts` (an unknown or changed key is
    refused, never learnt), a private key only (no agent, no password), a timeout on the
    connection and on every step. One connection, opened at the first step and kept; a step
    that times out closes it (a hung host's connection is not trusted again)."""

    def __init__(
        self,
        name: str,
        *,
        address: str,
        port: int,
        user: str,
        key_file: Path,
        known_hosts: Path,
        connect_timeout_s: float,
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.user = user
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.connect_timeout_s = connect_timeout_s
        self.where = f"{name} ({address})"
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is not None and transport.is_active():
                return transport
            if client is not None:
                client.close()
            self._client = None
            client = paramiko.SSHClient()
            try:
                client.load_host_keys(str(self.known_hosts))
            except OSError as exc:
                raise ExecutorError(f"cannot read known_hosts {self.known_hosts}: {exc}") from exc
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            pkey = self._key()  # a bad key is the configuration's fault, never "unreachable"
            try:
                client.connect(
                    self.address,
                    port=self.port,
                    username=self.user,
                    pkey=pkey,
                    timeout=self.connect_timeout_s,
                    banner_timeout=self.connect_timeout_s,
                    auth_timeout=self.connect_timeout_s,
                    channel_timeout=self.connect_timeout_s,
                    allow_agent=False,
                    look_for_keys=False,
                )
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise ExecutorError(
                    f"{self.where} offered a host key other than known_hosts': refused ({exc})"
                ) from exc
            except paramiko.AuthenticationException as exc:
                client.close()
                raise ExecutorError(f"{self.where} refused the key of {self.user}: {exc}") from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                partial = client.get_transport()  # how far it got, before it is closed
                client.close()
                if "not found in known_hosts" in str(exc):
                    raise ExecutorError(
                        f"{self.where} is not in {self.known_hosts}: refused"
                    ) from exc
                if not unreached(exc, partial):
                    raise ExecutorError(f"{self.where}: SSH failed: {exc}") from exc
                raise HostUnreachable(
                    f"{self.where} unreachable within {self.connect_timeout_s:g} s: "
                    f"{exc or type(exc).__name__}"
                ) from exc
            transport = client.get_transport()
            if transport is None:  # pragma: no cover - connect() returns with one
                client.close()
                raise HostUnreachable(f"{self.where}: no transport after connect")
            # Each step is a few small packets each way: Nagle's wait on the peer's delayed
            # ACK would add ~40 ms to most of them.
            sock = transport.sock
            if isinstance(sock, socket.socket):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._client = client
            return transport

    def _key(self) -> paramiko.PKey:
        try:
            return paramiko.PKey.from_path(str(self.key_file))
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise ExecutorError(f"cannot read the key {self.key_file}: {exc}") from exc

    def _drop(self, transport: paramiko.Transport) -> None:
        with self._lock:
            if self._client is not None and self._client.get_transport() is transport:
                self._client.close()
                self._client = None

    def run(
        self,
        script: str,
        *,
        stdin: str | None = None,
        timeout_s: float,
        idle_timeout_s: float | None = None,
    ) -> Done:
        if "\0" in script or (stdin and "\0" in stdin):
            raise ExecutorError("a step may not hold a NUL character")
        started = time.monotonic()
        deadline = started + timeout_s
        idle_s = min(idle_timeout_s or timeout_s, timeout_s)
        transport = self._transport()
        chunks: list[bytes] = []
        # Until the step runs (a channel, the exec request, its stdin), paramiko waits for
        # the host without a timeout of its own: a host that stops then would hold it
        # forever. Its connection is closed at the idle timeout instead, which frees it.
        guard = threading.Timer(idle_s, transport.close)
        guard.daemon = True
        guard.start()
        channel: paramiko.Channel | None = None
        try:
            channel = transport.open_session(timeout=idle_s)
            channel.settimeout(idle_s)
            channel.set_combine_stderr(True)
            channel.exec_command(script)
            if stdin:
                channel.sendall(stdin.encode())
            channel.shutdown_write()
            guard.cancel()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                channel.settimeout(min(remaining, idle_s))
                data = channel.recv(65536)
                if not data:
                    break
                chunks.append(data)
            if not channel.status_event.wait(min(idle_s, max(0.0, deadline - time.monotonic()))):
                raise TimeoutError
            return Done(channel.recv_exit_status(), b"".join(chunks).decode(errors="replace"))
        except (TimeoutError, OSError, paramiko.SSHException, EOFError) as exc:
            self._drop(transport)
            took = time.monotonic() - started
            if chunks:
                # It answered, then went quiet or ran over: the host lives (a step that
                # overran, or a host that hung since). Never taken for an unreached one.
                raise StepOverran(
                    f"a step on {self.where} said {len(b''.join(chunks))} bytes, then nothing "
                    f"for {took:.1f} s: stopped (whether it finished there is unknown)"
                ) from exc
            raise HostHung(
                f"no answer from {self.where} within {took:.1f} s: treated as hung "
                f"(whether the step ran there is unknown; {exc or type(exc).__name__})"
            ) from exc
        finally:
            guard.cancel()
            if channel is not None:
                channel.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
