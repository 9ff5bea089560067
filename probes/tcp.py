"""TcpProbe: does the port accept a connection within the timeout."""

from __future__ import annotations

import socket

from pydantic import Field

from probes.base import Health, Params, Probe, ProbeResult, describe, down


class TcpParams(Params):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class TcpProbe(Probe):
    kind = "tcp"
    Params = TcpParams

    def check(self) -> ProbeResult:
        p: TcpParams = self.params  # type: ignore[assignment]
        try:
            with socket.create_connection((p.host, p.port), timeout=self.timeout_s):
                pass
        except OSError as exc:
            return down(describe(exc), host=p.host, port=p.port)
        return ProbeResult(Health.UP, f"{p.host}:{p.port} accepts connections")
