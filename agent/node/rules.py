"""The agent's packet-filter rules as data: what it installs, how to find its own, and how to converge.

Pure logic, no OS calls. Every rule is written in the exact spelling ``iptables-save`` prints (iptables
1.8, legacy and nft alike), so a rule is identified by comparing text: present, missing or duplicated.
``-j CT --notrack`` is used rather than ``-j NOTRACK``: the two are saved differently, and only one spelling
can be compared. Every rule carries a comment starting with :data:`TAG`; a tagged rule that is not in the
wanted set (an earlier run's address, a hand-edited copy) is removed, and nothing untagged is ever touched.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.settings import IPAddress, Settings

Family = Literal[4, 6]
Group = Literal["pod", "host", "probe"]
FAMILIES: tuple[Family, ...] = (4, 6)
# The tables and built-in chains the agent writes to; nothing else is read or written.
TABLES: tuple[str, ...] = ("raw", "filter")
CHAINS: dict[str, tuple[str, ...]] = {"raw": ("PREROUTING", "OUTPUT"), "filter": ("INPUT", "OUTPUT")}

TAG = "NodeLocal DNS agent"
SKIP_CONNTRACK = f"{TAG}: skip conntrack"
HOST_QUERIES = f"{TAG}: host queries skip conntrack"
ALLOW_DNS = f"{TAG}: allow DNS traffic"
HEALTH_PROBES = f"{TAG}: health probes skip conntrack"
# node-cache's two comments (kubernetes-sigs/node-local-dns, cmd/node-cache/app/cache_app.go). Its rules stay
# behind when it is SIGKILLed, OOM-killed, stopped with a 0 s grace period or run with -skipteardown; they are
# ungated, so left in place they would send pod queries to a dead cache (see node_cache_rules).
NODE_CACHE_SKIP_CONNTRACK = "NodeLocal DNS Cache: skip conntrack"
NODE_CACHE_ALLOW_DNS = "NodeLocal DNS Cache: allow DNS traffic"


class RuleSyntaxError(ValueError):
    """A line of ``iptables-save`` output could not be read; the message quotes it."""


@dataclass(frozen=True, order=True)
class Rule:
    """One rule: where it lives and its specification as ``iptables-save`` prints it (after ``-A CHAIN``)."""

    family: Family
    table: str
    chain: str
    spec: str
    group: Group = field(default="pod", compare=False)

    def describe(self) -> str:
        return f"IPv{self.family} {self.table} {self.chain} {self.spec}"


def family_of(ip: IPAddress) -> Family:
    return 4 if ip.version == 4 else 6


def _cidr(ip: IPAddress) -> str:
    return f"{ip}/{32 if ip.version == 4 else 128}"


def _spec(*parts: str, comment: str, target: str) -> str:
    return " ".join([*parts, "-m comment --comment", f'"{comment}"', target])


def wanted_rules(
    local_ips: Sequence[IPAddress],
    *,
    dns_port: int,
    health_port: int,
    host_rules: bool,
    pod_rules: bool = True,
    probe_mark: int = Settings.probe_mark,
) -> list[Rule]:
    """The rule set for the given addresses, in the order the rules should stand at the top of each chain.

    The probe rules come first and stand alone while ``pod_rules`` is off (before CoreDNS first answers):
    raw OUTPUT      -d ADDR udp 53 -m mark PROBE  NOTRACK  the agent's own probes reach the local CoreDNS even
                                                          where kube-proxy DNATs ADDR (the kube-dns ClusterIP)
                                                          and the host rules are off (group "probe")
    raw OUTPUT      -s ADDR -d ADDR udp sport 53  NOTRACK  their replies (a probe of ADDR comes from ADDR): a
                                                          tracked reply to the ClusterIP is a new flow, which
                                                          kube-proxy's nftables mode rejects as traffic to an
                                                          invalid port of a ClusterIP
    Per address and protocol (see docs/design.md for why each exists):
    raw PREROUTING  -d ADDR --dport 53 -m socket  NOTRACK  pods' queries skip conntrack and kube-proxy's DNAT
                                                          only while a socket is bound to ADDR
    raw OUTPUT      -s ADDR --sport 53            NOTRACK  the replies
    raw OUTPUT      -d ADDR --dport 53            NOTRACK  host-originated queries (group "host")
    raw OUTPUT      -d/-s ADDR tcp HEALTH         NOTRACK  the kubelet's liveness probe
    filter INPUT    -d ADDR --dport 53            ACCEPT   untracked packets pass a host firewall
    filter OUTPUT   -s ADDR --sport 53            ACCEPT
    """
    rules: list[Rule] = []
    mark = f"-m mark --mark {probe_mark:#x}/{probe_mark:#x}"
    for ip in local_ips:
        addr = _cidr(ip)
        for probe in (
            f"-d {addr} -p udp -m udp --dport {dns_port} {mark}",
            f"-s {addr} -d {addr} -p udp -m udp --sport {dns_port}",
        ):
            spec = _spec(probe, comment=HEALTH_PROBES, target="-j CT --notrack")
            rules.append(Rule(family_of(ip), "raw", "OUTPUT", spec, "probe"))
    if not pod_rules:
        return rules
    for ip in local_ips:
        fam, addr = family_of(ip), _cidr(ip)

        def add(table: str, chain: str, spec: str, group: Group = "pod", fam: Family = fam) -> None:
            rules.append(Rule(fam, table, chain, spec, group))

        for proto in ("udp", "tcp"):
            dport = f"-d {addr} -p {proto} -m {proto} --dport {dns_port}"
            sport = f"-s {addr} -p {proto} -m {proto} --sport {dns_port}"
            add(
                "raw",
                "PREROUTING",
                _spec(
                    dport,
                    "-m socket",
                    comment=SKIP_CONNTRACK,
                    target="-j CT --notrack",
                ),
            )
            add("raw", "OUTPUT", _spec(sport, comment=SKIP_CONNTRACK, target="-j CT --notrack"))
            if host_rules:
                add("raw", "OUTPUT", _spec(dport, comment=HOST_QUERIES, target="-j CT --notrack"), "host")
            add("filter", "INPUT", _spec(dport, comment=ALLOW_DNS, target="-j ACCEPT"))
            add("filter", "OUTPUT", _spec(sport, comment=ALLOW_DNS, target="-j ACCEPT"))
        health = f"-p tcp -m tcp --dport {health_port}"
        add("raw", "OUTPUT", _spec(f"-d {addr}", health, comment=SKIP_CONNTRACK, target="-j CT --notrack"))
        health = f"-p tcp -m tcp --sport {health_port}"
        add("raw", "OUTPUT", _spec(f"-s {addr}", health, comment=SKIP_CONNTRACK, target="-j CT --notrack"))
    return rules


def node_cache_rules(local_ips: Sequence[IPAddress], *, dns_port: int, health_port: int) -> list[Rule]:
    """node-cache's rule set for these addresses and ports, spelled as ``iptables-save`` prints it (legacy and
    nft alike). Per address, tcp and udp: raw PREROUTING ``-d --dport DNS`` NOTRACK, filter INPUT ``-d --dport
    DNS`` ACCEPT, raw OUTPUT ``-s --sport DNS`` NOTRACK, filter OUTPUT ``-s --sport DNS`` ACCEPT, raw OUTPUT
    ``-d --dport DNS`` NOTRACK; and tcp only: raw OUTPUT ``-d --dport HEALTH`` and ``-s --sport HEALTH``
    NOTRACK. Only exactly these rules are ever removed as node-cache's."""
    rules: list[Rule] = []
    for ip in local_ips:
        fam, addr = family_of(ip), _cidr(ip)
        for proto in ("tcp", "udp"):
            dport = f"-d {addr} -p {proto} -m {proto} --dport {dns_port}"
            sport = f"-s {addr} -p {proto} -m {proto} --sport {dns_port}"
            for table, chain, match, comment, target in (
                ("raw", "PREROUTING", dport, NODE_CACHE_SKIP_CONNTRACK, "-j NOTRACK"),
                ("filter", "INPUT", dport, NODE_CACHE_ALLOW_DNS, "-j ACCEPT"),
                ("raw", "OUTPUT", sport, NODE_CACHE_SKIP_CONNTRACK, "-j NOTRACK"),
                ("filter", "OUTPUT", sport, NODE_CACHE_ALLOW_DNS, "-j ACCEPT"),
                ("raw", "OUTPUT", dport, NODE_CACHE_SKIP_CONNTRACK, "-j NOTRACK"),
            ):
                rules.append(Rule(fam, table, chain, _spec(match, comment=comment, target=target)))
        for match in (
            f"-d {addr} -p tcp -m tcp --dport {health_port}",
            f"-s {addr} -p tcp -m tcp --sport {health_port}",
        ):
            rules.append(
                Rule(
                    fam, "raw", "OUTPUT", _spec(match, comment=NODE_CACHE_SKIP_CONNTRACK, target="-j NOTRACK")
                )
            )
    return rules


def is_tagged(spec: str) -> bool:
    """True when the rule's comment carries the agent's tag (parsed, so a tag inside another field is not)."""
    if TAG not in spec:
        return False
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise RuleSyntaxError(f"cannot split rule {spec!r}: {exc}") from None
    return any(
        word == "--comment" and i + 1 < len(words) and words[i + 1].startswith(f"{TAG}:")
        for i, word in enumerate(words)
    )


def tagged_rules(save_output: str, family: Family) -> list[Rule]:
    """The agent's rules in ``iptables-save`` output, in order, duplicates kept (any table, any chain)."""
    return [rule for rule in saved_rules(save_output, family) if is_tagged(rule.spec)]


def saved_rules(save_output: str, family: Family) -> list[Rule]:
    """Every rule in ``iptables-save`` output, in order, duplicates kept."""
    found: list[Rule] = []
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if not table:
                raise RuleSyntaxError(f"rule outside a table in iptables-save output: {line!r}")
            found.append(Rule(family, table, chain, spec))
    return found


@dataclass(frozen=True)
class Plan:
    """What to change for one family: rules to delete (duplicates, strays) and rules to insert (missing)."""

    family: Family
    delete: tuple[Rule, ...] = ()
    insert: tuple[Rule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.delete or self.insert)

    def restore_input(self) -> str:
        """``iptables-restore --noflush`` input: per table, deletions first, then insertions at the top.

        Insertions go in reverse so the rules end up in the wanted order. A table is one transaction: if
        any line fails (say another program deleted a rule first), nothing of that table changes."""
        out: list[str] = []
        for table in sorted({r.table for r in (*self.delete, *self.insert)}, key=_table_order):
            out.append(f"*{table}")
            out += [f"-D {r.chain} {r.spec}" for r in self.delete if r.table == table]
            out += [f"-I {r.chain} 1 {r.spec}" for r in reversed(self.insert) if r.table == table]
            out.append("COMMIT")
        return "\n".join(out) + "\n" if out else ""

    def describe(self) -> list[str]:
        return [f"removed {r.describe()}" for r in self.delete] + [
            f"added {r.describe()}" for r in self.insert
        ]


def _table_order(table: str) -> tuple[int, str]:
    return (TABLES.index(table) if table in TABLES else len(TABLES), table)


def plan(
    family: Family, observed: Iterable[Rule], wanted: Iterable[Rule], *, keep_others: bool = False
) -> Plan:
    """Converge ``observed`` (the tagged rules now present) to ``wanted``: keep one copy of each wanted rule,
    delete every other tagged rule (``keep_others``: keep one copy of those too), insert what is missing."""
    want = [r for r in wanted if r.family == family]
    have = Counter(r for r in observed if r.family == family)
    want_set = set(want)
    delete: list[Rule] = []
    for rule, count in have.items():
        keep = 1 if keep_others or rule in want_set else 0
        delete += [rule] * (count - keep)
    insert = [r for r in want if r not in have]
    return Plan(family, tuple(delete), tuple(insert))
