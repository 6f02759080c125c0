"""Test hosts as Linux network namespaces, each joined to this machine by a veth pair.

A worker started in a namespace reaches Redis, S3 and the sandbox only over its veth
link, so taking the link down cuts that host off the network, as a real outage does:
its connections hang rather than fail at once.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import uuid


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetnsHost:
    def __init__(self, index: int, net: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"sb{tag}h{index}"
        self.outer, self.inner = f"sb{tag}o{index}", f"sb{tag}i{index}"
        self.gateway = f"10.{net}.{index}.1"  # this machine, as the host sees it
        self.address = f"10.{net}.{index}.2"

    def create(self) -> NetnsHost:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.name)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        _ip("-n", self.name, "addr", "add", f"{self.address}/24", "dev", self.inner)
        _ip("-n", self.name, "link", "set", self.inner, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def wrap(self, cmd: list[str]) -> list[str]:
        """The command run inside this host (`ip netns exec` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def cut(self) -> None:
        _ip("link", "set", self.outer, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.outer, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


class Network:
    """Hosts plus one service address on this machine that every host routes to (Redis, S3 and
    the service all listen there, as they would on one address of a real network)."""

    def __init__(self, hosts: list[NetnsHost], net: int) -> None:
        self.hosts = hosts
        self.service_address = f"10.{net}.0.1"

    def create(self) -> Network:
        _ip("addr", "add", f"{self.service_address}/32", "dev", "lo")
        for h in self.hosts:
            _ip("-n", h.name, "route", "add", f"{self.service_address}/32", "via", h.gateway)
        return self

    def delete(self) -> None:
        cmd = ["ip", "addr", "del", f"{self.service_address}/32", "dev", "lo"]
        subprocess.run(cmd, capture_output=True, timeout=10)
        for h in self.hosts:
            h.delete()


def make_network(count: int) -> Network:
    """Fails with a clear message where the machine refuses namespaces (no root, no iproute2)."""
    if shutil.which("ip") is None:
        raise RuntimeError("`ip` (iproute2) is not installed: network-namespace hosts need it")
    net = random.Random().randrange(100, 250)
    network = Network([], net)
    try:
        for i in range(1, count + 1):
            network.hosts.append(NetnsHost(i, net).create())
        network.create()
    except subprocess.CalledProcessError as exc:
        network.delete()
        raise RuntimeError(f"cannot create a network namespace: {exc.stderr.decode(errors='replace')}") from None
    return network
