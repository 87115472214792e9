"""S3 adapters against a real S3-compatible server (moto, IAM enforced) on 127.0.0.1.

Download into the cache, cache hits without a download (and a re-download when the object changes),
NOT_FOUND / PERMISSION_DENIED / UNAVAILABLE / INVALID_ARGUMENT, an interrupted download (an error, and a
process killed mid-download) that leaves nothing a load would read, the LRU size bound, and the same
validation as LOCAL through the adapter store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from cache.adapter_store import AdapterStore
from cache.s3_source import MANIFEST, S3Adapters, S3CacheConfig, parse_s3_id
from model.config import MistralConfig
from model.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Status,
    Unavailable,
)
from shard_server.types import AdapterSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, adapter_factory):
    return adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=91)


@pytest.fixture(scope="module")
def bucket(fake_s3):
    return fake_s3.bucket("adapters")


def _s3(fake_s3, cache: Path, creds=None, **kw) -> S3Adapters:
    creds = creds or fake_s3.admin
    s3 = S3Adapters(S3CacheConfig(cache_dir=cache, endpoint_url=fake_s3.endpoint, region="us-east-1", **kw))
    s3._s3 = fake_s3.client("s3", creds)  # the same client boto3 would build from the environment
    return s3


def _count_gets(s3: S3Adapters) -> list[str]:
    calls: list[str] = []
    s3.client().meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"])
    )
    return calls


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.exists() else []


def test_download_then_cache_hit_then_changed_object(fake_s3, bucket, adapter, tmp_path):
    adapter_id = fake_s3.upload(adapter, bucket, "team/one")
    s3 = _s3(fake_s3, tmp_path / "cache")
    gets = _count_gets(s3)
    path = s3.fetch(adapter_id)
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST, "adapter_config.json",
                                                              "adapter_model.safetensors"])  # fmt: skip
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (path / name).read_bytes() == (adapter / name).read_bytes()
    assert len(gets) == 2
    assert s3.fetch(adapter_id + "/") == path and len(gets) == 2  # a hit: no GetObject at all
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 3
    fake_s3.client().put_object(Bucket=bucket, Key="team/one/adapter_config.json", Body=json.dumps(cfg))
    assert s3.fetch(adapter_id) == path and len(gets) == 4  # new ETag: downloaded again, same place
    assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 3
    assert _entries(tmp_path / "cache") == [path.name]  # no partial or stale directory left


def test_not_found_permission_denied_unavailable_and_bad_ids(fake_s3, bucket, adapter, tmp_path, monkeypatch):
    s3 = _s3(fake_s3, tmp_path / "cache")
    with pytest.raises(NotFound, match="no s3://adapters/nothing/here/adapter_config.json") as e:
        s3.fetch("s3://adapters/nothing/here")
    assert e.value.status == Status.NOT_FOUND
    with pytest.raises(NotFound, match="no s3://no-such-bucket-here/x/adapter_config.json"):
        s3.fetch("s3://no-such-bucket-here/x")  # HeadObject answers a missing bucket with a bare 404 too
    weights_only_missing = fake_s3.upload(adapter, bucket, "half", files={"adapter_config.json"})
    with pytest.raises(InvalidArgument, match="missing adapter_model.safetensors"):
        s3.fetch(weights_only_missing)
    secret = fake_s3.bucket("secret-adapters")
    secret_id = fake_s3.upload(adapter, secret, "x")
    reader = _s3(fake_s3, tmp_path / "cache", fake_s3.reader_credentials("adapters", "reader-unit"))
    allowed = fake_s3.upload(adapter, bucket, "for-reader")
    assert reader.fetch(allowed).is_dir()  # the reader's own bucket works
    with pytest.raises(PermissionDenied, match="access denied") as e:
        reader.fetch(secret_id)
    assert e.value.status == Status.PERMISSION_DENIED
    bad_keys = {"aws_access_key_id": "AKIANOBODY", "aws_secret_access_key": "nope"}
    with pytest.raises(PermissionDenied):
        _s3(fake_s3, tmp_path / "cache", bad_keys).fetch(allowed)
    for bad in ("s3://", "s3://Upper_Case/x", "https://adapters/x", "adapters/x", "s3://ab/x"):
        with pytest.raises(InvalidArgument, match="is not s3://bucket/prefix"):
            parse_s3_id(bad)
    assert parse_s3_id("s3://adapters//a/b/") == ("adapters", "a/b")
    closed = S3Adapters(S3CacheConfig(cache_dir=tmp_path / "c2", endpoint_url="http://127.0.0.1:9",
                                      region="us-east-1", max_attempts=1))  # fmt: skip
    closed._s3 = None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")  # from boto3's own chain: the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(Unavailable, match="could not be reached") as e:
        closed.fetch(allowed)
    assert e.value.status == Status.UNAVAILABLE
    assert not (tmp_path / "c2").exists() or _entries(tmp_path / "c2") == []


def test_a_failed_download_leaves_no_adapter_behind(fake_s3, bucket, adapter, tmp_path):
    adapter_id = fake_s3.upload(adapter, bucket, "flaky")
    s3 = _s3(fake_s3, tmp_path / "cache")

    def fail_on_weights(params, **_):
        if params["Key"].endswith("adapter_model.safetensors"):  # the config is already on disk
            raise ConnectionError("link dropped mid-download")

    s3.client().meta.events.register("before-parameter-build.s3.GetObject", fail_on_weights)
    with pytest.raises(Unavailable, match="could not be reached: link dropped mid-download"):
        s3.fetch(adapter_id)
    assert _entries(tmp_path / "cache") == []  # neither a half adapter nor its partial directory
    s3.client().meta.events.unregister("before-parameter-build.s3.GetObject", fail_on_weights)
    assert (s3.fetch(adapter_id) / "adapter_model.safetensors").stat().st_size > 0


_KILLED = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import boto3
from cache.s3_source import S3Adapters, S3CacheConfig
s3 = S3Adapters(S3CacheConfig(cache_dir=Path(sys.argv[2]), endpoint_url=sys.argv[3], region="us-east-1"))
s3._s3 = boto3.client("s3", endpoint_url=sys.argv[3], region_name="us-east-1",
                      aws_access_key_id=sys.argv[5], aws_secret_access_key=sys.argv[6])
def die(params, **_):
    if params["Key"].endswith("adapter_model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-download: the config is written, the weights are not
s3._s3.meta.events.register("before-parameter-build.s3.GetObject", die)
s3.fetch(sys.argv[4])
"""


def test_a_process_killed_mid_download_leaves_only_a_partial_directory(fake_s3, bucket, adapter, tmp_path):
    adapter_id = fake_s3.upload(adapter, bucket, "killed")
    cache = tmp_path / "cache"
    creds = fake_s3.admin
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, str(REPO), str(cache), fake_s3.endpoint, adapter_id,
         creds["aws_access_key_id"], creds["aws_secret_access_key"]], timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9
    partial = [p for p in cache.iterdir() if p.name.startswith(".partial-")]
    assert len(partial) == 1 and (partial[0] / "adapter_config.json").exists()
    assert _entries(cache) == [partial[0].name]  # no adapter directory a load could find
    s3 = _s3(fake_s3, cache)
    path = s3.fetch(adapter_id)  # downloads afresh, never reads the partial one
    weights = "adapter_model.safetensors"
    assert (path / weights).read_bytes() == (adapter / weights).read_bytes()
    old = time.time() - 7200
    os.utime(partial[0], (old, old))  # an hour-old partial directory belongs to a dead process
    s3.fetch(fake_s3.upload(adapter, bucket, "killed-2"))
    assert not partial[0].exists()


def test_lru_size_bound(fake_s3, bucket, adapter, tmp_path):
    size = sum((adapter / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
    ids = [fake_s3.upload(adapter, bucket, f"lru/{i}") for i in range(3)]
    s3 = _s3(fake_s3, tmp_path / "cache", max_bytes=2 * size + 1000, grace_seconds=0.0)
    a, b = s3.fetch(ids[0]), s3.fetch(ids[1])
    time.sleep(0.05)
    assert s3.fetch(ids[0]) == a  # a hit makes `a` the most recently used
    time.sleep(0.05)
    c = s3.fetch(ids[2])  # three do not fit: the least recently used (b) goes
    assert a.exists() and c.exists() and not b.exists()
    with pytest.raises(ResourceExhausted, match="more than the adapter cache holds"):
        _s3(fake_s3, tmp_path / "small", max_bytes=size // 2).fetch(ids[0])


def test_s3_adapter_is_validated_and_served_like_local(fake_s3, bucket, adapter, tiny_model_dir, tmp_path):
    config = MistralConfig.from_pretrained(tiny_model_dir)
    sources = AdapterSources(AdapterSourceConfig(s3=S3CacheConfig(cache_dir=tmp_path / "cache",
                                                                  endpoint_url=fake_s3.endpoint,
                                                                  region="us-east-1")))  # fmt: skip
    sources._s3._s3 = fake_s3.client()
    store = AdapterStore(config, sources=sources)
    s3_id = fake_s3.upload(adapter, bucket, "served")
    store.load(1, AdapterSpec(adapter_ids=(s3_id,), source="s3"))
    store.load(2, AdapterSpec(adapter_ids=(str(adapter),), source="local"))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for index in (1, 2):
        out = torch.zeros(3, 64)
        store.batch_data([index], [3], is_prefill=True).add_lora(0, "q_proj", x, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 5  # the tensors say 4
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    messages = []
    for spec in (AdapterSpec(adapter_ids=(fake_s3.upload(bad, bucket, "bad"),), source="s3"),
                 AdapterSpec(adapter_ids=(str(bad),), source="local")):  # fmt: skip
        with pytest.raises(InvalidArgument, match="has rank 4 but adapter_config.json says r=5") as e:
            store.load(3, spec)
        messages.append(str(e.value).split(": ", 1)[1])
    assert messages[0] == messages[1]  # the same check, word for word, after the file path
