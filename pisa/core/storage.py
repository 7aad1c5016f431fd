"""Where studies keep their state and checkpoints: a local path or a `pyarrow.fs` URI.

`storage_path` may be a directory (`ray_results`, `/mnt/shared/runs`) or a URI that
pyarrow understands (`s3://bucket/runs`, `gs://bucket/runs`, `file:///mnt/shared`).
Ray Train and Tune take the same string, so the study state written here, the trial
checkpoints Ray writes and everything read back (resume, `best`, the MLflow checkpoint
upload) live side by side on every node. S3-compatible servers are reached through
pyarrow's own settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), on every node.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def is_remote(location: str | os.PathLike) -> bool:
    """True for object stores and other non-local file systems."""
    return is_uri(location) and urlparse(str(location)).scheme not in ("file", "")


def normalize(location: str | os.PathLike, base: Path | None = None) -> str:
    """A local path made absolute (Ray workers run elsewhere), a URI kept as given."""
    text = str(location)
    if is_uri(text):
        parsed = urlparse(text)
        if parsed.scheme == "file":
            return str(Path(parsed.path))
        return text.rstrip("/")
    path = Path(os.path.expanduser(text))
    return str(path if path.is_absolute() else (Path(base or Path.cwd()) / path).resolve())


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(location, *parts))


def _fs(location: str):
    """(pyarrow FileSystem, path inside it) for a location."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    return pafs.FileSystem.from_uri(location)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(location: str) -> list[str]:
    """The names of the folders directly inside `location`, a folder that exists."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    return [
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False))
        if info.type == pafs.FileType.Directory
    ]


def read_bytes(location: str) -> bytes:
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode()


# object stores: an object appears whole when its upload completes, or not at all
_WHOLE_OBJECT_STORES = ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")


def write_text(location: str, text: str) -> None:
    """Write a small file whole: a reader sees the old content or the new, never a part.

    Local (and `file://`): a temporary file beside it, flushed to disk (fsync), renamed over
    it, and the folder synced so the rename survives a power loss. S3, GCS and Azure: one
    upload, which the store makes visible only once complete. Other file systems (HDFS): a
    temporary file moved over it."""
    import pyarrow.fs as pafs

    data = text.encode()
    fs, path = _fs(location)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if type(fs).__name__ in _WHOLE_OBJECT_STORES:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp_path) as f:
        f.write(data)
    fs.move(tmp_path, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside local file `path` to write to; once the block ends without an
    error it is synced to disk and renamed over `path` (a crash leaves the old file or the
    new, never half of one); on an error it is removed and `path` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(target.parent)


def _sync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the OS lets a folder be opened: not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def delete(location: str) -> None:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local directory with the contents of `location` (itself when it is local)."""
    if not is_remote(location):
        yield Path(normalize(location))
        return
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    tmp = Path(tempfile.mkdtemp(prefix="pisa-dl-"))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def display(location: str) -> str:
    """A location for messages: URIs without credentials or query strings."""
    if not is_uri(location):
        return location
    parsed = urlparse(location)
    host = parsed.hostname or ""
    return f"{parsed.scheme}://{host}{parsed.path}"


def location_of(fs_path: str, root: str) -> str:
    """A path Ray reports inside its file system (`bucket/key` on S3) as a location under `root`."""
    if is_remote(root) and not is_uri(fs_path):
        return f"{urlparse(root).scheme}://{fs_path.lstrip('/')}"
    return fs_path
