"""HostsLab: the multi-host lab's hosts, each a network namespace (`net.py`) running Debian's
sshd and what stands in for systemd (`fake_systemctl.py`: units, a cgroup each, `supervise`
for Restart=always). The control plane reaches them only over SSH, as an operator's would:

- one host key per host, in a known_hosts file; one client key, the only way in (root, keys
  only: a real host would give a user of its own and sudo for systemctl and runuser);
- each host's units in `DIR/hosts/HOST/units/`, its fake systemctl's command line in
  `systemctl_argv` (the executor's `systemctl` param).

`down` (also `shoplab down`, from hosts.json) leaves no namespace, link, cgroup or process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.hosts.fake_systemctl import cgroup_root
from lab.hosts.net import HostNet, write_lines
from lab.process import is_port_open, wait_until
from remediation.executors.processes import spawn

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
HOSTS_FILE = "hosts.json"

SSHD_CONFIG = """\
# Written by the lab: keys only, this host's key, its own pid file and log.
ListenAddress {address}:{port}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# The lab's directories are root's, not the user's home: sshd's ownership checks do not fit.
StrictModes no
# Steps run side by side on one connection (a failover fences while a probe looks).
MaxSessions 64
MaxStartups 64
ClientAliveInterval 5
# The login shell (root's bash here) reads ~/.bashrc for every command sshd runs, unless it is
# a nested shell: on this machine that file costs ~100 ms a step (pyenv). Not a host's state.
SetEnv SHLVL=1
"""


@dataclass(slots=True)
class HostsLab:
    data_dir: Path
    net: HostNet = field(default_factory=HostNet.new)

    # -- where things are ------------------------------------------------------------------------
    @property
    def ssh_dir(self) -> Path:
        return self.data_dir / "ssh"

    @property
    def client_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    def host_dir(self, host: str) -> Path:
        return self.data_dir / "hosts" / host

    def units_dir(self, host: str) -> Path:
        return self.host_dir(host) / "units"

    @property
    def cgroup_prefix(self) -> str:
        """The lab's own cgroup (each host's units under it), relative to a hierarchy."""
        return f"/shopguard/{self.net.prefix}"

    def cgroup_base(self, host: str) -> str:
        return f"{self.cgroup_prefix}/{host}"

    @property
    def systemctl_argv(self) -> list[str]:
        """Each host's systemctl: the fake, finding the host's units by its namespace."""
        return [sys.executable, "-m", "lab.hosts.fake_systemctl", "--lab", str(self.data_dir)]

    def address(self, host: str) -> str:
        return self.net.address(host)

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> None:
        self.data_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._write_state()
        try:
            self.net.up()
            self._keys()
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
            for host in self.net.hosts:
                self._host(host)
            for host in self.net.hosts:
                wait_until(
                    lambda h=host: is_port_open(self.address(h), SSH_PORT),  # type: ignore[misc]
                    timeout_s=10,
                    what=f"sshd of {host}",
                )
        except BaseException:
            self.down()
            raise

    def _write_state(self) -> None:
        write_lines(
            self.data_dir / HOSTS_FILE,
            [
                json.dumps(
                    {
                        "lab_id": self.net.lab_id,
                        "subnet": str(self.net.subnet),
                        "hosts": list(self.net.hosts),
                    }
                )
            ],
        )

    @classmethod
    def described(cls, data_dir: Path) -> HostsLab | None:
        """The hosts lab whose hosts.json is in `data_dir` (None: none)."""
        try:
            state = json.loads((data_dir / HOSTS_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        net = HostNet(state["lab_id"], IPv4Network(state["subnet"]), tuple(state["hosts"]))
        return cls(data_dir, net)

    def _keys(self) -> None:
        self.ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keygen(self.client_key)
        known = []
        for host in self.net.hosts:
            key = self.ssh_dir / f"host_{host}"
            keygen(key)
            known.append(f"{self.address(host)} {key.with_suffix('.pub').read_text().strip()}")
        write_lines(self.known_hosts, known)
        write_lines(
            self.ssh_dir / "authorized_keys",
            [self.client_key.with_suffix(".pub").read_text().strip()],
        )

    def _host(self, host: str) -> None:
        hdir = self.host_dir(host)
        units = self.units_dir(host)
        units.mkdir(mode=0o700, parents=True, exist_ok=True)
        (units / "host.json").write_text(json.dumps({"cgroup": self.cgroup_base(host)}))
        config = hdir / "sshd_config"
        config.write_text(
            SSHD_CONFIG.format(
                address=self.address(host),
                port=SSH_PORT,
                host_key=self.ssh_dir / f"host_{host}",
                pid_file=hdir / "sshd.pid",
                authorized_keys=self.ssh_dir / "authorized_keys",
            )
        )
        done = subprocess.run(
            self.net.exec_argv(host, [SSHD, "-f", str(config), "-E", str(hdir / "sshd.log")]),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"sshd of {host}: {done.stderr.strip()}")
        # What stands in for systemd on the host: Restart=always.
        spawn(
            self.net.exec_argv(host, [*self.systemctl_argv, "supervise"]),
            log_path=hdir / "supervise.log",
        )

    def add_unit(self, host: str, unit: str, spec: Mapping[str, Any]) -> None:
        """A unit file on `host`: argv, log, and optionally user, env, cwd, kill_signal,
        timeout_stop_s, restart ("always" or "no")."""
        path = self.units_dir(host) / f"{unit}.json"
        path.write_text(json.dumps(dict(spec), indent=2))

    def systemctl(self, host: str, *args: str, timeout_s: float = 60) -> str:
        """Run the host's systemctl on the host (as the lab, not over SSH)."""
        done = subprocess.run(
            self.net.exec_argv(host, [*self.systemctl_argv, *args]),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode not in (0, 3):
            raise LabError(f"systemctl {' '.join(args)} on {host}: {done.stderr.strip()}")
        return done.stdout

    def executor_params(
        self, components: Mapping[str, Mapping[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        """The `ssh` executor's params for `components` (each: unit, host, role...)."""
        hosts = sorted({str(c["host"]) for c in components.values()})
        return {
            "components": {name: dict(c) for name, c in components.items()},
            "hosts": {
                h: {"address": self.address(h), "user": "root", "key_file": str(self.client_key)}
                for h in hosts
            },
            "known_hosts": str(self.known_hosts),
            "systemctl": self.systemctl_argv,
            **extra,
        }

    def down(self) -> list[str]:
        """Stop everything; returns what is left (nothing, or the test fails)."""
        for host in self.net.hosts:
            self.net.resume(host)  # a hung host's processes: SIGKILL ends them stopped or not
        self.net.down()
        base = cgroup_root_or_none()
        if base is not None:
            group = base / self.cgroup_prefix.lstrip("/")
            for host in self.net.hosts:
                remove_cgroups(group / host)
            with contextlib.suppress(OSError):
                group.rmdir()
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / HOSTS_FILE).unlink()
        return self.leftovers()

    def leftovers(self) -> list[str]:
        left = self.net.leftovers()
        base = cgroup_root_or_none()
        if base is not None and (group := base / self.cgroup_prefix.lstrip("/")).exists():
            left.append(str(group))
        return left


def keygen(path: Path) -> None:
    if path.exists():
        return
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def cgroup_root_or_none() -> Path | None:
    try:
        return cgroup_root()
    except Exception:
        return None


def remove_cgroups(group: Path, timeout_s: float = 5.0) -> None:
    """Remove a unit's cgroups (each empty once its processes are reaped)."""
    if not group.exists():
        return
    deadline = time.monotonic() + timeout_s
    for sub in [*sorted((p for p in group.rglob("*") if p.is_dir()), reverse=True), group]:
        while True:
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def ensure_hosts_supported() -> None:
    """Root, iproute2, nft and sshd: what the multi-host lab needs of this machine."""
    if os.geteuid() != 0:
        raise LabError("the multi-host lab makes network namespaces: run it as root")
    for tool in ("ip", "nft", SSHD, "ssh-keygen"):
        if shutil.which(tool) is None:
            raise LabError(f"the multi-host lab needs {tool} (scripts/setup installs it)")
