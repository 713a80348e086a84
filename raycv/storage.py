"""Run folders on object storage: ``run.storage`` as a pyarrow URI (``s3://``, ``gs://``).

Ray Train writes a URI run's checkpoints straight to the store. raycv writes its own files
(config, manifest, metrics, TensorBoard, plots, best/) into a local mirror of the run
folder, as for a local run, and uploads them as they change; a resume downloads them back
(never the checkpoints: Ray Train restores those from the store itself).

Credentials come from the environment (``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_
CREDENTIALS``, ...) or the machine's own role, never from the URI: every run folder keeps
its config, and progress lines name the run's URI."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_OPTIONS = frozenset({"access_key", "secret_key", "session_token", "access_token"})
# pyarrow's default copy chunk (1 MiB) is a request each: a 130 MB checkpoint took 10 s
# instead of 1 s from a local S3 server.
_CHUNK = 64 << 20


def is_uri(storage: str) -> bool:
    return bool(_SCHEME.match(storage))


def credentials_in(uri: str) -> str | None:
    """The part of ``uri`` that carries a credential, if any."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return "a user or key before '@'"
    found = sorted(_SECRET_OPTIONS & parse_qs(parts.query).keys())
    return found[0] if found else None


def join(uri: str, *names: str) -> str:
    """``uri`` with ``names`` appended to its path; its query options stay at the end."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))


def filesystem(uri: str):
    """(pyarrow file system, path in it) for ``uri``."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def mirror(uri: str) -> Path:
    """Where the local mirror of ``uri`` lives: ``$XDG_CACHE_HOME/raycv/<scheme>/<bucket>/
    <path>`` (default ``~/.cache``)."""
    parts = urlsplit(uri)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return (cache / "raycv" / parts.scheme / parts.netloc / parts.path.lstrip("/")).resolve()


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def folders(uri: str) -> list[str]:
    """The names of the folders right under ``uri``, sorted (none when it is missing)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in found if i.type == pafs.FileType.Directory)


def upload(folder: Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under ``folder`` to ``uri``, but those under the top-level ``skip``."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] not in skip:
            _copy(str(path), pafs.LocalFileSystem(), f"{base}/{relative.as_posix()}", fs)


def download(uri: str, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under ``uri`` into ``folder``, but those under the top-level ``skip``."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        relative = Path(info.path[len(base) :].lstrip("/"))
        if info.type == pafs.FileType.File and relative.parts[0] not in skip:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            _copy(info.path, fs, str(folder / relative), pafs.LocalFileSystem())


def replace_on_store(uri: str, source: str, target: str) -> None:
    """Replace the folder ``target`` under ``uri`` with a copy of ``source`` (a path in the
    same store), copied by the store itself. Sorted: a checkpoint's file comes before the
    checksum that vouches for it, so an interrupted copy never pairs a checksum with the
    wrong file."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    fs.delete_dir_contents(f"{base}/{target}", missing_dir_ok=True)
    found = fs.get_file_info(pafs.FileSelector(source, recursive=True))
    for path in sorted(i.path for i in found if i.type == pafs.FileType.File):
        fs.copy_file(path, f"{base}/{target}/{path[len(source) :].lstrip('/')}")


def _copy(source: str, source_fs, target: str, target_fs) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(
        source,
        target,
        source_filesystem=source_fs,
        destination_filesystem=target_fs,
        chunk_size=_CHUNK,
    )
