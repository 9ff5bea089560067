"""TcpProbe: does the port accept a connection within the timeout (`check` in the calling
thread, `check_async` on the running event loop)."""

from __future__ import annotations

import asyncio
import socket

from pydantic import Field

from probes.base import Health, Params, Probe, ProbeResult, describe, down, opened


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
        return self._up(p)

    async def check_async(self) -> ProbeResult:
        p: TcpParams = self.params  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                transport, _ = await opened(
                    loop.create_connection(asyncio.Protocol, p.host, p.port),
                    lambda made: made[0].close(),
                )
        except TimeoutError:
            summary = f"TimeoutError: no connection within {self.timeout_s:g} s"
            return down(summary, host=p.host, port=p.port)
        except OSError as exc:
            return down(describe(exc), host=p.host, port=p.port)
        transport.close()
        return self._up(p)

    @staticmethod
    def _up(p: TcpParams) -> ProbeResult:
        return ProbeResult(Health.UP, f"{p.host}:{p.port} accepts connections")
