"""Portable cache bundles: one JSON file with tuning records and, optionally, compiled artifacts.

    {"format": "slagen-bundle", "version": 1, "meta": {...stack of the exporting machine...},
     "records": [...], "artifacts": [{"path": "tilelang/…", "sha256": "…", "data": "<base64>"}]}

Reading a bundle never executes anything from it: records are validated JSON; artifacts (compiled
kernels under the cache dir's ``tilelang/`` and ``generated/`` trees) are written only when the caller
opts in (``trust_artifacts``), only when each file's SHA-256 matches the manifest, and only to paths
that stay inside the cache dir.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import List, Optional

from slagen.autotune import cache, records as rec_mod
from slagen.paths import atomic_write_text, cache_dir

FORMAT = "slagen-bundle"
VERSION = 1
ARTIFACT_DIRS = ("generated", "tilelang")


class BundleError(ValueError):
    """A bundle that cannot be read (not JSON, wrong format, unsafe path, hash mismatch)."""


@dataclasses.dataclass
class ImportReport:
    taken: int = 0
    skipped: List[str] = dataclasses.field(default_factory=list)      # invalid records, not stored
    unusable: List[str] = dataclasses.field(default_factory=list)     # stored, but from another stack
    artifacts_written: int = 0
    artifacts_skipped: List[str] = dataclasses.field(default_factory=list)


def _artifact_files(root: Path) -> List[Path]:
    files = []
    for sub in ARTIFACT_DIRS:
        base = root / sub
        if base.is_dir():
            files += sorted(p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    return files


def export(path: Path, with_artifacts: bool = False, root: Optional[Path] = None) -> dict:
    """Write the user cache's records (and artifacts if asked) to one bundle file; returns a summary."""
    root = root or cache_dir()
    records = cache.read_records(cache.records_path(root))
    artifacts = []
    if with_artifacts:
        for f in _artifact_files(root):
            data = f.read_bytes()
            artifacts.append({"path": f.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
                              "data": base64.b64encode(data).decode()})
    doc = {"format": FORMAT, "version": VERSION, "meta": rec_mod.stack_meta(), "records": records,
           "artifacts": artifacts}
    atomic_write_text(Path(path), json.dumps(doc, sort_keys=True) + "\n")
    return {"records": len(records), "artifacts": len(artifacts)}


def read(path: Path) -> dict:
    """Parse and check the envelope of a bundle (records and artifacts are checked on import)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot read bundle {path}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{path} is not a slagen bundle (format must be {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise BundleError(f"{path}: bundle version {doc.get('version')!r} is not supported (want {VERSION})")
    if not isinstance(doc.get("records"), list) or not isinstance(doc.get("artifacts", []), list):
        raise BundleError(f"{path}: 'records' and 'artifacts' must be lists")
    return doc


def safe_target(root: Path, rel: object) -> Path:
    """The file ``rel`` inside ``root``, or BundleError if it would escape it or leave ARTIFACT_DIRS."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"artifact path {rel!r} is not a plain relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or pure.parts[0] not in ARTIFACT_DIRS:
        raise BundleError(f"artifact path {rel!r} escapes the cache dir or is not under {ARTIFACT_DIRS}")
    target = (root / Path(*pure.parts)).resolve()
    if root.resolve() not in target.parents:
        raise BundleError(f"artifact path {rel!r} escapes the cache dir")
    return target


def import_bundle(path: Path, trust_artifacts: bool = False, root: Optional[Path] = None) -> ImportReport:
    """Merge a bundle's valid records into the user cache; write its artifacts only if trusted."""
    root = root or cache_dir()
    doc = read(path)
    report = ImportReport()
    good = []
    for i, raw in enumerate(doc["records"]):
        try:
            good.append(rec_mod.validate(raw, f"record {i}"))
        except rec_mod.RecordError as err:
            report.skipped.append(str(err))
    here = rec_mod.stack_meta()
    for r in good:
        if r["meta"] != here:
            diff = ", ".join(f"{k} {r['meta'][k]} (here {here[k]})" for k in rec_mod.META_FIELDS
                             if r["meta"][k] != here[k])
            report.unusable.append(f"{r['spec']} on {r['gpu']} [{r['bucket']}]: {diff}")
    if good:
        cache.save(good, root)
    report.taken = len(good)
    artifacts = doc.get("artifacts", [])
    if artifacts and not trust_artifacts:
        report.artifacts_skipped.append(f"{len(artifacts)} compiled artifacts not written "
                                        f"(pass trust_artifacts / --trust-artifacts to use them)")
        return report
    for art in artifacts:
        try:
            if not isinstance(art, dict):
                raise BundleError("artifact entries must be objects")
            target = safe_target(root, art.get("path"))
            data = base64.b64decode(str(art.get("data", "")), validate=True)
            if hashlib.sha256(data).hexdigest() != art.get("sha256"):
                raise BundleError(f"artifact {art.get('path')!r}: SHA-256 does not match the manifest")
        except (BundleError, ValueError) as err:
            report.artifacts_skipped.append(str(err))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        report.artifacts_written += 1
    return report


def merge_bundles(paths: List[Path], out: Path) -> dict:
    """Combine several bundles into one (records merged per key, artifacts unioned by path+hash)."""
    docs = [read(p) for p in paths]
    groups = [[rec_mod.validate(r, f"{p} record {i}") for i, r in enumerate(d["records"])]
              for p, d in zip(paths, docs)]
    arts = {}
    for d in docs:
        for a in d.get("artifacts", []):
            if isinstance(a, dict):
                arts[(a.get("path"), a.get("sha256"))] = a
    merged = cache.merge(*groups)
    doc = {"format": FORMAT, "version": VERSION, "meta": rec_mod.stack_meta(), "records": merged,
           "artifacts": list(arts.values())}
    atomic_write_text(Path(out), json.dumps(doc, sort_keys=True) + "\n")
    return {"records": len(merged), "artifacts": len(arts)}
