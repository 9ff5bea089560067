"""Redis, Prometheus and Alertmanager for the lab: their configs and server processes.

Each is locked as an operator would lock it: Redis asks for a password (in its config file,
never on its command line), Alertmanager's API for basic auth (a bcrypt hash in its web
config; Prometheus sends its alerts with the password), and Prometheus has no lifecycle API
(`/-/reload`, `/-/quit`). Configs holding a secret, and every data directory, are the owner's
only."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import bcrypt
import requests
import yaml

from lab.binaries import Binaries
from lab.errors import LabError
from lab.layout import HOST, StackLayout
from lab.postgres import write_private
from lab.process import ServerProcess, is_port_open

RULES_FILE = "shop.rules.yml"
ALERTMANAGER_USER = "prometheus"  # whoever posts alerts: Prometheus, or an operator's amtool
# Alertmanager checks the hash on each request (and caches a success): Go's default cost.
BCRYPT_ROUNDS = 10
# Alerts labelled `audience: operator` (the control plane itself down: it cannot be told of its
# own death) go to a human instead, in the lab the webhook recorder, on this path of its own.
OPERATOR_LABEL = 'audience="operator"'
OPERATOR_PATH = "/alertmanager"


def http_ok(url: str, timeout_s: float = 0.5, auth: tuple[str, str] | None = None) -> bool:
    try:
        return requests.get(url, timeout=timeout_s, auth=auth).status_code == 200
    except requests.RequestException:
        return False


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def redis_url(layout: StackLayout, password: str) -> str:
    return f"redis://:{password}@{HOST}:{layout.redis_port}/0"


def redis_server(layout: StackLayout, binaries: Binaries, *, password: str) -> ServerProcess:
    workdir = private_dir(layout.data_dir / "redis")
    config = workdir / "redis.conf"
    write_private(config, f"requirepass {password}\n")
    return ServerProcess(
        name="redis",
        argv=[
            binaries.redis_server,
            str(config),
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


def prometheus_config(
    layout: StackLayout, *, with_controlplane: bool, alertmanager_password: str
) -> dict[str, Any]:
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
                {
                    "basic_auth": {
                        "username": ALERTMANAGER_USER,
                        "password": alertmanager_password,
                    },
                    "static_configs": [{"targets": [f"{HOST}:{layout.alertmanager_port}"]}],
                }
            ]
        },
        "rule_files": [str(layout.data_dir / "prometheus" / RULES_FILE)],
        "scrape_configs": scrape,
    }


def prometheus_server(
    layout: StackLayout,
    binaries: Binaries,
    *,
    alertmanager_password: str,
    with_controlplane: bool = False,
) -> ServerProcess:
    workdir = private_dir(layout.data_dir / "prometheus")
    private_dir(workdir / "data")
    rules = workdir / RULES_FILE
    rules.write_text(rules_path().read_text())
    check_rules(binaries, rules)
    config = workdir / "prometheus.yml"
    prometheus = prometheus_config(
        layout, with_controlplane=with_controlplane, alertmanager_password=alertmanager_password
    )
    write_private(config, yaml.safe_dump(prometheus))
    url = f"http://{HOST}:{layout.prometheus_port}"
    return ServerProcess(
        name="prometheus",
        argv=[
            binaries.prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address={HOST}:{layout.prometheus_port}",
            # No --web.enable-lifecycle: nobody reloads or stops it over HTTP.
            # Alerts reach Alertmanager within a second, not after the 1 min default resend.
            "--rules.alert.resend-delay=1s",
        ],
        log_path=layout.logs / "prometheus.log",
        ready=lambda: http_ok(f"{url}/-/ready"),
    )


def alertmanager_config(
    webhook_url: str, token: str | None, operator_url: str | None = None
) -> dict[str, Any]:
    """Every alert to the control plane's intake, but those for a human (`OPERATOR_LABEL`),
    which go to `operator_url` only."""
    webhook: dict[str, Any] = {"url": webhook_url, "send_resolved": True, "max_alerts": 0}
    if token:
        webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials": token}}
    route: dict[str, Any] = {
        "receiver": "controlplane",
        "group_by": ["alertname", "instance"],
        "group_wait": "1s",
        "group_interval": "5s",
        "repeat_interval": "1h",
    }
    receivers: list[dict[str, Any]] = [{"name": "controlplane", "webhook_configs": [webhook]}]
    if operator_url:
        route["routes"] = [{"receiver": "operator", "matchers": [OPERATOR_LABEL]}]
        operator = {"url": operator_url, "send_resolved": True, "max_alerts": 0}
        receivers.append({"name": "operator", "webhook_configs": [operator]})
    return {"route": route, "receivers": receivers}


def alertmanager_web_config(password: str) -> dict[str, Any]:
    """Basic auth on every endpoint of Alertmanager (its API, UI and /-/ready)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
    return {"basic_auth_users": {ALERTMANAGER_USER: hashed}}


def alertmanager_server(
    layout: StackLayout,
    binaries: Binaries,
    *,
    password: str,
    webhook_token: str | None = None,
) -> ServerProcess:
    workdir = private_dir(layout.data_dir / "alertmanager")
    private_dir(workdir / "data")
    config = workdir / "alertmanager.yml"
    webhook_url = f"http://{HOST}:{layout.controlplane_port}/api/v1/alerts"
    operator_url = f"http://{HOST}:{layout.receiver_port}{OPERATOR_PATH}"
    write_private(
        config, yaml.safe_dump(alertmanager_config(webhook_url, webhook_token, operator_url))
    )
    web_config = workdir / "web.yml"
    write_private(web_config, yaml.safe_dump(alertmanager_web_config(password)))
    url = f"http://{HOST}:{layout.alertmanager_port}"
    return ServerProcess(
        name="alertmanager",
        argv=[
            binaries.alertmanager,
            f"--config.file={config}",
            f"--web.config.file={web_config}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address={HOST}:{layout.alertmanager_port}",
            "--cluster.listen-address=",  # one Alertmanager: no gossip cluster
        ],
        log_path=layout.logs / "alertmanager.log",
        ready=lambda: http_ok(f"{url}/-/ready", auth=(ALERTMANAGER_USER, password)),
    )
