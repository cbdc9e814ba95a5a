"""The tuning cache: records on disk, safe with several processes, shared read-only across machines.

Files: ``<cache dir>/tuning/records.json`` (the user cache, read-write) and
``<dir>/tuning/records.json`` for every dir of ``$SLAGEN_CACHE_PATH`` (read-only, consulted after the
user cache). A file is ``{"format": "slagen-tuning", "version": 1, "records": [...]}``.

- Writes take a file lock, re-read the file, merge (per key the faster record wins, see
  records.better), and replace the file atomically: concurrent tuners never lose each other's records.
- A corrupt or half-written file, or a record that breaks the schema, is skipped with a warning.
- A record whose software stack (records.META_FIELDS) differs from the running one is kept on disk but
  never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from filelock import FileLock

from slagen.autotune import records as rec_mod
from slagen.paths import atomic_write_text, cache_dir, shared_cache_dirs

FORMAT = "slagen-tuning"
VERSION = 1


def records_path(root: Optional[Path] = None) -> Path:
    return (root or cache_dir()) / "tuning" / "records.json"


def parse_records(text: str, where: str) -> List[dict]:
    """Valid records of a tuning file's text; anything malformed is skipped with a warning."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        warnings.warn(f"slagen: skipping corrupt tuning file {where}: {err}", RuntimeWarning, stacklevel=2)
        return []
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("records"), list):
        warnings.warn(f"slagen: skipping {where}: not a slagen tuning file", RuntimeWarning, stacklevel=2)
        return []
    good = []
    for i, raw in enumerate(doc["records"]):
        try:
            good.append(rec_mod.validate(raw, f"{where} record {i}"))
        except rec_mod.RecordError as err:
            warnings.warn(f"slagen: skipping invalid tuning record: {err}", RuntimeWarning, stacklevel=2)
    return good


def read_records(path: Path) -> List[dict]:
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except OSError as err:
        warnings.warn(f"slagen: cannot read tuning file {path}: {err}", RuntimeWarning, stacklevel=2)
        return []
    return parse_records(text, str(path))


def merge(*groups: Iterable[dict]) -> List[dict]:
    """Union of record groups; per key the better record (records.better) wins."""
    best: Dict[tuple, dict] = {}
    for group in groups:
        for r in group:
            key = rec_mod.key_of(r)
            if rec_mod.better(r, best.get(key)):
                best[key] = r
    return sorted(best.values(), key=rec_mod.key_of)


def dump(records: List[dict]) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "records": records}, indent=1, sort_keys=True) + "\n"


def save(new: Iterable[dict], root: Optional[Path] = None) -> List[dict]:
    """Merge ``new`` records into the user cache under a file lock; returns what the file now holds."""
    new = [rec_mod.validate(r) for r in new]
    path = records_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        merged = merge(read_records(path), new)
        atomic_write_text(path, dump(merged))
    _MEMO.clear()
    return merged


def clear(root: Optional[Path] = None) -> int:
    """Delete the user cache's records; returns how many there were."""
    path = records_path(root)
    with FileLock(str(path) + ".lock") if path.parent.exists() else contextlib.nullcontext():
        count = len(read_records(path))
        if path.exists():
            os.remove(path)
    _MEMO.clear()
    return count


_MEMO: Dict[tuple, Tuple[float, List[dict]]] = {}


def _cached_read(path: Path) -> List[dict]:
    """read_records memoised on the file's mtime (so another process's save is seen)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return []
    key = (str(path),)
    hit = _MEMO.get(key)
    if hit and hit[0] == mtime:
        return hit[1]
    records = read_records(path)
    _MEMO[key] = (mtime, records)
    return records


def sources() -> List[Tuple[str, Path]]:
    """(label, records file) in lookup order: the user cache, then each shared read-only cache."""
    return [("user", records_path())] + [(f"shared:{d}", records_path(d)) for d in shared_cache_dirs()]


def lookup(spec: str, backend: str, gpu: str, arch: str, bucket: str,
           meta: Optional[dict] = None) -> Optional[Tuple[dict, str]]:
    """The usable record for this key (same stack as ``meta``, default the running one) and where it
    came from, or None. The user cache is consulted before shared caches."""
    meta = meta or rec_mod.stack_meta()
    want = (spec, backend, gpu, arch, bucket)
    for label, path in sources():
        for r in _cached_read(path):
            if tuple(r[f] for f in rec_mod.KEY_FIELDS) == want and r["meta"] == meta:
                return r, label
    return None
