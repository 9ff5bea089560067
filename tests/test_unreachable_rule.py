"""The rule for a node the control plane cannot reach (README, "Real hosts"), as the
failover applies it: pure, no servers. A node is promoted past unfenced only when commits
were synchronous and it answers neither SSH nor SQL; a standby that still hears from its
primary witnesses that the primary lives."""

from __future__ import annotations

import pytest

from pgcluster.nodes import NodeState, NodeView
from remediation.base import ActionError
from remediation.executors.base import ExecutorError
from remediation.executors.runners import HostHung, HostUnreachable
from remediation.failover import FailoverParams, primary_witness, promotes_past

NODES = {"pg0": "host=a", "pg1": "host=b"}


def fence_failed(cause: Exception) -> ActionError:
    try:
        raise ActionError(f"cannot fence pg0: {cause}") from cause
    except ActionError as exc:
        return exc


SILENT = NodeView("pg0", NodeState.UNANSWERED, "no answer within 0.5s")


@pytest.mark.parametrize("cause", [HostUnreachable("no route"), HostHung("no answer")])
def test_a_silent_node_on_an_unreached_host_is_passed_when_commits_were_synchronous(
    cause: Exception,
) -> None:
    assert promotes_past(FailoverParams(nodes=NODES), True, SILENT, fence_failed(cause))


@pytest.mark.parametrize(
    ("params", "synchronous", "view", "cause", "why"),
    [
        ({}, None, SILENT, HostUnreachable("x"), "commits not known synchronous"),
        ({}, False, SILENT, HostUnreachable("x"), "commits asynchronous"),
        ({"require_synchronous": False}, True, SILENT, HostUnreachable("x"), "no guarantee"),
        ({"promote_past_unreachable": False}, True, SILENT, HostUnreachable("x"), "turned off"),
        ({}, True, NodeView("pg0", NodeState.PRIMARY), HostUnreachable("x"), "it answers SQL"),
        ({}, True, NodeView("pg0", NodeState.REFUSED), HostUnreachable("x"), "it refuses"),
        ({}, True, SILENT, ExecutorError("survived SIGKILL"), "the fence ran and failed"),
    ],
)
def test_an_unreached_fence_blocks_the_promotion_in_every_other_case(
    params: dict[str, object],
    synchronous: bool | None,
    view: NodeView,
    cause: Exception,
    why: str,
) -> None:
    p = FailoverParams(nodes=NODES, **params)  # type: ignore[arg-type]
    assert not promotes_past(p, synchronous, view, fence_failed(cause)), why


def standby(heard_s_ago: float | None, receiving: str = "streaming") -> NodeView:
    return NodeView("pg1", NodeState.STANDBY, receiving=receiving, heard_s_ago=heard_s_ago)


def test_a_standby_that_still_hears_its_primary_witnesses_that_it_lives() -> None:
    reason = primary_witness([SILENT, standby(0.4)], 3.0)
    assert reason is not None and "cut off from the control plane only" in reason
    # A third node that refused does not silence the witness of a primary that is silent.
    refused = NodeView("pg2", NodeState.REFUSED, "connection refused")
    assert primary_witness([SILENT, refused, standby(0.4)], 3.0) is not None


@pytest.mark.parametrize(
    ("views", "why"),
    [
        ([SILENT, standby(3.5)], "it has not heard from it for longer than the window"),
        ([SILENT, standby(None)], "it never heard from it"),
        ([SILENT, standby(0.2, receiving="waiting")], "it no longer streams"),
        ([NodeView("pg0", NodeState.REFUSED), standby(0.2)], "the primary refused: dead"),
    ],
)
def test_no_witness_holds_the_failover_back_otherwise(views: list[NodeView], why: str) -> None:
    assert primary_witness(views, 3.0) is None, why
