"""The plugins a Corefile names against those compiled into the CoreDNS binary that will load it.

The image's CoreDNS has only the plugins a node-local Corefile uses (``image/coredns-node``; docs/image.md);
CoreDNS itself refuses a Corefile naming any other one, but only once it loads it: at start that is a
crash loop whose reason is one line in CoreDNS's output, on a reload a failed reload. The agent refuses such a
Corefile first, with the plugin, the server block, the binary and how to get the plugin: at start it exits
(nothing installed yet), later the change is rejected like any bad Corefile and the last good one serves.

``coredns -plugins`` tells what a binary has; it is asked once per binary (the same path, inode, size and
modification time), never per reload. A binary that cannot tell (missing, a wrapper that fails) is not
checked here: starting it fails, or CoreDNS refuses the Corefile, as before.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from agent.corefile.lexer import CorefileError
from agent.corefile.parse import parse
from agent.observe.logs import get_logger

log = get_logger("corefile")

# Where the image's build argument and the plugin sets are explained (in the error an operator sees).
HOW_TO_GET = (
    "the image built with --build-arg COREDNS_PLUGINS=full has every CoreDNS plugin (docs/image.md), "
    "or --coredns-binary names a CoreDNS that has it"
)
QUERY_TIMEOUT = 10.0
# Sections of the older `-plugins` output (CoreDNS before 1.7) that list no directive.
_NOT_PLUGINS = ("server types", "caddyfile loaders", "caddyfile loading order", "event hook")
# Directives that are the Corefile parser's own, not plugins: `import` (a snippet or a file).
_PARSER_DIRECTIVES = frozenset({"import"})


class MissingPluginError(CorefileError):
    """The Corefile names a plugin the CoreDNS binary does not have."""


@dataclass(frozen=True)
class PluginUse:
    """A directive of a server block (imported snippets included)."""

    plugin: str
    server_block: str  # its keys, as written
    line: int


def parse_plugin_list(output: str) -> frozenset[str]:
    """The directive names in ``coredns -plugins`` output.

    CoreDNS 1.7 and later print one per line, sorted, the ``dns.`` prefix dropped (``acl``, ``prometheus``,
    then ``on``, a Caddy plugin). Older releases printed sections (``Server types:``, ``Caddyfile loaders:``,
    ``Other plugins:``) of indented names with the prefix (``dns.cache``); their server types and loaders are
    no directives. Both are read.
    """
    names: set[str] = set()
    skipping = False
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            skipping = line[:-1].strip().lower().startswith(_NOT_PLUGINS)
            continue
        if skipping:
            continue
        names.add(line.removeprefix("dns."))
    return frozenset(names)


def plugin_uses(corefile: str) -> Iterator[PluginUse]:
    """Every plugin each server block names, in order, snippets expanded. The text must parse (the caller
    rendered it); an ``import`` of a file is not followed (CoreDNS reads the file at load)."""
    for block in parse(corefile).servers:
        keys = " ".join(key.text for key in block.keys)
        for directive in block.expanded:
            if directive.name.text not in _PARSER_DIRECTIVES:
                yield PluginUse(directive.name.text, keys, directive.name.line)


def missing_plugins(corefile: str, available: frozenset[str]) -> list[PluginUse]:
    return [use for use in plugin_uses(corefile) if use.plugin not in available]


def refuse_missing(corefile: str, available: frozenset[str], binary: str) -> None:
    """Raise :class:`MissingPluginError` naming each plugin of ``corefile`` that ``binary`` lacks."""
    missing = missing_plugins(corefile, available)
    if not missing:
        return
    where = "; ".join(
        f'plugin "{u.plugin}" in server block "{u.server_block}" (line {u.line} of the rendered Corefile)'
        for u in missing
    )
    plugins = sorted({use.plugin for use in missing})
    raise MissingPluginError(
        f"the Corefile names {'a plugin' if len(plugins) == 1 else 'plugins'} not compiled into the CoreDNS "
        f"binary {binary}: {where}. It has {', '.join(sorted(available))}. If {', '.join(plugins)} "
        f"{'is a CoreDNS plugin' if len(plugins) == 1 else 'are CoreDNS plugins'}: {HOW_TO_GET}"
    )


def compiled_plugins(binary: str) -> tuple[str, frozenset[str] | None]:
    """``binary`` resolved on PATH, and the plugins it has (None when it cannot tell). Asked once per binary
    file: the answer is kept for the same path, inode, size and modification time."""
    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
    except OSError:
        return path, None
    return path, _query(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _query(path: str, _inode: int, _size: int, _mtime_ns: int) -> frozenset[str] | None:
    try:
        out = subprocess.run(
            [path, "-plugins"], capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("coredns plugins unknown", binary=path, error=str(exc),
                    cause="the Corefile's plugins are not checked before CoreDNS loads it")  # fmt: skip
        return None
    plugins = parse_plugin_list(out.stdout) if out.returncode == 0 else frozenset()
    if not plugins:
        log.warning("coredns plugins unknown", binary=path, exit_code=out.returncode,
                    cause="the Corefile's plugins are not checked before CoreDNS loads it")  # fmt: skip
        return None
    log.info("coredns plugins", binary=path, count=len(plugins))
    return plugins


class PluginCheck:
    """The check for one ``--coredns-binary``: :meth:`check` raises :class:`MissingPluginError`."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def check(self, corefile: str) -> None:
        path, available = compiled_plugins(self.binary)
        if available is not None:
            refuse_missing(corefile, available, path)
