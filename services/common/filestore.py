"""The embedded local store: objects as files under a directory, for a one-node site.

``PHOTOFERRY_STORE_ENDPOINT=file:///var/lib/photoferry/store`` keeps bucket ``B``'s
object ``K`` at ``/var/lib/photoferry/store/B/K``, with the same guarantees the
S3-protocol store gives (this module is synchronous; ``LocalStore`` runs it in
threads):

- **Create-if-absent** is atomic between processes: the bytes are written to a
  staging file, synced, then hard-linked to their name; ``link(2)`` fails when the
  name exists, so of two gateways storing the same photo exactly one creates it.
- **Metadata** (content type, SHA-256, capture and receipt times, labels) is kept
  beside the object in ``.<name>.meta``, JSON, written and synced *before* the
  object is linked: an object is never seen without its metadata. A metadata file
  left by an attempt that stopped half-way belongs to the same photo (the name is
  derived from the photo) and is reused; the keeper removes old leftovers.
- **Listings** are in key order, as S3's are (the keeper merges three of them).
  A photo's file lives in a directory of its capture hour
  (``photos/2026/05/01/20260501T10/<id>``), so no directory holds more than an
  hour of the site's photos and sorting one stays cheap.
- **Durability**: every write is synced (file and directory) before it is
  acknowledged, so a photo answered ``201`` survives a power cut, not only a
  restart.

Names starting with ``.`` are the store's own (metadata, staging files) and never
appear in a listing.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# A name that begins with a capture stamp (a photo id, or a marker of one) is kept
# in a directory named after its first 11 characters: the capture hour.
_STAMPED_NAME = re.compile(r"(\d{8}T\d{2})\d{4}Z-")
_HOUR_DIR = re.compile(r"\d{8}T\d{2}")
STAGING_PREFIX = ".tmp-"
META_SUFFIX = ".meta"


@dataclass(frozen=True)
class FileMeta:
    size: int
    last_modified: datetime
    content_type: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class DiskFigures:
    total_bytes: int
    free_bytes: int


class FileObjects:
    """One bucket of the embedded store: a directory of objects and their metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- names ------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """Where ``key`` lives; ValueError for a key that could leave the bucket or clash with the layout."""
        parts = key.split("/")
        for i, part in enumerate(parts):
            if not part or part.startswith(".") or "\x00" in part:
                raise ValueError(f"{key!r} is not a key the local store keeps (empty or hidden segment)")
            if i < len(parts) - 1 and _HOUR_DIR.fullmatch(part):
                raise ValueError(f"{key!r} has a segment shaped like the store's hour directories")
        stamped = _STAMPED_NAME.match(parts[-1])
        if stamped:
            parts.insert(-1, stamped.group(1))
        return self.root.joinpath(*parts)

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.with_name(f".{path.name}{META_SUFFIX}")

    # -- writes -----------------------------------------------------------------------------

    def create(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> bool:
        """Store ``data`` at ``key`` unless something is there; return whether it was created."""
        path = self._writable_path(key)
        meta = orjson.dumps({"content_type": content_type, "metadata": metadata})
        # Metadata first: once the object has a name, its metadata is there. Should an
        # earlier attempt have left one, it describes the same photo: keep it.
        _link_new(self._meta_path(path), meta)
        return _link_new(path, data)

    def put(self, key: str, data: bytes, *, metadata: dict[str, str]) -> None:
        """Write ``data`` at ``key``, replacing what is there (for markers and state)."""
        path = self._writable_path(key)
        metadata = dict(metadata)
        content_type = metadata.pop("Content-Type", "application/octet-stream")
        meta_path = self._meta_path(path)
        _replace(meta_path, orjson.dumps({"content_type": content_type, "metadata": metadata}))
        _replace(path, data)

    def delete(self, key: str) -> None:
        """Delete an object and its metadata (nothing when there is none)."""
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._meta_path(path).unlink()

    def _writable_path(self, key: str) -> Path:
        if not self.root.is_dir():
            raise FileNotFoundError(f"the bucket directory {self.root} does not exist")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- reads ------------------------------------------------------------------------------

    def stat(self, key: str) -> FileMeta:
        """What is known of an object; FileNotFoundError when there is none."""
        path = self.path(key)
        return self._described(path, path.stat())

    def read(self, key: str) -> tuple[bytes, FileMeta]:
        path = self.path(key)
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            data = file.read()
        return data, self._described(path, info)

    def _described(self, path: Path, info: os.stat_result) -> FileMeta:
        try:
            meta: dict[str, Any] = orjson.loads(self._meta_path(path).read_bytes())
        except FileNotFoundError:
            meta = {}
        return FileMeta(size=info.st_size, last_modified=datetime.fromtimestamp(info.st_mtime, UTC),
                        content_type=str(meta.get("content_type", "application/octet-stream")),
                        metadata={str(k): str(v) for k, v in (meta.get("metadata") or {}).items()})

    def listing(self, prefix: str) -> Iterator[dict[str, Any]]:
        """The objects whose keys start with ``prefix``, in key order (as S3 lists them)."""
        directory, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        key_prefix = f"{directory}/" if directory else ""
        for key, entry in _ordered(start, key_prefix):
            if not key.startswith(prefix):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while listed
            yield {"path": key, "size": info.st_size,
                   "last_modified": datetime.fromtimestamp(info.st_mtime, UTC)}

    def check(self) -> None:
        """Raise OSError unless the bucket directory exists and can be written."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"the bucket directory {self.root} does not exist")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"the bucket directory {self.root} is not writable")

    # -- administration ---------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket directory unless it exists; return whether it was created."""
        if self.root.is_dir():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        return True

    def clean_leftovers(self, older_than_s: float) -> int:
        """Remove staging files and metadata without an object, older than ``older_than_s``.

        Both are what a process stopped half-way through a write or a delete leaves.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for directory, _, files in os.walk(self.root):
            names = set(files)
            for name in files:
                orphan_meta = (name.startswith(".") and name.endswith(META_SUFFIX)
                               and name[1:-len(META_SUFFIX)] not in names)
                if not (name.startswith(STAGING_PREFIX) or orphan_meta):
                    continue
                path = Path(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        return removed

    def disk(self) -> DiskFigures:
        """The file system's size and the space left to this process (statvfs)."""
        figures = os.statvfs(self.root)
        return DiskFigures(total_bytes=figures.f_blocks * figures.f_frsize,
                           free_bytes=figures.f_bavail * figures.f_frsize)


def _ordered(directory: Path, key_prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(key, entry) of every object under ``directory``, in key order."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    # Keys sort as strings: a directory's keys as "<name>/...", an hour directory's
    # keys as its files' names (which begin with the hour).
    ordered: list[tuple[str, os.DirEntry[str], str | None]] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            if _HOUR_DIR.fullmatch(entry.name):
                ordered.append((entry.name, entry, key_prefix))
            else:
                ordered.append((entry.name + "/", entry, f"{key_prefix}{entry.name}/"))
        else:
            ordered.append((entry.name, entry, None))
    ordered.sort(key=lambda item: item[0])
    for _, entry, below in ordered:
        if below is None:
            yield key_prefix + entry.name, entry
        else:
            yield from _ordered(Path(entry.path), below)


def _staged(directory: Path, data: bytes) -> Path:
    """Write ``data`` to a new staging file in ``directory`` and sync it."""
    staging = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        staging.unlink(missing_ok=True)
        raise
    os.close(fd)
    return staging


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(path: Path, data: bytes) -> bool:
    """Give ``data`` the name ``path`` unless it is taken (atomic between processes)."""
    staging = _staged(path.parent, data)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)
    _sync_directory(path.parent)
    return True


def _replace(path: Path, data: bytes) -> None:
    staging = _staged(path.parent, data)
    try:
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
