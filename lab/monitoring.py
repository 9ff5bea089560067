"""Redis, Prometheus and Alertmanager for the lab: their configs and server processes."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import requests
import yaml

from lab.binaries import Binaries
from lab.errors import LabError
from lab.layout import HOST, StackLayout
from lab.process import ServerProcess, is_port_open

RULES_FILE = "shop.rules.yml"


def http_ok(url: str, timeout_s: float = 0.5) -> bool:
    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def redis_server(layout: StackLayout, binaries: Binaries) -> ServerProcess:
    workdir = layout.data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(
        name="redis",
        argv=[
            binaries.redis_server,
            "--port",
            str(layout.redis_port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ],
        log_path=layout.logs / "redis.log",
        ready=lambda: is_port_open(HOST, layout.redis_port),
    )


def rules_path() -> Path:
    return Path(str(resources.files("lab") / "rules" / RULES_FILE))


def check_rules(binaries: Binaries, path: Path) -> None:
    done = subprocess.run(
        [binaries.promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise LabError(f"promtool rejected {path}: {done.stdout}{done.stderr}")


def prometheus_config(layout: StackLayout, *, with_controlplane: bool) -> dict[str, Any]:
    scrape: list[dict[str, Any]] = [
        {
            "job_name": "shop",
            "static_configs": [
                {
                    "targets": [f"{HOST}:{layout.shop_port(i)}" for i in range(layout.shop_count)],
                    "labels": {"service": "shop"},
                }
            ],
        },
        {
            "job_name": "prometheus",
            "static_configs": [{"targets": [f"{HOST}:{layout.prometheus_port}"]}],
        },
    ]
    if with_controlplane:
        scrape.append(
            {
                "job_name": "controlplane",
                "static_configs": [{"targets": [f"{HOST}:{layout.controlplane_port}"]}],
            }
        )
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [f"{HOST}:{layout.alertmanager_port}"]}]}
            ]
        },
        "rule_files": [str(layout.data_dir / "prometheus" / RULES_FILE)],
        "scrape_configs": scrape,
    }


def prometheus_server(
    layout: StackLayout, binaries: Binaries, *, with_controlplane: bool = False
) -> ServerProcess:
    workdir = layout.data_dir / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    rules = workdir / RULES_FILE
    rules.write_text(rules_path().read_text())
    check_rules(binaries, rules)
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(prometheus_config(layout, with_controlplane=with_controlplane))
    )
    url = f"http://{HOST}:{layout.prometheus_port}"
    return ServerProcess(
        name="prometheus",
        argv=[
            binaries.prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={HOST}:{layout.prometheus_port}",
            "--web.enable-lifecycle",
            # Alerts reach Alertmanager within a second, not after the 1 min default resend.
            "--rules.alert.resend-delay=1s",
        ],
        log_path=layout.logs / "prometheus.log",
        ready=lambda: http_ok(f"{url}/-/ready"),
    )


def alertmanager_config(webhook_url: str, token: str | None) -> dict[str, Any]:
    webhook: dict[str, Any] = {"url": webhook_url, "send_resolved": True, "max_alerts": 0}
    if token:
        webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials": token}}
    return {
        "route": {
            "receiver": "controlplane",
            "group_by": ["alertname", "instance"],
            "group_wait": "1s",
            "group_interval": "5s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "controlplane", "webhook_configs": [webhook]}],
    }


def alertmanager_server(
    layout: StackLayout, binaries: Binaries, *, webhook_token: str | None = None
) -> ServerProcess:
    workdir = layout.data_dir / "alertmanager"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "alertmanager.yml"
    webhook_url = f"http://{HOST}:{layout.controlplane_port}/api/v1/alerts"
    config.write_text(yaml.safe_dump(alertmanager_config(webhook_url, webhook_token)))
    config.chmod(0o600)
    url = f"http://{HOST}:{layout.alertmanager_port}"
    return ServerProcess(
        name="alertmanager",
        argv=[
            binaries.alertmanager,
            f"--config.file={config}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={HOST}:{layout.alertmanager_port}",
            "--cluster.listen-address=",  # one Alertmanager: no gossip cluster
        ],
        log_path=layout.logs / "alertmanager.log",
        ready=lambda: http_ok(f"{url}/-/ready"),
    )
