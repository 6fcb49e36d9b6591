"""The agent's node networking, for real in the sandbox and in both iptables flavours: the interface, the
kernel-gated rules proven by their effect on real DNS traffic and the conntrack table, reconcile, the
xtables lock, teardown and leftovers.

The local DNS server is the real CoreDNS bound to the local addresses, answering every A query with
LOCAL_ANSWER, so an answer tells who served it: the node (LOCAL_ANSWER) or kube-dns (the Service's IP).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from agent.node.rules import wanted_rules
from harness import sandbox as sb
from harness.netdriver import REPO, DriverError, NetDriver
from harness.sandbox import KUBE_DNS_IP, KUBE_DNS_IP6, KUBE_DNS_UPSTREAM_IP, LOCAL_IP, LOCAL_IP6
from harness.waiting import poll

NAME = "web.default.svc.cluster.local"
KUBE_DNS_ANSWER = "10.96.10.20"
LOCAL_ANSWER = "192.0.2.53"
ALL_IPS = [LOCAL_IP, KUBE_DNS_IP, LOCAL_IP6, KUBE_DNS_IP6]
TAG = "NodeLocal DNS agent:"


class LocalServer:
    """The real CoreDNS in the node namespace, bound to the local addresses (never to the wildcard)."""

    def __init__(self, box: sb.Sandbox, ips: list[str]) -> None:
        self.box, self.ips = box, ips
        self.conf = box.workdir / "Corefile.local"
        self.conf.write_text(
            ".:53 {\n"
            f"    bind {' '.join(ips)}\n"
            f'    template IN A {{\n        answer "{{{{ .Name }}}} 5 IN A {LOCAL_ANSWER}"\n    }}\n'
            "}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.box.workdir / "local.log").open("ab") as log:
            self.proc = self.box.popen(
                self.box.node, [sb.COREDNS, "-conf", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        # The link-local addresses are never DNATed: an answer there comes from this server.
        for ip in (ip for ip in self.ips if ip in (LOCAL_IP, LOCAL_IP6)):
            assert poll(partial(self.answers, ip), 5), f"the local server does not answer on {ip}"

    def answers(self, ip: str) -> bool:
        return node_dig(self.box, ip) == LOCAL_ANSWER

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


@contextlib.contextmanager
def agent_net(
    box: sb.Sandbox, *, ips: list[str] | None = None, ensure: bool = True, **spec: object
) -> Iterator[NetDriver]:
    """The agent's networking in the node, the interface ensured unless told not to; the xtables lock is
    the sandbox's own, never the machine's /run/xtables.lock."""
    spec = {"local_ips": ips or ALL_IPS, "xtables_lock": str(lock_file(box)), "xtables_wait": 1.0, **spec}
    with NetDriver(box, box.workdir / "netdriver.log", **spec) as driver:
        try:
            if ensure:
                driver.call("ensure")
            yield driver
        except BaseException:
            sys.stderr.write((box.workdir / "netdriver.log").read_text(errors="replace"))
            raise


@contextlib.contextmanager
def local_server(box: sb.Sandbox, ips: list[str] | None = None) -> Iterator[LocalServer]:
    server = LocalServer(box, ips or ALL_IPS)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def lock_file(box: sb.Sandbox) -> Path:
    return box.workdir / "xtables.lock"


def tagged(box: sb.Sandbox, family: int) -> Counter[str]:
    """Our rules as ``TABLE CHAIN SPEC`` lines, with how often each is present."""
    out = box.exec(box.node, [f"{'iptables' if family == 4 else 'ip6tables'}-{box.flavour}-save"])
    found: Counter[str] = Counter()
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and TAG in line:
            found[f"{table} {line[3:]}"] += 1
    return found


def expected(family: int, *, host: bool, ips: list[str] | None = None) -> Counter[str]:
    rules = wanted_rules(
        [ipaddress.ip_address(i) for i in ips or ALL_IPS], dns_port=53, health_port=8080, host_rules=host
    )
    return Counter(f"{r.table} {r.chain} {r.spec}" for r in rules if r.family == family)


def add_foreign_rules(box: sb.Sandbox) -> None:
    """Another program's rules in the very chains the agent uses, incl. DROPs the ACCEPT rules must beat."""
    for family in (4, 6):
        restore = f"{'iptables' if family == 4 else 'ip6tables'}-{box.flavour}-restore"
        text = (
            "*raw\n"
            "-A PREROUTING -p udp -m udp --dport 5353 -j CT --notrack\n"
            '-A OUTPUT -p tcp -m tcp --dport 9999 -m comment --comment "NodeLocal DNS Cache: skip conntrack" '
            "-j CT --notrack\n"
            "COMMIT\n*filter\n"
            "-A INPUT -p udp -m udp --dport 53 -j DROP\n-A INPUT -p tcp -m tcp --dport 53 -j DROP\n"
            "-A OUTPUT -p udp -m udp --sport 53 -j DROP\n-A OUTPUT -p tcp -m tcp --sport 53 -j DROP\n"
            "COMMIT\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", box.node, restore, "--noflush"], input=text, text=True, check=True
        )


def pod_dig(box: sb.Sandbox, server: str, *, tcp: bool = False) -> str:
    return box.dig(box.pod(0), server, NAME, tcp=tcp, check=False)


def node_dig(box: sb.Sandbox, server: str) -> str:
    """dig's whole output from the node, errors included ("connection refused")."""
    argv = ["dig", f"@{server}", NAME, "+short", "+time=1", "+tries=1"]
    return box.exec(box.node, argv, check=False).strip()


def test_pod_queries_to_the_cluster_ip_are_answered_locally_without_conntrack(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    add_foreign_rules(box)
    with agent_net(box) as net:
        assert net.call("mode") == box.flavour  # detected from the kubelet's canary chain
        net.call("install", host_rules=False)  # before the server: the foreign DROPs block it until then
        with local_server(box):
            box.flush_conntrack()
            for server in (KUBE_DNS_IP, LOCAL_IP, KUBE_DNS_IP6, LOCAL_IP6):
                assert pod_dig(box, server) == LOCAL_ANSWER, server
                assert pod_dig(box, server, tcp=True) == LOCAL_ANSWER, server
            assert box.conntrack("-p", "udp") == "" and box.conntrack("-p", "tcp") == ""
            assert box.conntrack("-f", "ipv6") == ""
            # The kube-dns-upstream ClusterIP is not bound locally: still kube-proxy's DNAT to kube-dns.
            assert pod_dig(box, KUBE_DNS_UPSTREAM_IP) == KUBE_DNS_ANSWER
            assert f"src={box.kube_dns_pod_ip} dst={box.pod_ip(0)} sport=53" in box.conntrack(
                "-p", "udp", "--orig-dst", KUBE_DNS_UPSTREAM_IP
            )


def test_sigkill_of_the_local_server_falls_back_to_kube_dns_and_a_new_server_takes_traffic_back(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    with agent_net(box) as net, local_server(box) as server:
        net.call("install", host_rules=False)
        assert pod_dig(box, KUBE_DNS_IP) == LOCAL_ANSWER and pod_dig(box, KUBE_DNS_IP6) == LOCAL_ANSWER
        server.kill()
        # The very next query (one try, one second) is answered by kube-dns: the kernel closed the socket,
        # the -m socket gate closed, kube-proxy's DNAT applies again. No agent action was involved.
        assert pod_dig(box, KUBE_DNS_IP) == KUBE_DNS_ANSWER
        assert pod_dig(box, KUBE_DNS_IP6) == KUBE_DNS_ANSWER
        assert pod_dig(box, KUBE_DNS_IP, tcp=True) == KUBE_DNS_ANSWER
        server.start()
        assert pod_dig(box, KUBE_DNS_IP) == LOCAL_ANSWER and pod_dig(box, KUBE_DNS_IP6) == LOCAL_ANSWER


def test_host_queries_follow_the_agent_managed_rule(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    with agent_net(box) as net, local_server(box):
        net.call("install", host_rules=False)
        box.flush_conntrack()
        assert node_dig(box, KUBE_DNS_IP) == KUBE_DNS_ANSWER  # no host rule: kube-proxy's DNAT
        assert node_dig(box, KUBE_DNS_IP6) == KUBE_DNS_ANSWER
        assert KUBE_DNS_IP in box.conntrack("-p", "udp", "--orig-dst", KUBE_DNS_IP)
        assert len(net.call("set_host_rules", enabled=True)) == 8
        box.flush_conntrack()
        assert node_dig(box, KUBE_DNS_IP) == LOCAL_ANSWER
        assert node_dig(box, KUBE_DNS_IP6) == LOCAL_ANSWER
        assert box.conntrack("-p", "udp") == "" and box.conntrack("-f", "ipv6") == ""
        net.call("set_host_rules", enabled=False)
        assert node_dig(box, KUBE_DNS_IP) == KUBE_DNS_ANSWER


def test_rules_flushed_or_an_address_removed_are_restored_within_2s_without_duplicates(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    with agent_net(box, sync_interval=1.0) as net:
        net.call("install", host_rules=True)
        net.call("watch_start")
        ours = next(r for r in expected(4, host=True) if r.startswith("filter OUTPUT")).split(" ", 2)
        start = time.monotonic()
        box.exec(box.node, [box.iptables(4), "-t", "raw", "-F", "PREROUTING"])
        box.exec(box.node, [box.iptables(6), "-t", "filter", "-D", "INPUT", "1"])
        box.exec(box.node, ["sh", "-c", f"{box.iptables(4)} -t {ours[0]} -I {ours[1]} 1 {ours[2]}"])
        box.exec(box.node, ["ip", "addr", "del", f"{KUBE_DNS_IP}/32", "dev", "nodelocaldns"])
        restored = None
        while time.monotonic() - start < 2.0:
            if (
                tagged(box, 4) == expected(4, host=True)
                and tagged(box, 6) == expected(6, host=True)
                and f"{KUBE_DNS_IP}/32" in box.exec(box.node, ["ip", "-4", "addr", "show", "nodelocaldns"])
            ):
                restored = time.monotonic() - start
                break
            time.sleep(0.05)
        report = net.call("watch_report")
        assert restored is not None, report
        assert report["errors"] == []
        sources = {source for _, source in report["events"]}
        assert sources == ({"interface", "nftables"} if box.flavour == "nft" else {"interface"})
        assert net.metric("nodelocaldns_agent_rules_restored_total", what="duplicate") == 1
        assert net.metric("nodelocaldns_agent_rules_restored_total", what="address") == 1


def test_a_held_xtables_lock_bounds_the_wait_counts_the_error_and_recovers(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    with agent_net(box, ips=[LOCAL_IP]) as net, lock_file(box).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        if box.flavour == "nft":  # nf_tables needs no lock: kube-proxy's lock never delays the nft backend
            net.call("install", host_rules=True)
            assert time.monotonic() - start < 1.0
            return
        with pytest.raises(DriverError) as busy:
            net.call("install", host_rules=True)
        waited = time.monotonic() - start
        assert busy.value.kind == "XtablesLockError"
        assert 2.0 <= waited < 5.0  # two bounded waits of 1 s and a pause, then an error, not a hang
        assert net.metric("coredns_nodecache_setup_errors_total", errortype="iptables_lock") == 2
        assert tagged(box, 4) == Counter()
        fcntl.flock(lock, fcntl.LOCK_UN)

        def reconciled() -> bool:
            net.call("reconcile")  # backs off after the failure, then installs
            return bool(net.call("installed"))

        poll(reconciled, 5, every=0.2)
        assert tagged(box, 4) == expected(4, host=True, ips=[LOCAL_IP])


def test_sigterm_during_a_lock_wait_still_tears_down_in_time() -> None:
    with (
        sb.Sandbox(flavour="legacy") as box,
        agent_net(box, ips=[LOCAL_IP, KUBE_DNS_IP], xtables_wait=10.0) as net,
        lock_file(box).open("a") as lock,
    ):
        net.call("install", host_rules=False)
        fcntl.flock(lock, fcntl.LOCK_EX)
        net.send("set_host_rules", enabled=True)  # now waits for the lock, for up to 2 x 10 s
        time.sleep(0.5)
        start = time.monotonic()
        net.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        fcntl.flock(lock, fcntl.LOCK_UN)  # kube-proxy finishes its sync
        assert net.proc.wait(5) == 0
        assert time.monotonic() - start < 3.0  # not the 2 x 10 s the interrupted change would have waited
        assert tagged(box, 4) == Counter()
        assert box.exec(box.node, ["ip", "link", "show", "nodelocaldns"], check=False) == ""


def every_table(box: sb.Sandbox) -> dict[str, str]:
    return {
        f"{flavour} IPv{family}": box.save_rules(family, flavour)
        for flavour in ("legacy", "nft")
        for family in (4, 6)
    }


def test_teardown_leaves_every_table_byte_identical_and_other_programs_rules_intact(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    add_foreign_rules(box)
    before = every_table(box)
    links_before = box.exec(box.node, ["ip", "-o", "link", "show"]), box.exec(box.node, ["ip", "-o", "addr"])
    with agent_net(box) as net:
        net.call("install", host_rules=True)
        assert tagged(box, 6) == expected(6, host=True)
    argv = [sys.executable, "-m", "agent", "--teardown", "-localip", ",".join(ALL_IPS),
            "--xtables-lock", str(lock_file(box)), "--log-format", "json"]  # fmt: skip
    for _ in range(2):  # idempotent
        proc = subprocess.run(
            ["ip", "netns", "exec", box.node, *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert every_table(box) == before
    # The interface is gone and no other interface or address was touched.
    assert (
        box.exec(box.node, ["ip", "-o", "link", "show"]),
        box.exec(box.node, ["ip", "-o", "addr"]),
    ) == links_before


def test_leftovers_of_a_killed_run_are_removed_at_start(node_sandbox: sb.Sandbox) -> None:
    box = node_sandbox
    with agent_net(box) as first:
        first.call("install", host_rules=True)
        first.proc.kill()  # SIGKILL: no clean-up at all
        first.proc.wait(5)
    # What node-cache suffers from: the host rule sends the node's queries to a server that is gone.
    assert "connection refused" in node_dig(box, KUBE_DNS_IP)
    with agent_net(box) as second:
        removed = second.call("remove_leftovers")
        assert len(removed) == sum(expected(4, host=True).values()) + sum(expected(6, host=True).values())
        assert tagged(box, 4) == Counter() and tagged(box, 6) == Counter()
        assert node_dig(box, KUBE_DNS_IP) == KUBE_DNS_ANSWER
        assert second.call("remove_leftovers") == []


def test_the_rule_fingerprint_ignores_traffic_and_other_chains_but_sees_our_chains_change(
    node_sandbox: sb.Sandbox,
) -> None:
    box = node_sandbox
    with agent_net(box) as net, local_server(box):
        net.call("install", host_rules=True)
        first = net.call("fingerprint", family=4)
        for _ in range(3):
            pod_dig(box, KUBE_DNS_IP)  # counters move
        assert net.call("fingerprint", family=4) == first
        box.exec(box.node, [box.iptables(4), "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT"])
        after_nat = net.call("fingerprint", family=4)
        # legacy reads only our chains; nf_tables numbers every transaction, wherever it is.
        assert (after_nat == first) is (box.flavour == "legacy")
        box.exec(box.node, [box.iptables(4), "-t", "filter", "-A", "INPUT", "-j", "ACCEPT"])
        assert net.call("fingerprint", family=4) != after_nat
