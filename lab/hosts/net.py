"""The multi-host lab's network: each host a network namespace with one address, all joined by a
bridge in this (the "operator's") namespace, which has the subnet's first address. Faults as
the world makes them:

- a partition drops packets both ways (nftables in the host's namespace, no RST, no FIN);
- a hung host is every process of it stopped (SIGSTOP), its sshd included.

Every name made here starts with the lab's prefix (`sg` + its id): `down` removes them all,
and `leftovers` says what of them is still there."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.errors import LabError

HOSTS = ("db-1", "db-2", "app-1", "app-2", "cp", "mon")
PARTITION_TABLE = "shopguard_partition"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def free_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no address of this namespace is in."""
    rng = rng or random.Random()
    used = ip("-4", "-o", "addr").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{rng.randint(200, 207)}.{rng.randint(0, 255)}.0/24")
        if f" {net.network_address + 1}/" not in used and str(net)[:-5] not in used:
            return net
    raise LabError("no free /24 in 10.200.0.0/13 for the lab's hosts")


@dataclass(frozen=True, slots=True)
class HostNet:
    lab_id: str  # a few hex digits: every name here carries it
    subnet: ipaddress.IPv4Network
    hosts: tuple[str, ...] = HOSTS

    @classmethod
    def new(cls, hosts: Sequence[str] = HOSTS) -> HostNet:
        return cls(os.urandom(2).hex(), free_subnet(), tuple(hosts))

    @property
    def prefix(self) -> str:
        return f"sg{self.lab_id}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        """This namespace's address on the bridge: where the tests and the load come from."""
        return str(self.subnet.network_address + 1)

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return str(self.subnet.network_address + 11 + self.hosts.index(host))

    def _veth(self, host: str) -> str:
        return f"{self.prefix}v{self.hosts.index(host)}"

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run on `host`: in its network namespace, and only that (`ip netns exec`
        would also give it a /sys of its own, without the cgroups its units live in)."""
        return ["nsenter", f"--net=/run/netns/{self.namespace(host)}", "--", *argv]

    # -- lifecycle -------------------------------------------------------------------------------
    def up(self) -> None:
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for host in self.hosts:
                ns = self.namespace(host)
                ip("netns", "add", ns)
                ip("link", "add", self._veth(host), "type", "veth", "peer", "name", "eth0",
                   "netns", ns)  # fmt: skip
                ip("link", "set", self._veth(host), "master", self.bridge, "up")
                ip("-n", ns, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}",
                   "dev", "eth0")  # fmt: skip
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise

    def pids(self, host: str) -> list[int]:
        done = ip("netns", "pids", self.namespace(host), check=False)
        return [int(x) for x in done.stdout.split()]

    def down(self) -> None:
        """Every process of every host killed, every namespace and link removed."""
        for host in self.hosts:
            for pid in self.pids(host):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for host in self.hosts:  # each pair with it (else it goes when the kernel gets to it)
            ip("link", "del", self._veth(host), check=False)
            ip("netns", "del", self.namespace(host), check=False)
        ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        names = ip("netns", "list").stdout.split()
        links = ip("-o", "link").stdout
        found = [n for n in names if n.startswith(f"{self.prefix}-")]
        found += [
            line.split(":")[1].strip().split("@")[0]
            for line in links.splitlines()
            if line.split(":")[1].strip().startswith(self.prefix)
        ]
        return found

    # -- faults ----------------------------------------------------------------------------------
    def partition(self, host: str, peers: Iterable[str] | None = None) -> None:
        """Drop every packet between `host` and `peers` (hosts of the lab; None: everything,
        this namespace included), both ways: nothing answers, nothing is reset."""
        addrs = [str(self.subnet)] if peers is None else [self.address(p) for p in peers]
        rules = (
            f"table inet {PARTITION_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority -10; ip saddr {{ {', '.join(addrs)} }} drop; }}\n"  # noqa: E501
            f"  chain output {{ type filter hook output priority -10; ip daddr {{ {', '.join(addrs)} }} drop; }}\n"  # noqa: E501
            "}\n"
        )
        self.heal(host)
        done = subprocess.run(
            self.exec_argv(host, ["nft", "-f", "-"]),
            input=rules,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise LabError(f"partition of {host}: {done.stderr.strip()}")

    def heal(self, host: str) -> None:
        subprocess.run(
            self.exec_argv(host, ["nft", "delete", "table", "inet", PARTITION_TABLE]),
            capture_output=True,
            check=False,
        )

    def hang(self, host: str) -> list[int]:
        """SIGSTOP every process of the host (its sshd and its services); returns them."""
        stopped = self.pids(host)
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return stopped

    def resume(self, host: str) -> None:
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def write_lines(path: Path, lines: Iterable[str], mode: int = 0o600) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
