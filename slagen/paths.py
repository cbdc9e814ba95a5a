"""Where slagen keeps its files: the user cache dir (XDG rules, no platformdirs) and shared read-only caches."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import List


def cache_dir() -> Path:
    """``$SLAGEN_CACHE_DIR``, else the platform's user cache dir + ``/slagen``.

    Linux/BSD: ``$XDG_CACHE_HOME/slagen`` or ``~/.cache/slagen``; macOS: ``~/Library/Caches/slagen``;
    Windows: ``%LOCALAPPDATA%\\slagen\\Cache``.
    """
    override = os.environ.get("SLAGEN_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "slagen"
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "slagen" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / "slagen"


def shared_cache_dirs() -> List[Path]:
    """Read-only shared caches listed in ``$SLAGEN_CACHE_PATH`` (os.pathsep-separated), in order."""
    raw = os.environ.get("SLAGEN_CACHE_PATH", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
