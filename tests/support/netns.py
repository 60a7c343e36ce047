"""Stand-in hosts for tests and benchmarks: Linux network namespaces joined to this one by veth pairs.

Each `Host` is a namespace `dicomflow-<run>-<letter>` with one veth pair: its end inside
holds `address`, the end in the main namespace holds `main_address` (a /30 of its own, in
10.0.0.0/8, chosen at random and checked against the addresses in use). Processes started
with `Host.popen` see only that link and their own loopback; `Host.cut` takes the link down
(the host drops off the network, its processes keep running). `HostNetwork` creates the
hosts and, whatever happens, kills what it started and deletes the namespaces and links.
Needs root (CAP_NET_ADMIN) and iproute2: `unavailable()` says why not when it cannot.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"


class NetnsError(RuntimeError):
    """An `ip` command failed; the message has the command and what it said."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, not permitted), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth pairs): run as root, as CI does"
    if not Path(IP).exists():
        return f"iproute2's {IP} is not installed"
    probe = f"dicomflow-probe-{secrets.token_hex(3)}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"ip netns add is not permitted here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One stand-in host: a namespace, its link to the main namespace, a state folder of its own."""

    name: str
    link: str
    address: str
    main_address: str
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path | None = None
              ) -> subprocess.Popen:
        """Start a process inside the namespace (its output to `log`); killed by `HostNetwork.close`."""
        with open(log, "ab") as out:
            # A group of its own: RQ's worker forks its scheduler process, which must go too.
            proc = subprocess.Popen([IP, "netns", "exec", self.name, *argv], env=env, cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)  # `ip netns exec` execs the command: this is its pid
        return proc

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        """Run a short command inside the namespace."""
        return subprocess.run([IP, "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=30, check=False)

    def cut(self) -> None:
        """Take the link down: the host is off the network (its processes keep running)."""
        _ip("link", "set", "dev", self.link, "down")

    def stop(self) -> None:
        """Terminate its processes and their children (SIGKILL after 10 s)."""
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # a worker stuck on a dead link, and forked children
            proc.wait(10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """`count` /30 networks in 10.0.0.0/8 that no address here is in."""
    used = [ipaddress.ip_interface(word).network for line in _ip("-o", "-4", "addr").stdout.splitlines()
            for word in line.split()[3:4]]
    base = None
    for _ in range(100):
        candidate = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            base = candidate
            break
    if base is None:
        raise NetnsError("no free 10.x.y.0/24 for the test hosts' links")
    return list(base.subnets(new_prefix=30))[:count]


class HostNetwork:
    """`count` hosts named by a fresh run id, created on enter and removed on exit (always)."""

    def __init__(self, root: Path, count: int = 2):
        self.run_id = secrets.token_hex(3)
        self.root = Path(root)
        self.count = count
        self.hosts: list[Host] = []

    def __enter__(self) -> HostNetwork:
        try:
            for letter, net in zip("abcdefgh"[: self.count], _free_subnets(self.count)):
                main_ip, host_ip = (str(a) for a in list(net.hosts())[:2])
                name = f"dicomflow-{self.run_id}-{letter}"
                link, peer = f"dfv{self.run_id}{letter}", f"dfp{self.run_id}{letter}"  # <= 15 characters
                folder = self.root / f"host-{letter}"
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                _ip("netns", "add", name)
                host = Host(name, link, host_ip, main_ip, folder)
                self.hosts.append(host)
                _ip("link", "add", link, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", name)
                _ip("addr", "add", f"{main_ip}/30", "dev", link)
                _ip("link", "set", link, "up")
                _ip("-n", name, "addr", "add", f"{host_ip}/30", "dev", peer)
                _ip("-n", name, "link", "set", peer, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process started in the hosts; delete their namespaces and links."""
        for host in self.hosts:
            host.stop()
        for host in self.hosts:
            _ip("netns", "del", host.name, check=False)  # deletes the peer, and so the pair
            _ip("link", "del", host.link, check=False)  # in case the namespace kept it
        self.hosts = []

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leftovers(self) -> list[str]:
        """Namespaces, links or processes of this run still present (none after close): processes
        are found by the namespace names in their command lines (the workers' names hold them)."""
        names = _ip("netns", "list").stdout + _ip("-o", "link").stdout
        found = {word.rstrip(":").split("@")[0] for word in names.split()
                 if self.run_id in word and (word.startswith("dicomflow-") or word.startswith("df"))}
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if f"dicomflow-{self.run_id}-".encode() in cmdline.read_bytes():
                    found.add(f"process {cmdline.parent.name}")
            except OSError:
                continue
        return sorted(found)
