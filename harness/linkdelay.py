"""A fixed one-way delay on a sandbox link, for a kernel without ``tc netem``.

The machines' kernel is built without the netem qdisc (``CONFIG_NET_SCH_NETEM`` is not set; ``tc qdisc add
… netem`` answers "Specified qdisc kind is unknown"), but it has NFQUEUE. So the delay is made in user
space: iptables rules in one namespace send the link's packets to an nfnetlink queue, and this program, run
in that namespace, holds each packet for the delay and then lets it go (``NF_ACCEPT``). Packets leave in the
order they arrived, so one batch verdict (every id up to N) releases all packets that have waited long
enough; a packet whose notification was lost (a full netlink buffer) is released by the next batch too.

    ip netns exec NS python -m harness.linkdelay --queue 7 --delay-ms 0.5

prints ``ready`` once bound to the queue, runs until SIGTERM or SIGINT (or ``--max-seconds``), and prints
one JSON line: packets delayed and the largest lateness of a release past its due time. The protocol is
nfnetlink_queue's (linux/netfilter/nfnetlink_queue.h), spoken over a plain netlink socket.
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
MAX_SECONDS = 600.0
QUEUE_LENGTH = 100_000  # packets held at once: 10 000 qps x 0.2 s is 2 000 queries, each a few packets


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


class DelayQueue:
    """One nfnetlink queue whose packets are each held ``delay`` seconds."""

    def __init__(self, queue: int, delay: float) -> None:
        self.queue, self.delay = queue, delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)), 1)
        self._config(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_LENGTH)),
            2,
        )
        self.sock.setblocking(False)
        self.held: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id)
        self.delayed = 0
        self.worst_lateness = 0.0

    def _config(self, attrs: bytes, seq: int) -> None:
        self.sock.send(
            _message(NFQNL_MSG_CONFIG, self.queue, attrs, flags=NLM_F_REQUEST | NLM_F_ACK, seq=seq)
        )
        reply = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"nfnetlink_queue config of queue {self.queue} refused")

    def receive(self) -> None:
        """Take every queued notification there is now; each packet is due ``delay`` after it came."""
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    packet_id = self._packet_id(data, offset + 20, offset + length)
                    if packet_id is not None:
                        self.held.append((now + self.delay, packet_id))
                offset += (length + 3) & ~3

    @staticmethod
    def _packet_id(data: bytes, start: int, end: int) -> int | None:
        while start + 4 <= end:
            length, kind = struct.unpack_from("=HH", data, start)
            if length < 4:
                return None
            if kind & 0x7FFF == NFQA_PACKET_HDR:
                return int(struct.unpack_from("!I", data, start + 4)[0])
            start += (length + 3) & ~3
        return None

    def release_due(self, *, everything: bool = False) -> None:
        """One batch verdict for every packet whose delay is over (``everything``: every packet held)."""
        now = time.monotonic()
        last = None
        while self.held and (everything or self.held[0][0] <= now):
            due, last = self.held.popleft()
            self.worst_lateness = max(self.worst_lateness, now - due)
            self.delayed += 1
        if last is not None:
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))

    def wait(self, until: float) -> None:
        """Sleep until a notification comes, the next packet is due, or ``until`` (at most 0.1 s, so a stop
        signal is seen: Python retries a select that a signal interrupted)."""
        due = self.held[0][0] if self.held else until
        timeout = max(0.0, min(due, until, time.monotonic() + 0.1) - time.monotonic())
        select.select([self.sock], [], [], timeout)


def main() -> int:
    p = argparse.ArgumentParser(prog="linkdelay")
    p.add_argument("--queue", type=int, required=True, help="the NFQUEUE number the rules send packets to")
    p.add_argument("--delay-ms", type=float, required=True, help="how long each packet is held")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="stop by itself after this long")
    a = p.parse_args()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    queue = DelayQueue(a.queue, a.delay_ms / 1000)
    print("ready", flush=True)
    end = time.monotonic() + min(a.max_seconds, MAX_SECONDS)
    while not stop and time.monotonic() < end:
        queue.wait(end)
        queue.receive()
        queue.release_due()
    queue.release_due(everything=True)
    print(json.dumps({"delayed": queue.delayed, "worst_late_ms": round(queue.worst_lateness * 1e3, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
