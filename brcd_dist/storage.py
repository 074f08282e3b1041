"""Every location the system reads or writes, as one string: a local path, `s3://bucket/key`, `gs://bucket/key`,
`http(s)://...` (read only) or `pipe:PROGRAM ARGS` (read only, the program's stdout; run as an argv, no shell).

Built on pyarrow.fs, which Ray Train also uses for `storage_path`. Credentials come from the standard chain of
each backend (environment, profile, instance role / workload identity), never from the config; an S3-compatible
store (MinIO, Ceph, R2, SeaweedFS) is named by the standard `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`).

Reading survives a dropped connection: `open_read` returns a stream that retries a failed read with backoff and
re-opens the object at the byte offset already consumed (a byte-range request), so a tar stream above it goes on
at the same sample; it can check the object's sha256 as it streams (ShardIntegrityError at the end on a
mismatch). Writing is atomic where the backend allows: a local file is written under a temporary name and
renamed; an object is uploaded in one go only once the writer has finished without error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from functools import cache
from typing import BinaryIO

log = logging.getLogger(__name__)


def output_root():
    """Where relative output locations (train.storage_path, train.teacher_cache, the default sqlite tracking
    store) resolve: $BRCD_HOME if set; else the current directory, unless that is the working dir that Ray
    uploaded for a submitted job (under the node's `runtime_resources/`, removed when the job's runtime env is
    released), then ~/brcd-dist on the node that runs the driver. Either is created if missing."""
    from pathlib import Path

    home = os.environ.get("BRCD_HOME")
    cwd = Path.cwd()
    if not home and "runtime_resources" not in cwd.parts:
        return cwd
    root = Path(home).expanduser().resolve() if home else Path.home() / "brcd-dist"
    root.mkdir(parents=True, exist_ok=True)
    return root


OBJECT_SCHEMES = ("s3", "gs", "gcs")
READ_ONLY_SCHEMES = ("http", "https", "pipe")
READ_RETRIES = 8  # failed reads of one stream in a row before it is given up (each after a backoff)
BACKOFF_S = 0.2  # first wait; doubles each retry up to MAX_BACKOFF_S
MAX_BACKOFF_S = 5.0
CHUNK = 4 << 20  # bytes asked of an object store per ranged read
MIN_CHUNK = 16 << 10  # after a failure the ranged reads shrink towards this, so a link that drops every few
# hundred kB still makes progress; they grow back after each success


class ShardIntegrityError(RuntimeError):
    """An object's bytes do not match the sha256 that the manifest promises; the message is one line."""


class UnreadableError(OSError):
    """An object stayed unreadable after READ_RETRIES attempts; the message is one line naming it."""


class PermanentReadError(UnreadableError):
    """An object that retrying cannot make readable (unknown host, HTTP 401, 403, 404, ...); the message is one
    line naming it, without credentials, and the cause. A pass fails on it at once instead of skipping it."""


HTTP_TOKEN_ENV = "BRCD_HTTP_TOKEN"  # a bearer token for http(s) shard URLs that carry no user-info
PERMANENT_HTTP = {
    400: "bad request",
    401: "check the credentials: user:password@ in the URL or BRCD_HTTP_TOKEN",
    403: "check the credentials and the server's permissions",
    404: "no such shard at that URL",
    405: "the server does not serve GET there",
    410: "the shard was removed",
}


def scheme(uri: str | os.PathLike) -> str:
    """'s3', 'gs', 'http', 'https', 'pipe', or '' for a local path."""
    uri = os.fspath(uri)
    if uri.startswith("pipe:"):
        return "pipe"
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def join(base: str, *names: str) -> str:
    """base/name/...: '/' for URIs, os.path.join for local paths."""
    if is_local(base):
        return os.path.join(_local_path(base), *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def _local_path(uri: str | os.PathLike) -> str:
    uri = os.fspath(uri)
    return uri[len("file://") :] if uri.startswith("file://") else os.path.expanduser(uri)


def _check_known(uri: str) -> None:
    s = scheme(uri)
    if s not in ("", "file", *OBJECT_SCHEMES, *READ_ONLY_SCHEMES):
        raise ValueError(
            f"{uri!r}: unknown storage scheme {s!r} (allowed: a local path, s3://, gs://, http(s):// and pipe: to read)"
        )


def _check_writable(uri: str) -> None:
    _check_known(uri)
    if scheme(uri) in READ_ONLY_SCHEMES:
        raise ValueError(f"{uri!r}: {scheme(uri)} locations are read only (write to a local path, s3:// or gs://)")


# ----------------------------------------------------------------------------- pyarrow filesystems


def use_s3_endpoint(url: str) -> None:
    """Point every s3:// path of this process at an S3-compatible store (config key train.s3_endpoint), by the
    standard variable: pyarrow (Ray Train's checkpoints too) and boto3 read it, and `driver.connect_ray` hands it
    to the workers. "" keeps whatever the environment says."""
    if url and os.environ.get("AWS_ENDPOINT_URL_S3") != url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        _object_fs.cache_clear()


@cache
def _object_fs(kind: str, pid: int):
    """One pyarrow filesystem per backend and process (DataLoader workers fork: they make their own)."""
    import pyarrow.fs as pafs

    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        kw = {}
        if endpoint:
            scheme_, _, host = endpoint.partition("://")
            kw = dict(endpoint_override=host or endpoint, scheme=scheme_ if host else None)
        return pafs.S3FileSystem(
            region=region,
            connect_timeout=10,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
            **kw,
        )
    return pafs.GcsFileSystem()


def _fs_path(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, s3:// or gs:// URI."""
    import pyarrow.fs as pafs

    _check_known(uri)
    s = scheme(uri)
    if s in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    if s in OBJECT_SCHEMES:
        return _object_fs("s3" if s == "s3" else "gs", os.getpid()), uri.split("://", 1)[1].rstrip("/")
    raise ValueError(f"{uri!r}: {s} locations can only be streamed (open_read), not listed or written")


def _info(uri: str):
    fs, path = _fs_path(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    """A file/object or a directory/prefix is there."""
    if scheme(uri) in READ_ONLY_SCHEMES:
        raise ValueError(f"{uri!r}: cannot check whether a {scheme(uri)} location exists")
    import pyarrow.fs as pafs

    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    return _info(uri).type == pafs.FileType.File


def size(uri: str) -> int:
    import pyarrow.fs as pafs

    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    return info.size


def modified(uri: str) -> float:
    """When a file/object was last written, in seconds since the epoch (to the backend's precision: whole
    seconds on most object stores)."""
    import pyarrow.fs as pafs

    info = _info(uri)
    if info.type != pafs.FileType.File or info.mtime is None:
        raise FileNotFoundError(f"{uri}: no such file")
    return info.mtime.timestamp()


def listdir(uri: str) -> list[str]:
    """Names directly under a directory or prefix (sorted; empty when there is none)."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def list_files(uri: str) -> list[str]:
    """Every file under a directory or prefix, as paths relative to it ("a/b.jpg"), sorted; empty when none."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def makedirs(uri: str) -> None:
    """Create a directory (and parents); on object stores prefixes need no creation and this does nothing."""
    _check_writable(uri)
    if is_local(uri):
        os.makedirs(_local_path(uri), exist_ok=True)


def remove(uri: str) -> None:
    fs, path = _fs_path(uri)
    fs.delete_file(path)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """A binary file to write `uri` with; it appears whole when the block ends without error, else not at all.

    Local: a temporary file beside it, renamed over it. Object store: the bytes go to a local temporary file
    (kept in memory while small) and are uploaded in one go (one PUT, or a multipart upload completed at the end).
    """
    _check_writable(uri)
    if is_local(uri):
        path = _local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as f:
        yield f
        f.seek(0)
        fs, path = _fs_path(uri)
        with fs.open_output_stream(path) as out:
            shutil.copyfileobj(f, out, CHUNK)


def upload(local_path: str, uri: str) -> None:
    """Copy a local file to `uri` (atomically, as open_write)."""
    with open(local_path, "rb") as src, open_write(uri) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def copy_tree(local_dir: str, uri: str) -> None:
    """Upload every file under a local directory to the same relative names under `uri`."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            upload(os.path.join(root, name), join(uri, *rel.split(os.sep)))


# ----------------------------------------------------------------------------- reading that survives faults


class _Source:
    """Opens a backend's byte stream at an offset; `read(n)` returns up to n bytes, b'' at the end."""

    resumable = True

    def __init__(self, uri: str):
        self.uri = uri

    def open_at(self, offset: int) -> None:
        raise NotImplementedError

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _LocalSource(_Source):
    def open_at(self, offset: int) -> None:
        self.f = open(_local_path(self.uri), "rb")
        self.f.seek(offset)

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        if getattr(self, "f", None) is not None:
            self.f.close()


class _ObjectSource(_Source):
    """pyarrow object store: each read is one ranged GET at the current offset; the ranges shrink after a
    failure (a link that keeps dropping still makes progress) and grow back after each success."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.chunk = CHUNK

    def open_at(self, offset: int) -> None:
        fs, path = _fs_path(self.uri)
        self.f = fs.open_input_file(path)
        self.offset, self.size = offset, self.f.size()

    def read(self, n: int) -> bytes:
        want = min(n, self.chunk)
        try:
            data = self.f.read_at(want, self.offset)
        except Exception:
            self.chunk = max(MIN_CHUNK, self.chunk // 8)
            raise
        if not data and self.offset < self.size:  # a cut response must not pass for the end of the object
            raise OSError(f"{self.uri}: empty read at byte {self.offset} of {self.size}")
        self.chunk = min(CHUNK, self.chunk * 2)
        self.offset += len(data)
        return data

    def close(self) -> None:
        if getattr(self, "f", None) is not None:
            self.f.close()


def http_request(uri: str, headers: dict | None = None) -> urllib.request.Request:
    """A GET of `uri` with its user-info (`http://user:password@host/...`, as curl takes it) turned into an HTTP
    Basic Authorization header and removed from the URL, or else `Authorization: Bearer $BRCD_HTTP_TOKEN` when that
    variable is set. The credentials live only in the header, which nothing logs."""
    parts = urllib.parse.urlsplit(uri)
    auth = None
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
        uri = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    elif os.environ.get(HTTP_TOKEN_ENV):
        auth = f"Bearer {os.environ[HTTP_TOKEN_ENV]}"
    req = urllib.request.Request(uri, headers=headers or {})
    if auth:
        req.add_unredirected_header("Authorization", auth)  # not carried to the target of a redirect
    return req


def _shown(uri: str) -> str:
    from brcd_dist.redact import redact  # credentials in a URL never reach a message

    return redact(uri)


class _HttpSource(_Source):
    """http(s): one streaming GET with `Range: bytes=offset-` (a server that ignores ranges: skip ahead). A body
    that ends before its Content-Length is a failure (urllib returns it as a quiet end), so it is retried. An
    unknown host and the HTTP statuses of PERMANENT_HTTP are PermanentReadError: no retry."""

    def open_at(self, offset: int) -> None:
        req = http_request(self.uri, {"Range": f"bytes={offset}-"} if offset else {})
        try:
            self.resp = urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in PERMANENT_HTTP:
                raise PermanentReadError(
                    f"{_shown(self.uri)}: HTTP {err.code} {err.reason} ({PERMANENT_HTTP[err.code]})"
                ) from None
            raise OSError(f"HTTP {err.code} {err.reason}") from None  # 5xx, 429...: worth retrying
        except urllib.error.URLError as err:
            if isinstance(err.reason, socket.gaierror) and err.reason.errno in _UNKNOWN_HOST:
                host = urllib.parse.urlsplit(self.uri).hostname
                raise PermanentReadError(f"{_shown(self.uri)}: unknown host {host!r} ({err.reason.strerror})") from None
            raise
        length = self.resp.headers.get("Content-Length")
        self.left = int(length) if length is not None else None
        if offset and self.resp.status != 206:
            skip = offset
            while skip:
                got = self.read(min(skip, CHUNK))
                if not got:
                    raise OSError(f"{_shown(self.uri)}: ended before offset {offset}")
                skip -= len(got)

    def read(self, n: int) -> bytes:
        data = self.resp.read(n)
        if self.left is not None:
            if not data and self.left > 0:
                raise OSError(f"{_shown(self.uri)}: response cut {self.left} bytes short")
            self.left -= len(data)
        return data

    def close(self) -> None:
        if getattr(self, "resp", None) is not None:
            self.resp.close()


# getaddrinfo's "no such name" answers (EAI_NONAME, EAI_NODATA where defined); EAI_AGAIN (a resolver that did not
# answer) stays a transient error
_UNKNOWN_HOST = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}


class _PipeSource(_Source):
    """pipe:PROGRAM ARGS: the program's stdout, run as an argv (shlex-split, no shell); not resumable."""

    resumable = False

    def open_at(self, offset: int) -> None:
        if offset:
            raise UnreadableError(f"{self.uri}: a pipe: stream cannot resume at byte {offset}")
        argv = shlex.split(self.uri[len("pipe:") :])
        if not argv:
            raise ValueError(f"{self.uri!r}: pipe: needs a program to run")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            if self.proc.wait() != 0:
                raise OSError(f"{self.uri}: exit status {self.proc.returncode}: {err[-300:]}")
        return data

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()


def _source(uri: str) -> _Source:
    _check_known(uri)
    s = scheme(uri)
    if s in ("", "file"):
        return _LocalSource(uri)
    if s in OBJECT_SCHEMES:
        return _ObjectSource(uri)
    if s in ("http", "https"):
        return _HttpSource(uri)
    return _PipeSource(uri)


class ResumingReader(io.RawIOBase):
    """A read-only stream of one object that re-opens it at the consumed offset after a failed read.

    `retries` failed attempts in a row (backoff doubling from BACKOFF_S) raise UnreadableError; a successful read
    resets the count. With `sha256` set, the bytes are hashed as they pass and `finish()` (or reaching the end)
    checks them: ShardIntegrityError on a mismatch. `reopens` counts the re-opens after failures.
    """

    def __init__(self, uri: str, *, sha256: str | None = None, retries: int = READ_RETRIES):
        super().__init__()
        self.uri, self.expected, self.retries = uri, sha256, retries
        self.offset, self.reopens, self.failed = 0, 0, False
        self._src = _source(uri)  # one per stream: an object source keeps its shrunken range size across re-opens
        self._open = False
        self._hash = hashlib.sha256() if sha256 else None
        self._eof = False

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        attempt = 0
        while True:
            try:
                if not self._open:
                    self._src.open_at(self.offset)
                    self._open = True
                return self._src.read(n)
            except (ValueError, UnreadableError, FileNotFoundError) as err:  # retrying cannot help
                self.failed = True
                self._drop()
                if isinstance(err, FileNotFoundError):
                    raise UnreadableError(f"{_shown(self.uri)}: not found") from err
                raise
            except Exception as err:  # connection reset, timeout, truncated response: retry
                self._drop()
                attempt += 1
                if attempt > self.retries or (self.offset and not self._src.resumable):
                    self.failed = True
                    raise UnreadableError(
                        f"{_shown(self.uri)}: unreadable at byte {self.offset} after {attempt} "
                        f"attempts: {type(err).__name__}: {_shown(str(err))[:200]}"
                    ) from err
                wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1))
                log.info(
                    "%s: read failed at byte %d (%s); re-opening there in %.1f s",
                    _shown(self.uri),
                    self.offset,
                    type(err).__name__,
                    wait,
                )
                time.sleep(wait)
                self.reopens += 1

    def _drop(self) -> None:
        if self._open:
            with contextlib.suppress(Exception):
                self._src.close()
        self._open = False

    def readinto(self, b) -> int:
        if self._eof:
            return 0
        data = self._read(len(b))
        if not data:
            self._eof = True
            self._verify()
            return 0
        n = len(data)
        b[:n] = data
        self.offset += n
        if self._hash is not None:
            self._hash.update(data)
        return n

    def _verify(self) -> None:
        if self._hash is None:
            return
        got = self._hash.hexdigest()
        self._hash = None
        if got != self.expected:
            self.failed = True
            raise ShardIntegrityError(
                f"{self.uri}: sha256 {got[:16]}... differs from the manifest's "
                f"{str(self.expected)[:16]}... (damaged or replaced shard)"
            )

    def finish(self, max_drain: int = 1 << 20) -> None:
        """The consumer is done: read what is left (a tar reader stops at the end-of-archive blocks) and check the
        sha256. Skipped when the stream failed, or when more than max_drain bytes are left (the consumer stopped
        early on purpose)."""
        if self.failed or self._hash is None:
            return
        left = 0
        while not self._eof:
            chunk = self.read(CHUNK)
            left += len(chunk)
            if left > max_drain:
                self._hash = None
                return

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(
    uri: str, *, sha256: str | None = None, retries: int = READ_RETRIES, buffer_size: int = 1 << 20
) -> io.BufferedReader:
    """A buffered binary stream of `uri` that survives dropped connections (see ResumingReader); the reader is
    at `.raw`."""
    return io.BufferedReader(ResumingReader(uri, sha256=sha256, retries=retries), buffer_size=buffer_size)


def probe(uri: str) -> None:
    """Open `uri` and read its first byte: PermanentReadError (or UnreadableError after the retries) now, before a
    job starts its workers, rather than in the middle of a pass."""
    with open_read(uri, buffer_size=1) as f:
        f.read(1)


def file_sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_read(uri) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


__all__ = [
    "ResumingReader",
    "ShardIntegrityError",
    "UnreadableError",
    "copy_tree",
    "exists",
    "file_sha256",
    "is_file",
    "is_local",
    "join",
    "list_files",
    "listdir",
    "makedirs",
    "open_read",
    "open_write",
    "read_bytes",
    "remove",
    "scheme",
    "size",
    "upload",
    "write_bytes",
]
