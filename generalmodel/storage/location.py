"""Object storage as a URI: bare paths, file:// and s3:// through one pyarrow filesystem layer.

`resolve(uri, storage_cfg)` gives a `Location` (filesystem + path). Writes of single objects are
atomic (a local temp file renamed into place; one S3 PUT). Multi-file artifacts (datasets,
checkpoints) are published by writing a manifest last: `publish_manifest` / `read_manifest`.
S3 errors are translated into `StorageError`s that name the URI and the cause (unreachable
endpoint, missing bucket, rejected credentials); credentials never appear in messages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from generalmodel import RunFailed, UserError
from generalmodel.config import StorageConfig

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class StorageError(UserError):
    """A URI that cannot be read or written, with the reason."""


class StorageFull(RunFailed):
    """A write failed for lack of space: a runtime failure (exit 1), nothing half-written published."""


class StorageUnavailable(RunFailed):
    """The store kept failing for longer than storage.retry_timeout_s during a run."""


# Errors worth retrying: the endpoint is down or overloaded, a connection broke. A missing bucket,
# rejected credentials or a full local disk are not (they fail at once).
TRANSIENT = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Couldn't connect",
    "Connection refused",
    "Connection reset",
    "SERVICE_UNAVAILABLE",
    "SlowDown",
    "INTERNAL_FAILURE",
    "HTTP response code: 5",
    "timed out",
    "Timeout",
)


def with_retries(what: str, timeout_s: float, fn, *args):
    """`fn(*args)`, retried with exponential backoff (0.5 s doubling to 8 s) while it fails with a
    transient store error, for at most `timeout_s`; then StorageUnavailable (the run fails, exit 1).
    `timeout_s=0`: no retries, the StorageError as it is.
    For the I/O of a running job (checkpoints, shard reads, exports), which must ride out a
    restarting S3 server; start-up checks fail fast instead."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return fn(*args)
        except StorageError as e:
            if timeout_s <= 0 or not any(marker in str(e) for marker in TRANSIENT):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(
                    f"{what}: the store kept failing for {timeout_s:.0f}s (storage.retry_timeout_s): {e}"
                ) from None
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, e)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


@dataclass(frozen=True)
class Location:
    """A place in a filesystem: `fs` + `path` (bucket/key for S3), and its `uri` for humans."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.uri, *parts))

    def info(self) -> pafs.FileInfo:
        return _call(self, lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return _call(self, read)

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        if self.is_local:
            parent = posixpath.dirname(self.path)
            tmp = posixpath.join(parent, f".{posixpath.basename(self.path)}.tmp-{uuid.uuid4().hex}")

            def write_local() -> None:
                self.fs.create_dir(parent, recursive=True)
                try:
                    with self.fs.open_output_stream(tmp) as f:
                        f.write(data)
                    self.fs.move(tmp, self.path)  # rename(2): atomic within a filesystem
                except BaseException:  # a full disk: leave no temp file behind
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    raise

            _call(self, write_local)
        else:

            def write_s3() -> None:
                with self.fs.open_output_stream(self.path) as f:  # one object, visible on close
                    f.write(data)

            _call(self, write_s3)

    def list_dir(self) -> list[pafs.FileInfo]:
        """The entries directly below this location (empty if absent)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return _call(self, lambda: self.fs.get_file_info(selector))

    def list_files(self) -> list[pafs.FileInfo]:
        """Every file below this location, recursively, sorted by path (empty if absent)."""
        if not self.exists():
            return []
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = _call(self, lambda: self.fs.get_file_info(selector))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def delete_dir(self) -> None:
        if self.exists():
            _call(self, lambda: self.fs.delete_dir(self.path))


def resolve(uri: str, cfg: StorageConfig | None = None) -> Location:
    """Map a URI to a Location. Relative paths are relative to the current directory."""
    cfg = cfg or StorageConfig()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        path = os.path.abspath(os.path.expanduser(path))
        return Location(pafs.LocalFileSystem(), path, path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        key = parsed.path.strip("/")
        path = f"{parsed.netloc}/{key}" if key else parsed.netloc
        return Location(s3_filesystem(cfg), path, f"s3://{path}")
    raise StorageError(f"{uri!r}: unsupported URI scheme {parsed.scheme!r}; use a path, file:// or s3://")


def s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    cfg = cfg.resolved()
    # Non-AWS servers (Ceph RGW, MinIO) reject the AWS SDK's default request checksums.
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    kwargs: dict[str, Any] = dict(
        region=cfg.region,
        connect_timeout=cfg.connect_timeout_s,
        request_timeout=cfg.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs["access_key"] = cfg.access_key_id.get_secret_value()
        kwargs["secret_key"] = cfg.secret_access_key.get_secret_value()
    if cfg.endpoint_url:
        endpoint = urlparse(cfg.endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
            raise StorageError(f"storage.endpoint_url {cfg.endpoint_url!r} must look like http://host:port")
        kwargs["endpoint_override"] = endpoint.netloc
        kwargs["scheme"] = endpoint.scheme
    return pafs.S3FileSystem(**kwargs)


def check_bucket(loc: Location) -> None:
    """Fail early, with the reason, when an S3 location's bucket is unreachable or missing."""
    if loc.is_local:
        return
    bucket = loc.path.split("/", 1)[0]
    info = _call(loc, lambda: loc.fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{loc.uri}: bucket {bucket!r} does not exist (create it first)")


def _call(loc: Location, fn):
    try:
        return fn()
    except FileNotFoundError as e:
        raise StorageError(f"{loc.uri}: not found ({e})") from None
    except OSError as e:
        if e.errno == errno.ENOSPC or "No space left on device" in str(e):
            raise StorageFull(f"{loc.uri}: no space left on the device ({e})") from None
        raise StorageError(f"{loc.uri}: {_explain_s3(str(e))}") from None


def _explain_s3(message: str) -> str:
    if "NETWORK_CONNECTION" in message or "curlCode" in message:
        return f"cannot reach the S3 endpoint ({message})"
    if "NO_SUCH_BUCKET" in message:
        return f"the bucket does not exist ({message})"
    if any(s in message for s in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        return f"the S3 server rejected the credentials ({message})"
    return message


# ---------------------------------------------------------------------------------------------
# Manifests: the last file written, the first one read.


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish_manifest(loc: Location, manifest: dict[str, Any]) -> str:
    """Write `loc/manifest.json` (atomically); returns its sha256, the artifact's identity."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    loc.join(MANIFEST).write_bytes(data)
    return sha256_hex(data)


def read_manifest(loc: Location, kind: str) -> tuple[dict[str, Any], str]:
    """The manifest at `loc` and its sha256; refuses a prefix without one (an unpublished or
    half-written artifact) or one of another kind."""
    path = loc.join(MANIFEST)
    if not path.exists():
        what = "nothing" if not loc.exists() else "files but no manifest.json (unpublished or incomplete)"
        raise StorageError(f"{loc.uri} is not a published {kind}: it holds {what}")
    data = path.read_bytes()
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise StorageError(f"{path.uri} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        got = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise StorageError(f"{path.uri} describes a {got!r}, expected a {kind!r}")
    return manifest, sha256_hex(data)
