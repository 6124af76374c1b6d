"""Two "nodes" on this machine: network namespaces joined by veth pairs, addresses only inside them.

    with two_nodes() as nodes:       # nodes[i].netns, .addr, .hostname; the interface is IFNAME in each
        subprocess.run(nodes[0].enter(["python", ...]))

Each node is a namespace with its own loopback and one interface, ``IFNAME`` (the same name in both, so one
GLOO_SOCKET_IFNAME serves every node), at ``10.<net>.0.<i + 1>/24``. The namespaces are joined through a
bridge in the host namespace at ``.254`` (a SLURM controller in the host namespace reaches the nodes
there) — the nodes talk to each other over the veth ends and the bridge, never over the host's interfaces.
A hosts file names both nodes; :meth:`Node.enter` runs a command inside the namespace with its own host
name (UTS namespace) and that hosts file bind-mounted over /etc/hosts (a private mount namespace), which
is what torchrun's rendezvous and slurmd need to find each other by name.

Needs root, iproute2 (`ip`), util-linux (`nsenter`, `unshare`): `.ci/run` installs them. Every step that
the machine refuses skips the test saying which command failed and what it printed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

IFNAME = "htx0"


@dataclass(frozen=True)
class Node:
    netns: str
    hostname: str
    addr: str
    hosts_file: Path

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` as run inside this node: its network namespace, host name and hosts file."""
        script = f'mount --bind {self.hosts_file} /etc/hosts && hostname {self.hostname} && exec "$@"'
        return [
            "nsenter",
            f"--net=/var/run/netns/{self.netns}",
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            *argv,
        ]


def skip_reason() -> str | None:
    missing = [b for b in ("ip", "nsenter", "unshare") if not shutil.which(b)]
    if missing:
        return f"two-node tests need {', '.join(missing)} (iproute2, util-linux; .ci/run installs them)"
    if os.geteuid() != 0:
        return "two-node tests need root (network namespaces, veth pairs)"
    return None


def _step(argv: list[str]) -> None:
    """Run one set-up command; if the machine refuses it, skip naming the command and its output."""
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"this machine refused `{' '.join(argv)}`: {(run.stderr or run.stdout).strip()[:300]}")


@contextmanager
def two_nodes(tag: str, net: int = 251):
    """Namespaces ``htx-<tag>-1`` and ``-2``, bridge ``htx<tag>br``; everything is deleted afterwards."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    prefix = f"10.{net}.0"
    bridge = f"hb{tag}"[:15]
    names = [f"htx-{tag}-{i}" for i in (1, 2)]
    hosts_dir = Path(tempfile.mkdtemp(prefix="htx-hosts-"))
    hosts = hosts_dir / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{prefix}.{i} node{i}\n" for i in (1, 2)) + f"{prefix}.254 controller\n"
    )
    hosts.chmod(0o644)
    undo: list[list[str]] = []
    try:
        _step(["ip", "link", "add", bridge, "type", "bridge"])
        undo.append(["ip", "link", "del", bridge])
        _step(["ip", "addr", "add", f"{prefix}.254/24", "dev", bridge])
        _step(["ip", "link", "set", bridge, "up"])
        nodes = []
        for i, ns in enumerate(names, start=1):
            outer, inner = f"hv{tag}{i}"[:15], f"hn{tag}{i}"[:15]
            _step(["ip", "netns", "add", ns])
            undo.append(["ip", "netns", "del", ns])
            _step(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            undo.append(["ip", "link", "del", outer])
            _step(["ip", "link", "set", inner, "netns", ns])
            _step(["ip", "-n", ns, "link", "set", inner, "name", IFNAME])
            _step(["ip", "-n", ns, "addr", "add", f"{prefix}.{i}/24", "dev", IFNAME])
            _step(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            _step(["ip", "-n", ns, "link", "set", "lo", "up"])
            _step(["ip", "link", "set", outer, "master", bridge])
            _step(["ip", "link", "set", outer, "up"])
            nodes.append(Node(ns, f"node{i}", f"{prefix}.{i}", hosts))
        ping = subprocess.run(
            ["ip", "netns", "exec", names[0], "python3", "-c", _CONNECT, f"{prefix}.2"], capture_output=True, text=True
        )
        if ping.returncode != 0 and "refused" not in ping.stderr + ping.stdout:
            pytest.skip(f"node1 cannot reach node2 over the veth pairs: {(ping.stderr or ping.stdout).strip()[:300]}")
        yield nodes
    finally:
        for argv in reversed(undo):
            subprocess.run(argv, capture_output=True)
        shutil.rmtree(hosts_dir, ignore_errors=True)


# A TCP connection attempt to port 9 ("discard", nothing listens): "refused" proves the route works.
_CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout(3)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    print("refused"); sys.exit(0)
"""
