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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card in a stage's artifact folder (model_card.py)
PARTIAL_PREFIX = ".partial-"
WORK_DIR = ".work"
REPLACED_DIR = ".replaced"  # outdated stage folders that held files slimlm did not write


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
    """Digest of every file under `path` (relative names and contents), so any edit or truncation shows.
    The manifest and the model card of a stage's artifact (`model/README.md`) are records of the
    content, rewritten when a rerun re-checks the gates, so they are left out."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in exclude or (rel.count("/") == 1 and rel.endswith("/" + CARD)):
            continue
        h.update(rel.encode() + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def temporary_beside(path: Path) -> Path:
    """Where a file or folder is written before it is renamed onto `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or a folder into; rename it onto `path` when the
    block ends, or remove it if the block fails, so readers (and a resumed run) never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    _remove(tmp)  # left by a process that was killed mid-write
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to its destination and rename, so readers never see half a file."""
    with atomic_write(Path(path)) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    """A JSON file's value, or None where it is missing or unreadable (not UTF-8, not JSON, a folder)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
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

    def stage_dirs(self) -> list[Path]:
        """The committed stage folders (`01-name`, ...; not the teacher's `00-teacher`), in order."""
        return sorted(p for p in self.root.glob("[0-9][0-9]-*") if p.is_dir() and not p.name.startswith("00-"))


def run_state(root: Path) -> dict | None:
    """The run.json of a slimlm run directory, or None where there is none or it is not one slimlm wrote."""
    state = read_json(RunLayout(root).run_state)
    valid = (
        isinstance(state, dict)
        and all(isinstance(state.get(key), str) for key in ("recipe", "status"))
        and isinstance(state.get("stages"), dict)
    )
    return state if valid else None


def check_run_dir(root: Path, recipe_name: str, model: str, *, force: bool = False) -> str | None:
    """Refuse a run directory slimlm must not write into; returns what `force` will replace, if anything.

    A run directory is slimlm's own: it is new, empty, or holds a run of the same recipe. A folder of
    the user's (a recipe's own folder, the model's) or a different recipe's run is refused, so that
    nothing of the user's or of the other run is overwritten.
    """
    from slimlm.errors import RunDirectoryError

    root = Path(root)
    model_dir = Path(model).expanduser()
    if (model_dir / "config.json").is_file() and root.resolve().is_relative_to(model_dir.resolve()):
        raise RunDirectoryError(
            f"the run directory {root} is inside the model directory {model}, so the run's files would become "
            "part of the model; choose a --run-dir outside it"
        )
    if root.exists() and not root.is_dir():
        raise RunDirectoryError(f"the run directory {root} is a file; choose another with --run-dir")
    if not root.is_dir():
        return None
    entries = sorted(p.name for p in root.iterdir() if p.name != ".lock")
    if not entries:
        return None
    state = run_state(root)
    if state is None:
        damaged = (root / "run.json").exists()  # a run's record, but not one slimlm can read
        if damaged and force:
            return f"{root}: its damaged run.json is replaced; stage folders are re-run where the recipe changed them"
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        reason = "run.json is damaged" if damaged else "it holds files slimlm did not write"
        raise RunDirectoryError(
            f"{root} is not a slimlm run directory ({reason}: {shown}); choose a new or empty --run-dir"
            + (", or --force to run there anyway" if damaged else "")
        )
    if state["recipe"] != recipe_name:
        stages = ", ".join(p.name for p in RunLayout(root).stage_dirs()) or "none"
        if not force:
            raise RunDirectoryError(
                f"{root} holds a run of recipe {state['recipe']!r} (stages {stages}), not of {recipe_name!r}; "
                "choose another --run-dir, or add --force to replace that run"
            )
        return (
            f"{root}: replacing the run of recipe {state['recipe']!r} (stages {stages}); folders of its stages that "
            f"{recipe_name!r} does not have are left as they are"
        )
    return None


def begin_partial(layout: RunLayout, index: int, name: str) -> Path:
    """A fresh, empty folder to write a stage into; leftovers of an interrupted attempt are removed."""
    partial = layout.partial_dir(index, name)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit_partial(layout: RunLayout, index: int, name: str) -> Path | None:
    """Move a completed stage folder into place, replacing an outdated one.

    The outdated folder is deleted only when its files are exactly those its manifest records, i.e. what
    slimlm wrote; one holding anything else (a file the user added or edited) is kept under `.replaced/`,
    whose path is returned.
    """
    partial, final = layout.partial_dir(index, name), layout.stage_dir(index, name)
    kept = None
    if final.exists():
        # Rename the old folder aside first so that a crash here leaves either the old or the new.
        old = read_json(final / MANIFEST)
        ours = isinstance(old, dict) and old.get("output_digest") == dir_digest(final)
        if ours:
            aside = final.with_name(f"{PARTIAL_PREFIX}stale-{final.name}")
            if aside.exists():
                shutil.rmtree(aside)
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            aside = kept = layout.root / REPLACED_DIR / f"{final.name}-{stamp}"
            aside.parent.mkdir(exist_ok=True)
        os.replace(final, aside)
        os.replace(partial, final)
        if ours:
            shutil.rmtree(aside)
    else:
        os.replace(partial, final)
    return kept


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
