"""HttpProbe: status code, latency, and optionally a string the body must contain.

`check` uses requests, in the calling thread; `check_async` sends the same GET over asyncio
streams (HTTP/1.1, `Connection: close`), so one event loop can keep a thousand of them in
flight at the cost of a socket each. Both judge the answer with `judge`."""

from __future__ import annotations

import asyncio
import ssl
import time
from functools import lru_cache
from urllib.parse import urlsplit

import requests
from pydantic import Field

from probes.base import Health, Params, Probe, ProbeResult, describe, down, opened

MAX_BODY_BYTES = 1 << 20  # a health page is small: read no more than this of a body
MAX_HEADER_LINES = 100


class HttpParams(Params):
    url: str = Field(pattern=r"^https?://")
    expect_status: int = 200
    body_contains: str | None = None
    degraded_body_contains: str | None = None  # e.g. '"status":"degraded"' on /readyz
    slow_ms: float | None = Field(default=None, gt=0)


class ProtocolError(ValueError):
    """The server's answer is not HTTP/1.x."""


def judge(p: HttpParams, status: int, body: str, elapsed_ms: float) -> ProbeResult:
    details = {"url": p.url, "status": status}
    if status != p.expect_status:
        return down(f"HTTP {status}, expected {p.expect_status}", **details)
    if p.body_contains is not None and p.body_contains not in body:
        return down(f"body lacks {p.body_contains!r}", **details)
    if p.degraded_body_contains is not None and p.degraded_body_contains in body:
        return ProbeResult(Health.DEGRADED, "reports itself degraded", details=details)
    if p.slow_ms is not None and elapsed_ms > p.slow_ms:
        return ProbeResult(
            Health.DEGRADED, f"slow: {elapsed_ms:.0f} ms > {p.slow_ms:g} ms", details=details
        )
    return ProbeResult(Health.UP, f"HTTP {status}", details=details)


class HttpProbe(Probe):
    kind = "http"
    Params = HttpParams

    def check(self) -> ProbeResult:
        p: HttpParams = self.params  # type: ignore[assignment]
        try:
            response = requests.get(p.url, timeout=self.timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            return down(describe(exc), url=p.url)
        return judge(
            p, response.status_code, response.text, response.elapsed.total_seconds() * 1000
        )

    async def check_async(self) -> ProbeResult:
        """As `check`, on the running event loop; the whole exchange within `timeout_s`."""
        p: HttpParams = self.params  # type: ignore[assignment]
        try:
            async with asyncio.timeout(self.timeout_s):
                status, body, elapsed_ms = await get(p.url)
        except TimeoutError:
            return down(f"TimeoutError: no answer within {self.timeout_s:g} s", url=p.url)
        except (OSError, ProtocolError, UnicodeError) as exc:
            return down(describe(exc), url=p.url)
        return judge(p, status, body, elapsed_ms)


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


async def get(url: str) -> tuple[int, str, float]:
    """GET `url` without redirects: (status, body text, ms until the headers were read)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    started = time.perf_counter()
    reader, writer = await opened(
        asyncio.open_connection(host, port, ssl=_tls() if tls else None, limit=MAX_BODY_BYTES),
        lambda streams: streams[1].close(),
    )
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: shopguard-probe\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        status, headers = await _read_head(reader)
        elapsed_ms = (time.perf_counter() - started) * 1000
        body = await _read_body(reader, status, headers)
    finally:
        writer.close()
    return status, body.decode(_charset(headers), errors="replace"), elapsed_ms


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    version, _, rest = line.decode("latin-1").partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(rest[:3]), headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ProtocolError(f"more than {MAX_HEADER_LINES} header lines")


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bytes:
    if status < 200 or status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while len(body) < MAX_BODY_BYTES:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                break
            body += await reader.readexactly(size)
            await reader.readline()  # the CRLF after the chunk
        return bytes(body[:MAX_BODY_BYTES])
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ProtocolError(f"bad Content-Length {length[:40]!r}")
        return await reader.readexactly(min(int(length), MAX_BODY_BYTES))
    return await reader.read(MAX_BODY_BYTES)  # until the server closes (Connection: close)


def _charset(headers: dict[str, str]) -> str:
    for param in headers.get("content-type", "").split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
            try:
                "".encode(charset)
            except LookupError:
                break
            return charset
    return "utf-8"
