"""S3 adapters: `s3://bucket/prefix` -> a local PEFT directory in a size-bounded cache directory.

    s3 = S3Adapters(S3CacheConfig(cache_dir=..., max_bytes=...))
    path = s3.fetch("s3://bucket/team/sql-lora")   # holds adapter_config.json + adapter_model.safetensors

The adapter is the two PEFT files directly under the prefix (`prefix/adapter_config.json`,
`prefix/adapter_model.safetensors`); nothing else is fetched. boto3 finds credentials, region and
endpoint the standard way (environment: AWS_ACCESS_KEY_ID / AWS_PROFILE / AWS_REGION /
AWS_ENDPOINT_URL..., ~/.aws/config and credentials, instance roles) unless S3CacheConfig names them;
boto3 is imported on first use only.

Cache layout: `cache_dir/<sha256 of s3://bucket/prefix>/` holds the two files and `.manifest.json` (the id and
each object's size and ETag). A fetch asks S3 for both objects' current size and ETag (HeadObject):
if the manifest matches, the cached copy is used (no download); otherwise both objects are downloaded
into a fresh `cache_dir/.partial-*` directory (each GET checked against the ETag and size just seen),
the manifest is written last, and the directory is renamed into place in one step. An interrupted or
failed download therefore never leaves a half-written adapter where a load would find it: the partial
directory is removed on any error, and one left by a killed process is never read (and is deleted by a
later fetch once it is an hour old). Several processes may share the cache (the ranks of one host):
installs and evictions take an exclusive lock on `cache_dir/.lock`; two ranks fetching the same
adapter at once both download, and the second keeps the first's copy.

Size bound: after an install, least recently used entries (by manifest mtime, touched on every hit)
are deleted until the cache holds at most `max_bytes`; an entry used in the last `grace_seconds` is
kept even then, so a process that has just resolved a path can still read it. An adapter larger than
`max_bytes` is refused before any download (RESOURCE_EXHAUSTED).

Errors (model.errors): no adapter_config.json under the prefix, or no such bucket: NOT_FOUND;
AccessDenied or no usable credentials: PERMISSION_DENIED; unreachable endpoint, 5xx, an object that
changed while it was read: UNAVAILABLE; a malformed id, or a config without the weights file:
INVALID_ARGUMENT.
The files are then validated exactly as a LOCAL directory is (model/adapters/peft_loader.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model.adapters.peft_loader import CONFIG_FILE, WEIGHTS_FILE
from model.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

FILES = (CONFIG_FILE, WEIGHTS_FILE)
MANIFEST = ".manifest.json"
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few KB
STALE_PARTIAL_SECONDS = 3600.0  # a partial directory this old belongs to a process that died
_ID_RE = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?")
_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken", "AccountProblem", "403", "Forbidden"}  # fmt: skip
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


@dataclass(frozen=True)
class S3CacheConfig:
    cache_dir: Path
    max_bytes: int = 20 << 30
    endpoint_url: str | None = None  # None: boto3's (AWS_ENDPOINT_URL, config files, AWS)
    region: str | None = None  # None: boto3's (AWS_REGION / AWS_DEFAULT_REGION, config files)
    profile: str | None = None  # None: boto3's (AWS_PROFILE, default)
    grace_seconds: float = 60.0
    max_attempts: int = 3  # per S3 call, botocore's standard retry mode (backoff between attempts)


def parse_s3_id(adapter_id: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without surrounding slashes); InvalidArgument otherwise."""
    m = _ID_RE.fullmatch(adapter_id)
    if m is None:
        raise InvalidArgument(
            f"S3 adapter id {adapter_id!r} is not s3://bucket/prefix (bucket: 3-63 lowercase letters, "
            "digits, dots, hyphens)"
        )
    prefix = (m.group("prefix") or "").strip("/")
    if len(prefix.encode()) + len(WEIGHTS_FILE) + 1 > 1024 or any(ord(c) < 32 for c in prefix):
        raise InvalidArgument(f"S3 adapter id {adapter_id!r}: prefix too long or with control characters")
    return m.group("bucket"), prefix


class S3Adapters:
    def __init__(self, config: S3CacheConfig):
        if config.max_bytes <= 0:
            raise ValueError(f"S3 cache max_bytes must be > 0, got {config.max_bytes}")
        self.config = config
        self.root = Path(config.cache_dir)
        self._lock = threading.Lock()  # one fetch at a time in this process (I/O and model threads)
        self._s3 = None

    def client(self):
        """The boto3 S3 client (made once; boto3 clients are thread-safe, sessions are not)."""
        if self._s3 is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:
                raise Unimplemented(f"S3 adapters need boto3, which is not installed: {e}") from e
            session = boto3.session.Session(profile_name=self.config.profile, region_name=self.config.region)
            retries = {"max_attempts": self.config.max_attempts, "mode": "standard"}
            config = Config(retries=retries, connect_timeout=10, read_timeout=60)
            self._s3 = session.client("s3", endpoint_url=self.config.endpoint_url, config=config)
        return self._s3

    def fetch(self, adapter_id: str) -> Path:
        """-> the local directory holding the adapter's two files (module docstring)."""
        bucket, prefix = parse_s3_id(adapter_id)
        keys = {name: f"{prefix}/{name}" if prefix else name for name in FILES}
        with self._lock, _boto_errors(adapter_id):
            client = self.client()
            heads = {name: self._head(client, bucket, key) for name, key in keys.items()}
            if heads[CONFIG_FILE] is None:
                raise NotFound(f"S3 adapter {adapter_id!r}: no s3://{bucket}/{keys[CONFIG_FILE]}")
            if heads[WEIGHTS_FILE] is None:
                raise InvalidArgument(
                    f"S3 adapter {adapter_id!r}: missing {WEIGHTS_FILE} under the prefix (only safetensors "
                    "adapters are loaded)"
                )
            self._check_sizes(adapter_id, heads)
            canonical = f"s3://{bucket}/{prefix}"  # s3://b/p/ and s3://b//p name the same adapter
            manifest = {"id": canonical, "files": {n: list(h) for n, h in heads.items()}}
            final = self.root / hashlib.sha256(canonical.encode()).hexdigest()[:32]
            if _manifest_matches(final, manifest):
                _touch(final)
                return final
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
            try:
                for name, key in keys.items():
                    self._get(client, bucket, key, tmp / name, *heads[name], adapter_id)
                (tmp / MANIFEST).write_text(json.dumps(manifest))  # last: a complete copy has one
                with self._exclusive():
                    _install(tmp, final, manifest)
                    self._evict(keep=final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already once installed
            return final

    # ---- S3 calls ------------------------------------------------------------------------------------
    @staticmethod
    def _head(client, bucket: str, key: str) -> tuple[int, str] | None:
        """(size, ETag) of the object, None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            r = client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(r["ContentLength"]), str(r["ETag"])

    @staticmethod
    def _get(client, bucket: str, key: str, dest: Path, size: int, etag: str, adapter_id: str) -> None:
        r = client.get_object(Bucket=bucket, Key=key)
        if str(r["ETag"]) != etag:
            raise Unavailable(f"S3 adapter {adapter_id!r}: {key} changed while it was fetched; retry")
        got = 0
        with dest.open("wb") as f:
            for chunk in r["Body"].iter_chunks(1 << 20):
                got += len(chunk)
                if got > size:
                    raise Unavailable(f"S3 adapter {adapter_id!r}: {key} is longer than {size} bytes")
                f.write(chunk)
        if got != size:
            raise Unavailable(f"S3 adapter {adapter_id!r}: {key} ended after {got} of {size} bytes")

    def _check_sizes(self, adapter_id: str, heads: dict[str, tuple[int, str]]) -> None:
        if heads[CONFIG_FILE][0] > MAX_CONFIG_BYTES:
            raise InvalidArgument(
                f"S3 adapter {adapter_id!r}: {CONFIG_FILE} is {heads[CONFIG_FILE][0]} bytes "
                f"(limit {MAX_CONFIG_BYTES})"
            )
        total = sum(size for size, _ in heads.values())
        if total > self.config.max_bytes:
            raise ResourceExhausted(
                f"S3 adapter {adapter_id!r} is {total} bytes, more than the adapter cache holds "
                f"({self.config.max_bytes}; raise --adapter-cache-max-bytes)"
            )

    # ---- the cache directory ---------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self):
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _evict(self, keep: Path) -> None:
        """Delete least recently used entries until the cache fits max_bytes (module docstring)."""
        now = time.time()
        entries = []
        for d in self.root.iterdir():
            if d.name.startswith((".partial-", ".stale-")) and d.is_dir():
                if now - d.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(d, ignore_errors=True)  # left by a process that died mid-download
                continue
            if d.name.startswith(".") or not d.is_dir():
                continue
            used = (d / MANIFEST).stat().st_mtime if (d / MANIFEST).exists() else 0.0
            entries.append((used, d, sum(f.stat().st_size for f in d.iterdir() if f.is_file())))
        total = sum(size for _, _, size in entries)
        for used, d, size in sorted(entries):
            if total <= self.config.max_bytes:
                break
            if d == keep or now - used < self.config.grace_seconds:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size


def _manifest_matches(d: Path, manifest: dict) -> bool:
    try:
        if json.loads((d / MANIFEST).read_text()) != manifest:
            return False
        return all((d / n).stat().st_size == size for n, (size, _) in manifest["files"].items())
    except (OSError, ValueError):
        return False


def _touch(d: Path) -> None:
    try:
        os.utime(d / MANIFEST)
    except OSError:
        pass  # evicted by another process meanwhile: the next fetch downloads again


def _install(tmp: Path, final: Path, manifest: dict) -> None:
    """Rename the complete download into place (under the cache lock)."""
    if _manifest_matches(final, manifest):  # another process installed the same version meanwhile
        _touch(final)
        return
    if final.exists():  # an older version: moved aside in one step, then deleted
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=final.parent))
        os.rename(final, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, final)
    _touch(final)


def _error_code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


@contextmanager
def _boto_errors(adapter_id: str):
    """botocore's exceptions -> the adapter errors that name the gRPC status."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
            ProfileNotFound,
        )
    except ImportError:  # no boto3: client() says so
        yield
        return
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError, ProfileNotFound) as e:
        raise PermissionDenied(f"S3 adapter {adapter_id!r}: no usable AWS credentials: {e}") from e
    except ClientError as e:
        code, status = _error_code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _DENIED or status == 403:
            raise PermissionDenied(f"S3 adapter {adapter_id!r}: access denied ({code}): {e}") from e
        if code in _MISSING or status == 404:
            raise NotFound(f"S3 adapter {adapter_id!r} not found ({code}): {e}") from e
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
            raise Unavailable(f"S3 adapter {adapter_id!r}: S3 failed ({code}): {e}") from e
        raise InvalidArgument(f"S3 adapter {adapter_id!r}: S3 refused the request ({code}): {e}") from e
    except (BotoCoreError, ConnectionError) as e:  # endpoint unreachable, timeouts, connection resets
        raise Unavailable(f"S3 adapter {adapter_id!r}: S3 could not be reached: {e}") from e
    except OSError as e:  # the local cache directory (disk full, permissions)
        raise Unavailable(f"S3 adapter {adapter_id!r}: the adapter cache failed: {e}") from e
