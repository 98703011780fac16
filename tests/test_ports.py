"""The suite runs on several pytest workers at once: the ports its servers and rank groups take
(`ports.free_port`) must never be handed to two workers, nor be taken by an outgoing connection."""

import socket
from pathlib import Path

import ports


def test_each_worker_has_its_own_ports_below_the_ephemeral_range(monkeypatch):
    blocks = []
    for worker in [f"gw{i}" for i in range(8)] + [None]:
        if worker:
            monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        else:
            monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
        blocks.append(set(ports._port_block()))
    assert all(len(b) >= 64 for b in blocks)
    assert len(set().union(*blocks)) == sum(len(b) for b in blocks)  # disjoint
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(max(b) for b in blocks) < low and min(min(b) for b in blocks) >= 1024


def test_a_port_in_use_is_never_handed_out():
    taken = []
    try:
        for _ in range(5):
            port = ports.free_port()
            assert port in ports._PORTS
            s = socket.socket()
            s.bind(("127.0.0.1", port))  # would raise had it been handed out while bound
            s.listen()
            taken.append(s)
        ports._next -= 5  # come round to the five bound ports again: each is skipped
        assert ports.free_port() not in {s.getsockname()[1] for s in taken}
    finally:
        for s in taken:
            s.close()
