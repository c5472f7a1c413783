"""Local paths and ``gs://`` URIs: reading, atomic writing, copying whole directories, and the
size and sha256 records that pin a set's files.

Every file the pipeline produces is written to a temporary name beside its destination and
renamed into place, so a reader (or a restarted task) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .runtime import cache_dir

logger = logging.getLogger(__name__)


def is_gcs_uri(uri: str) -> bool:
    return uri.startswith("gs://")


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """The bucket and object path of a ``gs://`` URI.

    >>> split_gcs_uri("gs://bucket/a/b")
    ('bucket', 'a/b')
    >>> split_gcs_uri("gs://bucket")
    ('bucket', '')
    """
    if not is_gcs_uri(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, blob = uri[len("gs://"):].partition("/")
    if not bucket:
        raise UsageError(f"gs:// URI without a bucket: {uri!r}")
    return bucket, blob


def gcs_prefix(uri: str) -> tuple[str, str]:
    """A ``gs://`` folder as its bucket and the object-name prefix of its files:
    ``gs://bucket/a/b/`` -> ``("bucket", "a/b/")``, the bucket's root -> ``("bucket", "")``."""
    bucket, folder = split_gcs_uri(uri)
    folder = folder.strip("/")
    return bucket, folder + "/" if folder else ""


def gcs_client():
    """A google-cloud-storage client; honours ``STORAGE_EMULATOR_HOST`` (tests, local emulator)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def arrow_filesystem(uri: str):
    """A ``pyarrow.fs`` filesystem and path for a local path or ``gs://`` URI."""
    import pyarrow.fs as pafs

    if is_gcs_uri(uri):
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            scheme, _, host = emulator.rpartition("://")
            fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=host or emulator,
                                    scheme=scheme or "http")
        else:
            fs = pafs.GcsFileSystem()
        bucket, blob = split_gcs_uri(uri)
        return fs, f"{bucket}/{blob}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _file_info(uri: str):
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(uri)
    info = fs.get_file_info(path)
    return fs, path, info.type == pafs.FileType.File


def read_bytes(uri: str) -> bytes | None:
    """The contents of the file at ``uri`` (local path or ``gs://``); None when there is none."""
    fs, path, exists = _file_info(uri)
    if not exists:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def list_files(folder: str) -> list[str]:
    """The names of the files directly in ``folder`` (local path or ``gs://`` prefix), sorted."""
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


@contextlib.contextmanager
def local_folder(uri: str, names: Iterable[str] | None = None) -> Iterator[Path]:
    """The folder ``uri`` as a local directory, to read a set of files the same way wherever
    it is: a local folder itself; a ``gs://`` prefix copied into a temporary directory (its
    files ``names`` that exist, every file when None), removed afterwards. ``names`` must be
    plain file names."""
    if not is_gcs_uri(uri):
        yield Path(uri).expanduser()
        return
    folder = uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="item-embeddings-fetch-") as tmp:
        for name in list_files(uri) if names is None else names:
            fs, path, exists = _file_info(f"{folder}/{name}")
            if exists:
                with fs.open_input_stream(path) as src, open(Path(tmp) / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        yield Path(tmp)


def download_gcs_prefix(uri: str, dest: Path) -> Path:
    """Copy every object under the ``gs://`` folder ``uri`` (a model directory) to ``dest``.

    The folder is downloaded beside ``dest`` and renamed into place, so ``dest`` either does
    not exist or is complete (an interrupted download is never mistaken for a cached model).
    """
    bucket_name, prefix = split_gcs_uri(uri)
    prefix = prefix.rstrip("/") + "/"  # the folder itself, not its name-sharing neighbours
    blobs = [b for b in gcs_client().list_blobs(bucket_name, prefix=prefix)
             if not b.name.endswith("/")]
    if not blobs:
        raise FileNotFoundError(f"nothing found under {uri}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for blob in blobs:
            target = work / blob.name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
        os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (threads are running)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed to ``dest``.

    The file gets ordinary permissions (0666 less the umask, e.g. 0644), not the 0600 of a
    temporary file, so a shared output folder stays readable. On error the temporary file is
    removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_npy(dest: str | os.PathLike, shape: tuple[int, ...], dtype=np.float32
               ) -> Iterator[np.ndarray]:
    """A writable memory-mapped ``.npy`` of ``shape`` that becomes ``dest`` on success.

    The rows are written through the map (memory stays bounded whatever the size); on leaving
    the block the map is flushed and the file renamed into place as :func:`atomic_path` does.
    """
    with atomic_path(dest) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


def cached_gcs_copy(uri: str, kind: str, *, folder: bool = False) -> Path:
    """A local copy of the ``gs://`` object (or, with ``folder``, folder) ``uri``, kept in
    ``<cache>/<kind>/`` and downloaded only once; it appears whole or not at all."""
    bucket_name, blob_name = split_gcs_uri(uri)
    root = cache_dir() / kind / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if folder:
        if not root.is_dir():  # download_gcs_prefix renames a complete folder into place
            logger.info("downloading %s to %s", uri, root)
            download_gcs_prefix(uri, root)
        return root
    dest = root / os.path.basename(blob_name)
    if not dest.is_file():
        logger.info("downloading %s to %s", uri, dest)
        blob = gcs_client().bucket(bucket_name).blob(blob_name)
        if not blob.exists():
            raise FileNotFoundError(f"{kind} not found: {uri}")
        with atomic_path(dest) as tmp:
            blob.download_to_filename(str(tmp))
    return dest


def write_json_atomic(dest: str | os.PathLike, payload: Any) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(dest: str | os.PathLike, table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


_FICLONE = 0x40049409  # ioctl of Linux: make a file a copy-on-write clone of another


def clone_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` a copy of ``src`` that shares nothing a write could reach: a copy-on-write
    clone (reflink, instant) where the filesystem makes one (btrfs, XFS), else a plain copy.
    Never a hard link: editing the placed file would edit ``src`` too (for a local run, the
    artifact kfp.local's cache hands the next identical run)."""
    import fcntl

    try:
        with open(src, "rb") as source, open(dst, "wb") as target:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
        return
    except OSError:  # not a filesystem that clones (ext4, tmpfs), or across filesystems
        pass
    shutil.copyfile(src, dst)


def place_files(files: list[Path], dest_dir: str | os.PathLike, meta_files: frozenset[str]
                ) -> dict[str, Path]:
    """Put copies of ``files`` into ``dest_dir`` (:func:`clone_file`), each atomically, as one
    group: an earlier meta file of the group is removed first and the new ones are placed last,
    so a present meta file always means a complete group."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    metas = [f for f in files if f.name in meta_files]
    for meta in metas:
        (dest_dir / meta.name).unlink(missing_ok=True)
    placed = {}
    for src in [f for f in files if f.name not in meta_files] + metas:
        with atomic_path(dest_dir / src.name) as tmp:
            clone_file(src, tmp)
        placed[src.name] = dest_dir / src.name
    return placed


# Where Vertex AI mounts Cloud Storage (gcsfuse): artifact paths of pipeline tasks live there.
FUSE_MOUNTS = ("/gcs/",)


def on_fuse_mount(path: str | os.PathLike) -> bool:
    return os.path.abspath(path).startswith(FUSE_MOUNTS)


@contextlib.contextmanager
def staged_output_dir(output_dir: str | os.PathLike, meta_files: frozenset[str]
                      ) -> Iterator[Path]:
    """A local directory to write a step's outputs into, when ``output_dir`` is on gcsfuse.

    Memory-mapped writes and many small writes are slow or unsupported on a FUSE mount of Cloud
    Storage; the step writes to local disk and its files are copied over on success (meta last).
    Elsewhere ``output_dir`` itself is used.
    """
    if not on_fuse_mount(output_dir):
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix="item-embeddings-stage-") as tmp:
        yield Path(tmp)
        place_files(sorted(p for p in Path(tmp).iterdir() if p.is_file()), output_dir,
                    meta_files)


@contextlib.contextmanager
def local_input_dir(input_dir: str | os.PathLike) -> Iterator[Path]:
    """``input_dir``, copied to local disk first when it is on gcsfuse (random row reads)."""
    if not on_fuse_mount(input_dir):
        yield Path(input_dir)
        return
    with tempfile.TemporaryDirectory(prefix="item-embeddings-input-") as tmp:
        for src in Path(input_dir).iterdir():
            if src.is_file():
                shutil.copyfile(src, Path(tmp) / src.name)
        yield Path(tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file: how a manifest or a meta file pins a file's content."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def is_file_records(records: Any) -> bool:
    """Whether ``records`` has the form of a ``files`` record: name -> ``{"size", "sha256"}``."""
    return isinstance(records, dict) and all(isinstance(e, dict) for e in records.values())


def record_problems(files: Mapping[str, Any], records: Any, owner: str, *,
                    required: Iterable[str] = (),
                    sha256: Callable[[Any], str] = sha256_file,
                    size: Callable[[Any], int] = lambda path: path.stat().st_size) -> list[str]:
    """What differs between the available ``files`` (name -> path, or what ``size`` and
    ``sha256`` take) and the ``records`` of their size and sha256 that ``owner`` (a meta file,
    a manifest) wrote: a recorded file missing or not as recorded, a ``required`` name without a
    record. Empty when all is as recorded. The one check of recorded files: ``verify`` reports
    the problems, a run that reuses a previous set refuses it on any."""
    if not is_file_records(records):
        return [f"{owner}: 'files' is not a mapping of file name to size and sha256"]
    problems = [f"{owner} records no size and sha256 of {name}: it cannot be verified"
                for name in required if name not in records]
    for name, entry in sorted(records.items()):
        if name not in files:
            problems.append(f"{owner} lists {name} but it is missing")
            continue
        actual = size(files[name])
        if actual != entry.get("size"):
            differs = f"size {actual}, recorded {entry.get('size')!r}"
        elif sha256(files[name]) != entry.get("sha256"):
            differs = "same size, sha256 differs"
        else:
            continue
        problems.append(f"{name}: content does not match {owner} ({differs}): changed after it "
                        f"was written, or from another run")
    return problems
