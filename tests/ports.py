"""Ports for the servers and rank groups the tests start, safe with several pytest workers at once:
`free_port()` hands out ports from this process's own block, checked free by binding."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _port_block() -> range:
    """This process's own ports: a block per pytest worker (gw0, gw1, ...) just below the kernel's
    ephemeral range, so two workers never hand out the same port and no outgoing connection's
    ephemeral port can take one between the check here and the server's own bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    block = int(worker.removeprefix("gw")) % 8 if worker else 8  # 8: a process outside pytest-xdist
    size = max(64, min(1000, (low - 10000) // 9))
    start = low - size * (9 - block)
    return range(start, start + size)


_PORTS = _port_block()
_next = int.from_bytes(os.urandom(2), "little")  # a random start: another run's TIME_WAIT ports lie elsewhere


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to, from this process's block (`_port_block`)."""
    global _next
    for _ in range(len(_PORTS)):
        port = _PORTS[_next % len(_PORTS)]
        _next += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} on 127.0.0.1")
