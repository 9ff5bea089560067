"""InvariantProbe: the shop's business invariants (pgcluster.invariants) as a probe: DOWN when
they fail, UNKNOWN (not DOWN) when the databases cannot be read: a database that fails over is
the database probes' concern, and no reason to doubt the data."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from pgcluster import invariants
from probes.base import Health, Params, Probe, ProbeResult


class InvariantParams(Params):
    orders_dsn: str
    inventory_dsn: str
    # Deprecated and ignored: a two-phase commit in flight is recognised by its prepared half,
    # not by the age of its rows. Accepted so that older targets files still load.
    settle_s: float | None = Field(default=None, ge=0)


class InvariantProbe(Probe):
    kind = "invariant"
    Params = InvariantParams
    unreachable: ClassVar[Health] = Health.UNKNOWN

    def check(self) -> ProbeResult:
        p: InvariantParams = self.params  # type: ignore[assignment]
        verdict = invariants.check(p.orders_dsn, p.inventory_dsn, timeout_s=self.timeout_s)
        if not verdict.readable:
            return ProbeResult(self.unreachable, f"cannot read the data: {verdict.error}")
        if verdict.problems:
            return ProbeResult(Health.DOWN, "; ".join(verdict.problems), details=verdict.details)
        summary = f"{verdict.details['orders']} orders consistent"
        if verdict.details["in_flight_count"]:
            summary += f", {verdict.details['in_flight_count']} in a two-phase commit in flight"
        return ProbeResult(Health.UP, summary, details=verdict.details)
