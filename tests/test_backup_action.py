"""The `backup` action on the shared stack: an operator's "take a backup now" is an intent the
engine runs: a base backup of the leader, verified against its manifest and drilled."""

from __future__ import annotations

from pathlib import Path

from lab.process import wait_until
from lab.stack import Stack
from remediation import pitr
from tests.test_controlplane import Api


def test_a_requested_backup_runs_as_an_action_and_leaves_a_drilled_backup(stack: Stack) -> None:
    api = Api(stack)
    before = {b.label for b in pitr.list_backups(Path(stack.layout.backups))}
    response = api.post(
        "/actions", {"action": "backup", "target": "shop-db-cluster", "reason": "operator: now"}
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    wait_until(
        lambda: api.get(f"/actions/{run_id}")["state"] in ("succeeded", "failed", "skipped"),
        timeout_s=90,
        what="the backup run done",
    )
    run = api.get(f"/actions/{run_id}")
    assert run["state"] == "succeeded", run
    output = next(a for a in run["audit"] if a["verb"] == "output")
    label = output["data"]["label"]
    assert label not in before
    assert output["data"]["drill"]["passed"] is True
    assert label in {b.label for b in pitr.list_backups(Path(stack.layout.backups))}
    # ... and it is in the catalog, verified, as a scheduled one would be.
    wait_until(
        lambda: any(
            b["label"] == label and b["verified_at"] for b in api.get("/backups")["backups"]
        ),
        timeout_s=30,
        what="the backup in the catalog, verified",
    )
