"""InvariantProbe: the shop's business invariants (pgcluster.invariants) as a probe: DOWN when
they fail, and, as every probe, DOWN when the databases cannot be read."""

from __future__ import annotations

from pydantic import Field

from pgcluster import invariants
from probes.base import Health, Params, Probe, ProbeResult, down


class InvariantParams(Params):
    orders_dsn: str
    inventory_dsn: str
    # Rows younger than this may belong to a two-phase commit still in flight.
    settle_s: float = Field(default=10.0, ge=0)


class InvariantProbe(Probe):
    kind = "invariant"
    Params = InvariantParams

    def check(self) -> ProbeResult:
        p: InvariantParams = self.params  # type: ignore[assignment]
        verdict = invariants.check(
            p.orders_dsn, p.inventory_dsn, settle_s=p.settle_s, timeout_s=self.timeout_s
        )
        if not verdict.readable:
            return down(verdict.error)
        if verdict.problems:
            return ProbeResult(Health.DOWN, "; ".join(verdict.problems), details=verdict.details)
        orders = verdict.details["orders"]
        return ProbeResult(
            Health.UP, f"{orders} settled orders consistent", details=verdict.details
        )
