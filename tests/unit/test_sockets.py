"""Reading who holds the DNS listeners from the kernel's socket tables."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from agent.node.sockets import Listener, UdpQueues, _address, listeners, serves
from harness.waiting import poll

LOCAL = ipaddress.ip_address("169.254.20.10")
V6 = ipaddress.ip_address("fd00::10")


def test_addresses_read_as_the_kernel_writes_them() -> None:
    assert _address("0A14FEA9:0035") == (LOCAL, 53)
    assert _address("00000000000000000000000001000000:1F90") == (ipaddress.ip_address("::1"), 8080)
    assert _address("000000FD000000000000000010000000:0035") == (V6, 53)


def test_tables_list_bound_udp_and_only_listening_tcp(tmp_path: Path) -> None:
    net = tmp_path / "net"
    net.mkdir()
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    )
    (net / "udp").write_text(
        header + "  1: 0A14FEA9:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 111\n"
    )
    (net / "tcp").write_text(
        header
        + "  1: 0A14FEA9:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 222\n"
        + "  2: 0A14FEA9:0035 0100000A:D431 01 00000000:00000000 00:00000000 00000000 0 0 333\n"
    )
    found = listeners(tmp_path)
    assert found == [Listener("udp", LOCAL, 53, 111), Listener("tcp", LOCAL, 53, 222)]


def test_serves_tells_this_process_from_another_on_every_address() -> None:
    ours = [Listener("udp", LOCAL, 53, 1), Listener("tcp", LOCAL, 53, 2)]
    theirs = [Listener("udp", LOCAL, 53, 3), Listener("tcp", LOCAL, 53, 4)]
    assert serves(ours, {1, 2}, [LOCAL], 53, ours=True)
    assert not serves(ours, {1, 2}, [LOCAL], 53, ours=False)
    assert serves(ours + theirs, {1, 2}, [LOCAL], 53, ours=False)
    assert not serves(ours[:1], {1}, [LOCAL], 53, ours=True)  # TCP not bound yet
    assert not serves(ours, {1, 2}, [LOCAL, V6], 53, ours=True)  # one address missing
    wildcard = [
        Listener("udp", ipaddress.ip_address("0.0.0.0"), 53, 5),
        Listener("tcp", ipaddress.ip_address("0.0.0.0"), 53, 6),
    ]
    assert serves(wildcard, {5, 6}, [LOCAL], 53, ours=True)


def test_udp_queues_counts_unread_bytes_per_address_on_one_port_only() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:  # fmt: skip
        server.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        queues = UdpQueues(port, [socket.AF_INET, socket.AF_INET6])
        try:
            loopback = ipaddress.ip_address("127.0.0.1")
            assert queues.read() == {loopback: 0}  # only this port's socket, nothing waiting
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"x" * 100, ("127.0.0.1", port))
                client.sendto(b"y" * 100, other.getsockname())
            assert poll(lambda: queues.read()[loopback] >= 100, 2)
            server.recv(200)
            assert queues.read() == {loopback: 0}
        finally:
            queues.close()
