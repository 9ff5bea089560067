"""crash-in-doubt: a shop instance that dies between PREPARE and COMMIT PREPARED (the shop's
SHOP_FAILPOINT), on one order, and is not restarted: its two prepared halves stay in doubt
until the control plane's resolver finishes them by the decision log."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import ClassVar

import requests

from lab.chaos.base import BaseFault, ChaosError, FaultRecord, Stamp, record
from lab.layout import HOST
from lab.observe import StackView
from lab.process import is_port_free, wait_until
from remediation.executors.processes import instance_processes, kill_tree, spawn


class CrashInDoubt(BaseFault):
    kind: ClassVar[str] = "crash-in-doubt"
    expected_actions: ClassVar[frozenset[str]] = frozenset({"in_doubt"})
    target: ClassVar[str] = "shop-db"
    step: str = "after_decision"  # decided commit: the resolver must commit, not abort

    def run(self, view: StackView, *, duration_s: float) -> FaultRecord:
        recipe = view.components()[view.shops()[0]]["start"]
        port = next(p for p in range(view.port("pg0") + 20, 65000) if is_port_free(HOST, p))
        argv = list(recipe["argv"])
        argv[argv.index("-b") + 1] = f"{HOST}:{port}"
        instance = f"chaos-{uuid.uuid4().hex[:8]}"
        env = {**recipe["env"], "SHOP_INSTANCE_ID": instance, "SHOP_FAILPOINT": self.step}
        log = Path(view.data_dir / "logs" / f"{instance}.log")
        proc = spawn(argv, log_path=log, env_overrides=env)
        url = f"http://{HOST}:{port}"
        try:
            wait_until(lambda: requests.get(f"{url}/healthz", timeout=1).ok, timeout_s=30)
            started = Stamp.now()
            try:
                requests.post(
                    f"{url}/orders",
                    json={"product_id": 1, "quantity": 1, "customer": "chaos", "address": "x"},
                    headers={"Idempotency-Key": instance},
                    timeout=30,
                )
            except requests.ConnectionError:
                pass  # the worker died at the failpoint: what was wanted
            else:
                raise ChaosError(f"the shop with failpoint {self.step} did not crash")
        finally:
            kill_tree(instance_processes(proc.pid))
            proc.wait(timeout=10)
        return record(self.kind, instance, started, Stamp.now(), step=self.step, key=instance)

    def is_recovered(self, view: StackView) -> bool:
        return view.prepared_count() == 0
