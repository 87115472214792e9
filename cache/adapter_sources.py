"""Where adapter files come from: LOCAL directories, the Hugging Face Hub, S3; PBASE is refused.

    sources = AdapterSources(AdapterSourceConfig(adapter_root=..., hub_cache_dir=..., hub_offline=...,
                                                 s3=S3CacheConfig(cache_dir=..., max_bytes=...)))
    path = sources.resolve(adapter_id, source, api_token)     # -> local directory holding the PEFT files

LOCAL: `adapter_id` is a directory. With `adapter_root` set, ids are confined to it: a relative id is taken
under the root, and the fully resolved path (symlinks and `..` resolved) must stay inside the resolved
root, else InvalidArgument; so must the resolved adapter files (a file symlink out of the root is refused
as a directory symlink is). Ids with a NUL byte, over-long ones and symlink loops are InvalidArgument.
HUB: `org/name` or `org/name@revision`, fetched by huggingface_hub into its
standard cache (`models--org--name/snapshots/<commit>/`, `refs/<revision>`); only the two PEFT files are
fetched. S3: `s3://bucket/prefix` into a size-bounded local cache (cache/s3_source.py), then read like
LOCAL. PBASE (Predibase's hosted registry) needs a proprietary service: UNIMPLEMENTED.
This module reads no environment variable: huggingface_hub itself honours HF_HUB_OFFLINE and
HF_HUB_CACHE/HF_HOME, boto3 the AWS_* settings; the CLI can also pass `hub_offline` / `hub_cache_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.s3_source import S3Adapters, S3CacheConfig
from model.adapters.peft_loader import CONFIG_FILE, WEIGHTS_FILE
from model.errors import InvalidArgument, NotFound, Unimplemented, shown

SOURCES = ("hub", "s3", "local", "pbase")
MAX_ID_CHARS = 4096  # PATH_MAX; no legitimate adapter id or path is longer
MAX_NAME_BYTES = 255  # NAME_MAX of one path component


def _check_local_id(adapter_id: str) -> None:
    if not adapter_id:
        raise InvalidArgument("empty LOCAL adapter id")
    if "\x00" in adapter_id:
        raise InvalidArgument(f"LOCAL adapter id {shown(adapter_id)} contains a NUL byte")
    if len(adapter_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"LOCAL adapter id of {len(adapter_id)} characters; at most {MAX_ID_CHARS}")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in adapter_id.split("/")):
        raise InvalidArgument(
            f"LOCAL adapter id {shown(adapter_id)} has a path component longer than {MAX_NAME_BYTES} bytes"
        )


@dataclass(frozen=True)
class AdapterSourceConfig:
    adapter_root: Path | None = None  # LOCAL ids must resolve inside it (None: any directory)
    hub_cache_dir: Path | None = None  # None: huggingface_hub's default cache
    hub_offline: bool = False  # True: cache only (local_files_only), never the network
    s3: S3CacheConfig | None = None  # None: S3 ids are refused (no cache directory to put them in)


class AdapterSources:
    def __init__(self, config: AdapterSourceConfig | None = None):
        self.config = config or AdapterSourceConfig()
        self._s3 = S3Adapters(self.config.s3) if self.config.s3 is not None else None

    def resolve(self, adapter_id: str, source: str = "hub", api_token: str | None = None) -> Path:
        """-> directory with adapter_config.json (+ adapter_model.safetensors). Raises model.errors types."""
        source = source.lower()
        if source == "local":
            return self._local(adapter_id)
        if source == "hub":
            return self._hub(adapter_id, api_token)
        if source == "pbase":
            raise Unimplemented(
                f"adapter source PBASE is not supported by this shard: {adapter_id!r} names an adapter in "
                "Predibase's hosted registry, which only Predibase's proprietary service and API serve; "
                "publish it to the Hugging Face Hub or S3, or pass a LOCAL directory"
            )
        if source == "s3":
            if self._s3 is None:
                raise Unimplemented(
                    f"S3 adapter {adapter_id!r}: this shard has no adapter cache directory for S3 downloads "
                    "(--adapter-cache-dir)"
                )
            return self._s3.fetch(adapter_id)
        raise InvalidArgument(f"unknown adapter source {source!r}; known: {', '.join(SOURCES)}")

    def _local(self, adapter_id: str) -> Path:
        _check_local_id(adapter_id)
        root = self.config.adapter_root
        path = Path(adapter_id)
        try:
            if root is not None:
                root_resolved = Path(root).resolve()
                # Resolve first, then compare: a symlink or `..` inside the id must not escape the root.
                resolved = (root_resolved / path).resolve()
                if not resolved.is_relative_to(root_resolved):
                    raise InvalidArgument(
                        f"LOCAL adapter id {shown(adapter_id)} resolves to {shown(str(resolved))}, "
                        f"outside the adapter root {root_resolved}"
                    )
                path = resolved
                # The files too: a link inside the root to a file outside it would be read otherwise.
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    target = (path / name).resolve()
                    if not target.is_relative_to(root_resolved):
                        raise InvalidArgument(
                            f"LOCAL adapter {shown(adapter_id)}: {name} links to {shown(str(target))}, "
                            f"outside the adapter root {root_resolved}"
                        )
            else:
                path = path.resolve()
            is_dir = path.is_dir()
        except (OSError, RuntimeError) as e:  # a symlink loop, a name the file system refuses
            raise InvalidArgument(
                f"LOCAL adapter id {shown(adapter_id)} cannot be resolved: {type(e).__name__}: "
                f"{shown(getattr(e, 'strerror', None) or str(e), 120)}"
            ) from None
        if not is_dir:
            raise NotFound(f"LOCAL adapter directory {shown(str(path))} does not exist")
        return path

    def _hub(self, adapter_id: str, api_token: str | None) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, _, revision = adapter_id.partition("@")
        try:
            path = snapshot_download(
                repo_id,
                revision=revision or None,
                cache_dir=self.config.hub_cache_dir,
                token=api_token,
                local_files_only=self.config.hub_offline,
                allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
            )
        except HFValidationError as e:
            raise InvalidArgument(f"HUB adapter id {adapter_id!r} is not a valid repository id: {e}") from e
        except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError,
                EntryNotFoundError) as e:  # fmt: skip
            where = "in the local hub cache (offline)" if self.config.hub_offline else "on the hub"
            raise NotFound(f"HUB adapter {adapter_id!r} not found {where}: {e}") from e
        except OSError as e:  # network failures surface as OSError subclasses
            raise NotFound(f"HUB adapter {adapter_id!r} could not be fetched: {e}") from e
        return Path(path)
