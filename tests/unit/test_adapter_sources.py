"""Adapter sources: LOCAL confinement (symlinks, `..`), HUB through a real offline cache layout."""

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest

from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from model.adapters.peft_loader import load_peft_adapter
from model.errors import InvalidArgument, NotFound, Status, Unimplemented


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "adapters"
    (r / "team" / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (r / "escape").symlink_to(tmp_path / "outside")  # a symlink inside the root pointing out of it
    (r / "alias").symlink_to(r / "team" / "good")  # a symlink that stays inside
    return r


def test_local_without_root_takes_any_existing_directory(root, tmp_path):
    src = AdapterSources()
    assert src.resolve(str(tmp_path / "outside"), "local") == (tmp_path / "outside").resolve()
    with pytest.raises(NotFound, match="LOCAL adapter directory .* does not exist"):
        src.resolve(str(tmp_path / "missing"), "local")


def test_local_root_confines_ids_resolving_symlinks_and_dotdot(root, tmp_path):
    src = AdapterSources(AdapterSourceConfig(adapter_root=root))
    assert src.resolve("team/good", "LOCAL") == (root / "team" / "good").resolve()
    assert src.resolve("alias", "local") == (root / "team" / "good").resolve()
    assert src.resolve("team/../team/good", "local") == (root / "team" / "good").resolve()
    assert src.resolve(str(root / "team" / "good"), "local") == (root / "team" / "good").resolve()
    for bad in ("../outside", "team/../../outside", "escape", str(tmp_path / "outside"), "/etc"):
        with pytest.raises(InvalidArgument, match="outside the adapter root"):
            src.resolve(bad, "local")
    with pytest.raises(NotFound, match="does not exist"):
        src.resolve("team/missing", "local")


def test_pbase_is_unsupported_saying_why_and_s3_needs_a_cache_directory():
    src = AdapterSources()
    with pytest.raises(Unimplemented, match="PBASE is not supported.*Predibase's") as e:
        src.resolve("org/x", "pbase")
    assert e.value.status == Status.UNIMPLEMENTED
    with pytest.raises(Unimplemented, match="no adapter cache directory.*--adapter-cache-dir"):
        src.resolve("s3://bucket/x", "s3")
    with pytest.raises(InvalidArgument, match="unknown adapter source 'ftp'"):
        src.resolve("x", "ftp")


def base_config(model_dir):
    return SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))


def _hub_cache(cache, repo_id, adapter_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay files out like huggingface_hub: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (adapter_dir / f).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hub_offline_reads_the_standard_cache_layout(tmp_path, tiny_model_dir, adapter_factory):
    adapter = adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj"), seed=1)
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "acme/tiny-lora", adapter)
    src = AdapterSources(AdapterSourceConfig(hub_cache_dir=cache, hub_offline=True))
    path = src.resolve("acme/tiny-lora", "hub")
    assert path == snap
    assert src.resolve("acme/tiny-lora@main", "hub") == snap
    loaded = load_peft_adapter(path, base_config(tiny_model_dir))
    assert loaded.rank == 3
    with pytest.raises(NotFound, match=r"'acme/other' not found in the local hub cache \(offline\)"):
        src.resolve("acme/other", "hub")
    with pytest.raises(InvalidArgument, match="not a valid repository id"):
        src.resolve("a//b..", "hub")


def test_hub_honours_huggingface_hub_offline_mode(tmp_path, tiny_model_dir, adapter_factory, monkeypatch):
    """HF_HUB_OFFLINE is read by huggingface_hub at import; its constant is what the library consults."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    adapter = adapter_factory(tiny_model_dir, rank=3, target_modules=("q_proj", "v_proj"), seed=1)
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "acme/tiny-lora", adapter)
    src = AdapterSources(AdapterSourceConfig(hub_cache_dir=cache))  # hub_offline not set by us
    assert src.resolve("acme/tiny-lora", "hub") == snap
    shutil.rmtree(cache)
    with pytest.raises(NotFound, match="'acme/tiny-lora'"):
        src.resolve("acme/tiny-lora", "hub")
