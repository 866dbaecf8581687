"""Where bytes live: a local path, or an object-store URL (``s3://``, ``gs://``, any fsspec URL).

The one place that turns a path-or-URL into something to read and write. Everything else
takes a :data:`Location` and keeps using the ``pathlib`` idioms it always used:

* :func:`location` ``(text, storage_options=None) -> Location``: a local path (``str``,
  ``Path``, ``file://...``) becomes a plain :class:`pathlib.Path` (today's behaviour and
  speed: os calls, atomic rename); ``proto://...`` becomes an :class:`ObjectPath`.
* :class:`ObjectPath` mimics the part of ``Path`` the project uses: ``/``, ``name``,
  ``parent``, ``suffix``, ``with_name``, ``exists()``, ``is_file()``, ``is_dir()``,
  ``stat().st_size``, ``read_bytes()``, ``read_text()``, ``write_bytes()`` (one whole
  object), ``open("rb")`` (seekable, buffered range reads), ``iterdir()``, ``glob()``,
  ``unlink()``, ``mkdir()`` (a no-op: object stores have no folders). ``str()`` is the URL.
  It has no ``__fspath__``: ``open()``/``os`` calls on it fail loudly instead of writing a
  local folder named ``s3:``. It pickles (to worker processes and Ray tasks) with its
  storage options.
* Module functions that work on both kinds: :func:`read_range` (bytes ``[start, stop)``),
  :func:`open_read`, :func:`write_whole` (local: temporary file, fsync, rename; object
  store: one PUT, which readers see whole or not at all), :func:`create_whole`
  (create-if-absent; ``If-None-Match: *`` on S3), :func:`upload_file` (an open local spool
  file to an object: one PUT or a multipart upload, visible only when complete),
  :func:`sha256_of`, :func:`size_of` (None when missing), :func:`list_sizes` (name -> size
  of a folder's files, one LIST on a store), :func:`delete`, :func:`is_url`.

Storage options (credentials, endpoint, ...) are passed to ``fsspec.filesystem``: the
``MVKIT_STORAGE_OPTIONS`` environment variable (a JSON object; :func:`options_env` makes it
for a subprocess) with ``--storage-options JSON`` merged over it (a CLI calls
:func:`use_storage_options` once; :func:`location` picks them up, and so do the worker
processes it starts; an ``ObjectPath`` carries its options when pickled to a Ray task).
Below them the fsspec package reads its own standard places: for S3 the AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` -- botocore reads it itself --,
``AWS_PROFILE``...) and ``~/.aws``; for GCS the Google application default credentials.

Errors. Every call to a store goes through :func:`retrying`: transient failures (HTTP 5xx,
429/throttling such as ``SlowDown``, connection reset or refused, timeouts) are retried with
exponential backoff (:data:`BACKOFF`); what remains becomes a one-line :class:`StorageError`
naming the URL and the fix (403/credentials, a missing bucket, a protocol whose package is
not installed: ``pip install 'mvkit[s3]'``). A missing object raises ``FileNotFoundError``
(naming the URL), as a missing local file does. ``StorageError`` is an ``OSError``, so
code that handles unreadable local files handles unreadable objects the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import os
import posixpath
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

STORAGE_OPTIONS_ENV = "MVKIT_STORAGE_OPTIONS"
"""A JSON object of fsspec storage options, the defaults under ``--storage-options``."""
PROTOCOL_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""The ``mvkit`` extra that installs a protocol's fsspec package."""
READ_BLOCK = 8 << 20
"""Bytes one ranged GET fetches when reading an object as a stream."""
UPLOAD_BLOCK = 64 << 20
"""Multipart part size of uploads (S3 allows 10,000 parts: 640 GB objects)."""
HASH_CHUNK = 1 << 20

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "IncompleteRead",
    "FSTimeoutError",
    "ResponseStreamingError",
    "HTTPClientError",
    "ProtocolError",
    "RemoteDisconnected",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EIO)}
_PERMISSION_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}


class StorageError(OSError):
    """A store refused or kept failing a call: one line naming the URL and the fix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage error"


@dataclass(frozen=True)
class Backoff:
    """Retries of a transient failure: ``tries`` calls in all, sleeping ``first * factor**i``
    seconds (capped at ``cap``, with +-25% jitter) between them."""

    tries: int = 8
    first: float = 0.2
    factor: float = 2.0
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.first * self.factor**attempt)
        return base * random.uniform(0.75, 1.25)


BACKOFF = Backoff()
"""The retry policy of every store call (worst case about 23 s of sleeping)."""

T = TypeVar("T")


# ------------------------------------------------------------------------- error handling


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _response(exc: BaseException) -> tuple[int | None, str]:
    """HTTP status and error code of a botocore ``ClientError`` (or anything alike)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        return (int(status) if isinstance(status, int) else None), str(error.get("Code") or "")
    for attr in ("status", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, ""
    return None, ""


def is_transient(exc: BaseException) -> bool:
    """True for a failure worth retrying: 5xx, 429/throttling, connection reset, timeout."""
    for item in _chain(exc):
        if isinstance(item, PermissionError | FileNotFoundError | FileExistsError):
            return False
        status, code = _response(item)
        if code in _PERMISSION_CODES or status in (401, 403, 404):
            return False
        if code in _THROTTLE_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if isinstance(item, ConnectionError | TimeoutError):
            return True
        if type(item) is OSError and item.errno in _TRANSIENT_ERRNOS:  # s3fs: 500, 503, SlowDown
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(item).__mro__):
            return True
    text = str(exc)
    return "reduce your request rate" in text or "SlowDown" in text


def _detail(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _missing_bucket(exc: BaseException) -> bool:
    return any(
        _response(item)[1] in ("NoSuchBucket",) or "bucket does not exist" in str(item).lower()
        for item in _chain(exc)
    )


def storage_error(url: str, what: str, exc: BaseException, tries: int = 1) -> StorageError:
    """The one-line :class:`StorageError` for ``exc``, raised while doing ``what`` on ``url``."""
    detail = _detail(exc)
    creds = (
        "(AWS_* environment or ~/.aws for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, "
        "or --storage-options)"
    )
    if _missing_bucket(exc):
        return StorageError(
            f"{url}: the bucket does not exist ({detail}); create it or fix the URL"
        )
    if any(isinstance(item, PermissionError) for item in _chain(exc)) or any(
        _response(item)[1] in _PERMISSION_CODES or _response(item)[0] in (401, 403)
        for item in _chain(exc)
    ):
        return StorageError(
            f"{url}: access denied while trying to {what} ({detail}); check the credentials "
            f"and their permissions {creds}"
        )
    if any(
        type(item).__name__ in ("NoCredentialsError", "PartialCredentialsError")
        for item in _chain(exc)
    ):
        return StorageError(f"{url}: no credentials found ({detail}); set them {creds}")
    if is_transient(exc):
        return StorageError(
            f"{url}: {what} still failing after {tries} tries ({detail}); the store is "
            "unreachable or throttling: check the endpoint, then re-run (finished shards are kept)"
        )
    return StorageError(f"{url}: cannot {what} ({type(exc).__name__}: {detail})")


def retrying(url: str, what: str, fn: Callable[[], T], backoff: Backoff | None = None) -> T:
    """``fn()`` with transient failures retried. A missing object raises ``FileNotFoundError``
    naming ``url``; ``FileExistsError``/``IsADirectoryError`` pass through; everything else
    becomes a one-line :class:`StorageError`."""
    policy = backoff or BACKOFF
    for attempt in range(policy.tries):
        try:
            return fn()
        except StorageError:
            raise
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
            if not isinstance(exc, FileNotFoundError):
                raise
            if _missing_bucket(exc):
                raise storage_error(url, what, exc) from exc
            raise FileNotFoundError(errno.ENOENT, "no such object", url) from None
        except Exception as exc:
            if is_transient(exc) and attempt + 1 < policy.tries:
                time.sleep(policy.delay(attempt))
                continue
            raise storage_error(url, what, exc, attempt + 1) from exc
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------- locations


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` text -> a dict; ValueError (one line) when it is not a JSON
    object. None or empty -> ``{}``."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(
            f"--storage-options {text!r} is not JSON ({exc}); give an object, e.g. "
            '\'{"endpoint_url": "http://minio:9000", "anon": false}\''
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def default_storage_options() -> dict[str, Any]:
    """The storage options of the environment (:data:`STORAGE_OPTIONS_ENV`)."""
    text = os.environ.get(STORAGE_OPTIONS_ENV)
    try:
        return parse_storage_options(text)
    except ValueError as exc:
        raise ValueError(f"{STORAGE_OPTIONS_ENV}: {exc}") from None


def use_storage_options(storage_options: dict[str, Any] | None) -> None:
    """Make ``storage_options`` (``--storage-options``) the defaults of this process and of
    the processes it starts, merged over the environment's (:data:`STORAGE_OPTIONS_ENV`)."""
    if storage_options:
        merged = {**default_storage_options(), **storage_options}
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps(merged, sort_keys=True)


def options_env(storage_options: dict[str, Any] | None) -> dict[str, str]:
    """Environment entries that hand ``storage_options`` to a subprocess (empty for none)."""
    if not storage_options:
        return {}
    return {STORAGE_OPTIONS_ENV: json.dumps(storage_options, sort_keys=True)}


def is_url(value: Any) -> bool:
    """True for an :class:`ObjectPath` or a ``proto://`` string other than ``file://``."""
    if isinstance(value, ObjectPath):
        return True
    if not isinstance(value, str):
        return False
    match = _URL_RE.match(value)
    return bool(match) and match.group(1).lower() != "file"


def location(
    value: str | os.PathLike[str] | ObjectPath, storage_options: dict[str, Any] | None = None
) -> Location:
    """A local ``Path`` or an :class:`ObjectPath` for a path, a ``file://`` URL or an
    fsspec URL. ``storage_options`` are merged over :func:`default_storage_options`."""
    if isinstance(value, ObjectPath):
        if storage_options is None:
            return value
        merged = {**value.options, **storage_options}
        return replace(value, options_json=json.dumps(merged, sort_keys=True))
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    match = _URL_RE.match(text)
    if match is None:
        return Path(text)
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol == "file":
        return Path(rest if rest.startswith("/") else "/" + rest)
    options = {**default_storage_options(), **(storage_options or {})}
    rest = rest.rstrip("/")
    if not rest or rest.startswith("/"):
        raise ValueError(f"{text}: no bucket in the URL; write {protocol}://BUCKET/PREFIX")
    return ObjectPath(protocol, posixpath.normpath(rest), json.dumps(options, sort_keys=True))


@dataclass(frozen=True)
class ObjectStat:
    """What :meth:`ObjectPath.stat` tells: enough for size checks and change stamps."""

    st_size: int
    st_mtime_ns: int
    version: str
    """ETag / generation / mtime: changes when the object is rewritten."""


_filesystems: dict[tuple[int, str, str], Any] = {}


@dataclass(frozen=True, order=True)
class ObjectPath:
    """An object (or prefix) in a store: ``protocol://path``; see the module docstring."""

    protocol: str
    path: str
    """The fsspec path: ``bucket/prefix/name``, no protocol, no trailing slash."""
    options_json: str = field(default="{}", compare=False, repr=False)
    """The storage options as sorted JSON (hashable, picklable)."""

    # -- naming
    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def as_posix(self) -> str:
        return self.url

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> ObjectPath:
        head = posixpath.dirname(self.path)
        return replace(self, path=head) if head else self

    def __truediv__(self, other: str | os.PathLike[str]) -> ObjectPath:
        part = os.fspath(other)
        if is_url(part):
            raise ValueError(f"cannot join the URL {part} under {self.url}")
        joined = posixpath.normpath(posixpath.join(self.path, part.lstrip("/")))
        return replace(self, path=joined)

    def joinpath(self, *parts: str) -> ObjectPath:
        result = self
        for part in parts:
            result = result / part
        return result

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name if "/" in self.path else replace(self, path=name)

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.with_name(self.stem + suffix)

    def is_relative_to(self, other: Any) -> bool:
        if not isinstance(other, ObjectPath) or other.protocol != self.protocol:
            return False
        return self.path == other.path or self.path.startswith(other.path + "/")

    def relative_to(self, other: ObjectPath) -> str:
        if not self.is_relative_to(other):
            raise ValueError(f"{self.url} is not under {other.url}")
        return self.path[len(other.path) + 1 :]

    def resolve(self) -> ObjectPath:
        return self

    def absolute(self) -> ObjectPath:
        return self

    # -- the filesystem
    def filesystem(self) -> Any:
        """The fsspec filesystem (one per process, protocol and options)."""
        key = (os.getpid(), self.protocol, self.options_json)
        fs = _filesystems.get(key)
        if fs is not None:
            return fs
        try:
            import fsspec

            fs = fsspec.filesystem(self.protocol, **self.options)
        except ImportError as exc:
            extra = PROTOCOL_EXTRAS.get(self.protocol)
            fix = (
                f"pip install 'mvkit[{extra}]'"
                if extra
                else f"install the fsspec package for {self.protocol}:// ({_detail(exc)})"
            )
            raise StorageError(
                f"{self.url}: the {self.protocol}:// protocol needs a package that is not "
                f"installed: {fix}"
            ) from None
        except ValueError as exc:
            if "protocol" in str(exc).lower():
                raise StorageError(
                    f"{self.url}: unknown storage protocol {self.protocol}://; use a local "
                    "path or an fsspec URL such as s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"
                ) from None
            raise StorageError(f"{self.url}: bad storage options ({_detail(exc)})") from None
        except TypeError as exc:
            raise StorageError(f"{self.url}: bad storage options ({_detail(exc)})") from None
        _filesystems[key] = fs
        return fs

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        fs = self.filesystem()
        return retrying(self.url, what, lambda: fn(fs))

    # -- queries
    def stat(self) -> ObjectStat:
        """Size and version; FileNotFoundError when there is no such object."""

        def info(fs: Any) -> dict[str, Any]:
            fs.invalidate_cache(self.path)
            found = fs.info(self.path)
            if found.get("type") == "directory":
                raise IsADirectoryError(f"{self.url} is a prefix, not an object")
            return found

        found = self._call("read the size of", info)
        version = str(
            found.get("ETag")
            or found.get("etag")
            or found.get("generation")
            or found.get("mtime")
            or found.get("LastModified")
            or found.get("updated")
            or ""
        )
        mtime = found.get("LastModified") or found.get("mtime") or found.get("updated")
        mtime_ns = 0
        if hasattr(mtime, "timestamp"):
            mtime_ns = int(mtime.timestamp() * 1e9)
        elif isinstance(mtime, int | float):
            mtime_ns = int(mtime * 1e9)
        return ObjectStat(int(found.get("size") or 0), mtime_ns, version)

    def is_file(self) -> bool:
        try:
            self.stat()
        except (FileNotFoundError, IsADirectoryError):
            return False
        return True

    def is_dir(self) -> bool:
        return bool(self._list())

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def _list(self) -> list[dict[str, Any]]:
        def ls(fs: Any) -> list[dict[str, Any]]:
            fs.invalidate_cache(self.path)
            try:
                return list(fs.ls(self.path, detail=True))
            except FileNotFoundError as exc:
                if _missing_bucket(exc):
                    raise
                return []

        return [item for item in self._call("list", ls) if item["name"].rstrip("/") != self.path]

    def iterdir(self) -> Iterator[ObjectPath]:
        """The direct children (objects and sub-prefixes), in name order."""
        names = sorted({posixpath.basename(item["name"].rstrip("/")) for item in self._list()})
        for name in names:
            yield self / name

    def list_sizes(self) -> dict[str, int]:
        """Name -> size of the objects directly under this prefix (one listing)."""
        return {
            posixpath.basename(item["name"]): int(item.get("size") or 0)
            for item in self._list()
            if item.get("type") != "directory"
        }

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Children matching ``pattern`` (``*.tar``, ``index/*.tmp``: one level of wildcards,
        leading folders literal)."""
        folder, _, last = pattern.rpartition("/")
        base = self / folder if folder else self
        for child in base.iterdir():
            if fnmatch.fnmatchcase(child.name, last):
                yield child

    # -- reading
    def read_bytes(self) -> bytes:
        def cat(fs: Any) -> bytes:
            fs.invalidate_cache(self.path)  # a listing cached here may predate the object
            return fs.cat_file(self.path)

        return self._call("read", cat)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` (fewer at the end of the object)."""
        if stop <= start:
            return b""
        return self._call("read", lambda fs: fs.cat_file(self.path, start=start, end=stop))

    def open(self, mode: str = "rb", buffering: int = READ_BLOCK) -> BinaryIO:
        """A seekable binary reader (ranged GETs of ``buffering`` bytes); only ``"rb"``."""
        if mode != "rb":
            raise ValueError(f"{self.url}: open() reads only ('rb'); use write_bytes/upload_file")
        size = self.stat().st_size
        return io.BufferedReader(_RangeReader(self, size), buffer_size=buffering)  # type: ignore[return-value]

    # -- writing
    def write_bytes(self, data: bytes) -> int:
        """Write the whole object in one PUT: readers see the old bytes or all the new ones."""
        self._call("write", lambda fs: fs.pipe_file(self.path, bytes(data)))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", lambda fs: fs.rm_file(self.path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no folders."""


Location = Path | ObjectPath
"""Where a file or folder is: a local path or an object in a store."""


class _RangeReader(io.RawIOBase):
    """The raw layer of :meth:`ObjectPath.open`: every read is one retried ranged GET."""

    def __init__(self, target: ObjectPath, size: int) -> None:
        self.target, self.size, self.pos = target, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        data = self.target.read_range(self.pos, self.pos + want)
        if not data:
            raise StorageError(
                f"{self.target.url}: the object ended at byte {self.pos} of {self.size} (it "
                "changed while being read); re-run"
            )
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


# ------------------------------------------------------------------------- module functions


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders can't be opened)."""
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


TMP_SUFFIX = ".tmp"


def write_whole(target: Location, data: bytes) -> None:
    """Write ``data`` so that ``target`` holds either the old or the whole new bytes.

    Local: writes ``NAME.tmp``, fsyncs it, renames it over ``NAME`` and fsyncs the folder.
    Object store: one PUT of the whole object.
    """
    if isinstance(target, ObjectPath):
        target.write_bytes(data)
        return
    path = Path(target)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_whole(target: Location, data: bytes) -> bool:
    """Create ``target`` with ``data`` unless it exists; True when this call created it.

    Atomic create-if-absent: a hard link of a whole temporary file locally (exclusive create
    where links are not supported), a conditional PUT (``If-None-Match: *``) on a store that
    supports it, else check-then-put.
    """
    if isinstance(target, ObjectPath):
        fs = target.filesystem()

        def create() -> bool | None:
            try:
                fs.pipe_file(target.path, bytes(data), mode="create")
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError):  # this fsspec package has no mode=
                return None
            return True

        created = retrying(target.url, "create", create)
        if created is not None:
            return created
        if target.is_file():  # no conditional writes here: check, then put
            return False
        target.write_bytes(data)
        return True
    path = Path(target)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.claim")
    write_whole(tmp, data)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # no hard links here (some FUSE/SMB mounts): exclusive create instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            created = True
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return created


def upload_file(source: BinaryIO, target: ObjectPath) -> None:
    """Upload the whole of the open local file ``source`` to ``target``: visible only once
    complete (one PUT, or a multipart upload completed at the end; a failed attempt is
    aborted, a transient failure retried from the start)."""
    fs = target.filesystem()

    def attempt() -> None:
        source.seek(0)
        handle = fs.open(target.path, "wb", block_size=UPLOAD_BLOCK)
        try:
            shutil.copyfileobj(source, handle, HASH_CHUNK * 8)
            handle.close()  # the commit point: the object appears whole here
        except BaseException:
            with contextlib.suppress(Exception):
                handle.discard()  # abort the multipart upload; never commit a partial object
            handle.closed = True  # nor let the garbage collector commit it
            raise

    retrying(target.url, "upload", attempt)


def read_range(source: Location, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of a file or object (fewer at its end)."""
    if isinstance(source, ObjectPath):
        return source.read_range(start, stop)
    with open(source, "rb") as f:
        f.seek(start)
        return f.read(max(0, stop - start))


def open_read(source: Location) -> BinaryIO:
    """A seekable binary reader: ``open(path, "rb")`` locally, buffered ranged GETs on a store."""
    if isinstance(source, ObjectPath):
        return source.open("rb")
    return open(source, "rb")  # noqa: SIM115 - the caller closes it


def size_of(target: Location) -> int | None:
    """The size in bytes of a file or object; None when it does not exist."""
    try:
        return target.stat().st_size
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def list_sizes(folder: Location) -> dict[str, int]:
    """Name -> size of the files directly in ``folder`` (empty when it does not exist)."""
    if isinstance(folder, ObjectPath):
        return folder.list_sizes()
    try:
        with os.scandir(folder) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    except FileNotFoundError:
        return {}


def delete(target: Location, missing_ok: bool = True) -> None:
    """Remove a file or object."""
    target.unlink(missing_ok=missing_ok)


def sha256_of(source: Location, chunk_size: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file's or object's bytes (one streaming pass)."""
    digest = hashlib.sha256()
    with open_read(source) as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
