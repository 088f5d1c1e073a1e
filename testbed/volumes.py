"""A folder laid out and updated as the kubelet does a Secret or ConfigMap volume, for tests.

Each key is a symlink ``KEY -> ..data/KEY``; ``..data`` points at a timestamped folder holding
the files of one version. An update writes a new folder, swaps ``..data`` to it atomically and
deletes the old one (the kubelet's AtomicWriter), so whoever pinned the old folder's path reads
nothing after an update. Used by the tests of everything that re-reads a mounted file:
certificates, the push token, route files.
"""

import os
import shutil
from collections.abc import Mapping
from pathlib import Path


class KubeletVolume:
    """A mounted volume in ``directory``, created with its first version's ``files``."""

    def __init__(self, directory: Path, files: Mapping[str, bytes], mtime: float | None = None) -> None:
        self.directory = directory
        self.versions = 0
        directory.mkdir(parents=True)
        self.update(files, mtime)
        for key in files:
            (directory / key).symlink_to(f"..data/{key}")

    def path(self, key: str) -> Path:
        """The path a pod's container sees for ``key``: the symlink, never the version's file."""
        return self.directory / key

    def update(self, files: Mapping[str, bytes], mtime: float | None = None) -> None:
        """Publish a new version holding ``files`` (modified at ``mtime``, if given)."""
        self.versions += 1
        version = f"..2026_11_26_12_00_{self.versions:02d}"
        (self.directory / version).mkdir()
        for key, content in files.items():
            (self.directory / version / key).write_bytes(content)
            if mtime is not None:
                os.utime(self.directory / version / key, (mtime, mtime))
        data = self.directory / "..data"
        previous = data.resolve() if data.is_symlink() else None
        (self.directory / "..data_tmp").symlink_to(version)
        os.rename(self.directory / "..data_tmp", data)  # atomic, as the kubelet's swap
        if previous is not None and previous.is_dir():  # unless a test removed it
            shutil.rmtree(previous)
