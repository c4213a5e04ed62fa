"""Run-directory layout, atomic writes and content digests.

A run directory holds `recipe.yaml` (the resolved recipe), `run.json` (the last run's outcome),
`00-teacher/manifest.json`, and one numbered folder per stage (`01-prune/`, ...) with the stage's
artifact and its `manifest.json`. A stage is written into `.partial-NN-name/` and renamed into
place only when complete, so an interrupted stage never looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".partial-"
WORK_DIR = ".work"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_digest(obj: Any) -> str:
    """Digest of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Digest of every file under `path` (relative names and contents), so any edit or truncation shows."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to its destination and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class RunLayout:
    """Where each piece of a run lives on disk."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run_state(self) -> Path:
        return self.root / "run.json"

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / f"{index:02d}-{name}"

    def partial_dir(self, index: int, name: str) -> Path:
        return self.root / f"{PARTIAL_PREFIX}{index:02d}-{name}"

    def work_dir(self, index: int, name: str, digest: str) -> Path:
        path = self.root / WORK_DIR / f"{index:02d}-{name}-{digest[:12]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def manifest(self, index: int, name: str) -> dict | None:
        return read_json(self.stage_dir(index, name) / MANIFEST)


def begin_partial(layout: RunLayout, index: int, name: str) -> Path:
    """A fresh, empty folder to write a stage into; leftovers of an interrupted attempt are removed."""
    partial = layout.partial_dir(index, name)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit_partial(layout: RunLayout, index: int, name: str) -> Path:
    """Move a completed stage folder into place, replacing an outdated one."""
    partial, final = layout.partial_dir(index, name), layout.stage_dir(index, name)
    if final.exists():
        # Rename the old folder aside first so that a crash here leaves either the old or the new.
        stale = final.with_name(f"{PARTIAL_PREFIX}stale-{final.name}")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale)
    else:
        os.replace(partial, final)
    return final


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold `root/.lock` while a run writes there; a lock left by a dead process on this host is cleared."""
    from slimlm.errors import RunDirectoryError

    lock = Path(root) / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except PermissionError as e:
            raise RunDirectoryError(
                f"cannot write in the run directory {root} ({e.strerror}); choose another with --run-dir"
            ) from e
        except FileExistsError:
            holder = read_json(lock) or {}
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunDirectoryError(
                f"{root} is in use by process {holder.get('pid')} on {holder.get('host')}; wait for it, use another "
                f"--run-dir, or delete {lock} if you are sure that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
