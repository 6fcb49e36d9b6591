"""A ConfigMap volume as the kubelet's atomic writer keeps it, for tests of the directory source.

Layout: ``..2024_01_02_03_04_05.N/`` holds the keys of one version, ``..data`` is a symlink to it, and each
key is a symlink ``KEY -> ..data/KEY``. A new version is published by writing a new timestamped directory,
pointing a ``..data_tmp`` symlink at it, renaming that over ``..data``, adding the symlinks of new keys,
removing those of dropped keys, and deleting the old version -- the order the kubelet uses.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

_counter = itertools.count()


def publish(directory: Path, data: Mapping[str, str | bytes]) -> None:
    """Publish ``data`` as the ConfigMap's new version in ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}{next(_counter)}"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_bytes(value.encode() if isinstance(value, str) else value)
    data_link = directory / "..data"
    old = directory / os.readlink(data_link) if data_link.is_symlink() else None
    old_keys = {p.name for p in old.iterdir()} if old is not None else set()
    tmp = directory / "..data_tmp"
    os.symlink(version.name, tmp)
    os.rename(tmp, data_link)
    for key in data:
        if not (directory / key).is_symlink():
            os.symlink(f"..data/{key}", directory / key)
    for key in old_keys - set(data):
        (directory / key).unlink()
    if old is not None:
        shutil.rmtree(old)
