"""DoRA, TIES/DARE merges and S3 adapters through a real shard process driven over its unix socket.

The shard reaches a real S3-compatible server (moto, IAM enforced, on 127.0.0.1) through boto3's
standard environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID/SECRET) with credentials that
may read one bucket only, and downloads into `--adapter-cache-dir`. Greedy generations of a DoRA
adapter, a plain LoRA adapter and a TIES merge in one continuously batched run equal transformers +
PEFT (DoRA model; add_weighted_adapter "ties"); an S3 adapter generates the same tokens as the same
files loaded LOCAL. Every refusal has its gRPC status and the shard serves on.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from shard_harness import DEFAULT_KV_BYTES, LIMITS, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.convert import adapter_to_pb
from shard_server.types import AdapterSpec, RequestSpec, SamplingParams, StoppingParams

BUCKET, SECRET = "served-adapters", "other-team"
PROMPTS = [(1, 17, 99, 250, 3, 42), (1, 400, 401, 402), (1, 5, 6, 7, 8, 9, 10, 11, 12)]
MERGE = dict(weights=(0.7, 0.5), merge_strategy="ties", density=0.5, majority_sign_method="frequency")


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, adapter_factory):
    dora_targets = ("q_proj", "k_proj", "o_proj", "down_proj", "lm_head")
    lora_targets = ("q_proj", "v_proj", "up_proj")
    return {
        "lora": adapter_factory(tiny_model_dir, rank=4, target_modules=lora_targets, seed=21),
        "lora2": adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "o_proj"), seed=22),
        "dora": adapter_factory(tiny_model_dir, rank=6, target_modules=dora_targets, use_dora=True, seed=23),
    }


@pytest.fixture(scope="module")
def shard(tiny_model_dir, fake_s3, dirs, tmp_path_factory):
    fake_s3.bucket(BUCKET)
    fake_s3.bucket(SECRET)
    reader = fake_s3.reader_credentials(BUCKET, "shard-reader")
    cache = tmp_path_factory.mktemp("adapter-cache")
    args = ("--max-kv-cache-bytes", str(DEFAULT_KV_BYTES), "--adapter-cache-dir", str(cache),
            "--adapter-cache-max-bytes", str(10 << 20))  # fmt: skip
    with running_shard(tiny_model_dir, *args, env=fake_s3.env(reader)) as sp:
        with sp.router(LIMITS) as router:
            router.warmup()
            yield sp, router, cache


def _local(*paths, **kw) -> AdapterSpec:
    return AdapterSpec(adapter_ids=tuple(str(p) for p in paths), source="local", **kw)


def _load(index: int, spec: AdapterSpec) -> pb.LoadAdapterRequest:
    params, src = adapter_to_pb(spec)
    return pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=index)


def _download(spec: AdapterSpec) -> pb.DownloadAdapterRequest:
    params, src = adapter_to_pb(spec)
    return pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=src)


def _expect(code: grpc.StatusCode, call, request) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=60)
    assert e.value.code() == code, e.value.details()
    return e.value.details()


def _greedy(router, indices: list[int], new_tokens: int = 10) -> list[list[int]]:
    reqs = [
        RequestSpec(id=0, input_ids=PROMPTS[k % len(PROMPTS)], adapter_index=i, sampling=SamplingParams(),
                    stopping=StoppingParams(max_new_tokens=new_tokens, ignore_eos_token=True))
        for k, i in enumerate(indices)
    ]  # fmt: skip
    return [r.token_ids for r in router.generate(reqs)]


def _peft_greedy(model, prompt, new_tokens: int = 10) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=2)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_dora_lora_and_ties_merge_in_one_batch_equal_peft(shard, dirs, tiny_model_dir):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    sp, router, _ = shard
    assert router.load_adapter(1, _local(dirs["lora"]))
    assert router.load_adapter(2, _local(dirs["dora"]))
    assert router.load_adapter(3, _local(dirs["lora"], dirs["lora2"], **MERGE))
    indices = [2, 0, 1, 3, 2, 3, 1, 0, 2]
    got = _greedy(router, indices)

    def base():
        return MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    merged = PeftModel.from_pretrained(base(), dirs["lora"], adapter_name="a")
    merged.load_adapter(dirs["lora2"], adapter_name="b")
    merged.add_weighted_adapter(["a", "b"], list(MERGE["weights"]), "m", combination_type="ties",
                                density=MERGE["density"], majority_sign_method="frequency")  # fmt: skip
    merged.set_adapter("m")
    truth = {0: base(), 1: PeftModel.from_pretrained(base(), dirs["lora"]).eval(),
             2: PeftModel.from_pretrained(base(), dirs["dora"]).eval(), 3: merged.eval()}  # fmt: skip
    for k, (i, tokens) in enumerate(zip(indices, got, strict=True)):
        assert tokens == _peft_greedy(truth[i], PROMPTS[k % len(PROMPTS)]), f"request {k} (adapter {i})"
    assert len({tuple(got[k]) for k in (0, 1, 3)}) == 3  # DoRA, base and the merge really differ


def test_s3_download_load_and_generate_like_local(shard, fake_s3, dirs):
    sp, router, cache = shard
    stub = sp.stub()
    s3_id = fake_s3.upload(dirs["dora"], BUCKET, "team/dora-v1")
    spec = AdapterSpec(adapter_ids=(s3_id,), source="s3")
    resp = stub.DownloadAdapter(_download(spec), timeout=60)  # on the shard's I/O thread
    assert resp.downloaded and resp.memory_fraction > 0
    (entry,) = [d for d in cache.iterdir() if d.is_dir()]
    weights = "adapter_model.safetensors"
    assert (entry / weights).read_bytes() == (dirs["dora"] / weights).read_bytes()
    assert router.load_adapter(5, spec)  # the download is reused: no second fetch needed
    assert router.load_adapter(6, _local(dirs["dora"]))
    s3_tokens, local_tokens = _greedy(router, [5, 5]), _greedy(router, [6, 6])
    assert s3_tokens == local_tokens
    assert router.offload_adapter(5, spec) and router.offload_adapter(6, _local(dirs["dora"]))


def test_refusals_have_their_status_and_the_shard_serves_on(shard, fake_s3, dirs):
    sp, router, _ = shard
    stub = sp.stub()
    before = _greedy(router, [0])
    lora, lora2, dora = (str(dirs[k]) for k in ("lora", "lora2", "dora"))
    invalid = {
        "ties without density": _local(lora, lora2, weights=(0.5, 0.5), merge_strategy="ties"),
        "density above 1": _local(lora, lora2, weights=(0.5, 0.5), merge_strategy="dare_linear", density=1.5),
        "NaN weight": _local(lora, lora2, weights=(math.nan, 0.5), merge_strategy="dare_ties", density=0.5),
        "infinite weight, linear": _local(lora, lora2, weights=(math.inf, 0.5)),
        "one adapter for a merge": _local(lora, weights=(1.0,), merge_strategy="dare_ties", density=0.5),
        "malformed S3 id": AdapterSpec(adapter_ids=("s3://X/y",), source="s3"),
    }
    for what, spec in invalid.items():
        msg = _expect(grpc.StatusCode.INVALID_ARGUMENT, stub.LoadAdapter, _load(7, spec))
        assert msg, what
    msg = _expect(grpc.StatusCode.UNIMPLEMENTED, stub.LoadAdapter,
                  _load(7, _local(lora, dora, weights=(0.5, 0.5), merge_strategy="ties", density=0.5)))
    assert "merging DoRA adapters is not supported" in msg
    msg = _expect(grpc.StatusCode.UNIMPLEMENTED, stub.DownloadAdapter,
                  _download(AdapterSpec(adapter_ids=("acme/x",), source="pbase")))  # fmt: skip
    assert "Predibase" in msg
    missing = AdapterSpec(adapter_ids=(f"s3://{BUCKET}/nobody/here",), source="s3")
    _expect(grpc.StatusCode.NOT_FOUND, stub.DownloadAdapter, _download(missing))
    _expect(grpc.StatusCode.NOT_FOUND, stub.LoadAdapter, _load(7, missing))
    forbidden = AdapterSpec(adapter_ids=(fake_s3.upload(dirs["lora"], SECRET, "x"),), source="s3")
    msg = _expect(grpc.StatusCode.PERMISSION_DENIED, stub.DownloadAdapter, _download(forbidden))
    assert "access denied" in msg
    _expect(grpc.StatusCode.PERMISSION_DENIED, stub.LoadAdapter, _load(7, forbidden))
    assert _greedy(router, [0]) == before  # the shard serves on, unchanged
