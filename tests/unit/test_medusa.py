"""Medusa heads: the file format (model/adapters/medusa.py), and speculative decoding with random heads
for the base model (MODEL_DIR/medusa) and per adapter: outputs equal plain decoding, the heads read the
hidden state of each row's last kept token, other rows fall back to n-gram, bad files are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.adapters.medusa import MedusaHeads
from model.errors import InvalidArgument
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.tools.medusa_heads import random_medusa_heads, write_medusa_heads
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, SamplingParams, StoppingParams

H, V = 64, 512  # the default tiny model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def test_draft_is_argmax_of_the_documented_heads(tmp_path):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, H, generator=g)
    lm = torch.randn(V, H, generator=g)
    for v1, layers in ((True, 2), (False, 1)):
        d = random_medusa_heads(tmp_path / f"v{int(v1)}", H, V, heads=3, layers=layers, v1=v1, seed=3)
        heads = MedusaHeads.load(d, H, V, dtype=torch.float32, device="cpu")
        got = heads.draft(hidden, lambda y: y @ lm.T)
        for h in range(3):
            y = hidden
            for layer in range(layers):
                y = y + torch.nn.functional.silu(y @ heads.w[h, layer].T + heads.b[h, layer])
            want = (y @ heads.out[h].T if v1 else y @ lm.T).argmax(-1)
            assert torch.equal(got[:, h], want)


def test_bad_medusa_files_are_refused(tmp_path):
    def case(name, **kw):
        d = random_medusa_heads(tmp_path / name, H, V, heads=2, layers=1, seed=1)
        return d

    def load(d):
        return MedusaHeads.load(d, H, V, dtype=torch.float32, device="cpu")

    assert load(tmp_path) is None  # no config.json: no heads
    d = case("shape")
    assert load(d).num_heads == 2
    with pytest.raises(InvalidArgument, match=r"0.0.linear.weight is \[64, 64\], expected \[32, 32\]"):
        MedusaHeads.load(d, 32, V, dtype=torch.float32, device="cpu")
    w = torch.zeros(2, 1, H, H)
    w[1, 0, 3, 3] = float("nan")
    nan = write_medusa_heads(tmp_path / "nan", w, torch.zeros(2, 1, H))
    with pytest.raises(InvalidArgument, match="non-finite"):
        load(nan)
    cfg = json.loads((d / "config.json").read_text())
    for bad in ({"medusa_num_heads": 0}, {"medusa_num_heads": 99}, {"medusa_num_layers": "2"}):
        (d / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(InvalidArgument, match="must be an integer"):
            load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 3}))
    with pytest.raises(InvalidArgument, match="missing"):
        load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / "medusa_lm_head.safetensors", outside)
    (d / "link.safetensors").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        load(d)


@pytest.fixture(scope="module")
def medusa_model(tiny_model_dir, adapter_factory, tmp_path_factory):
    """A private copy of the tiny model with v1 base heads (2 layers) in MODEL_DIR/medusa, and two
    adapters: one carrying v2 heads of its own, one plain."""
    root = tmp_path_factory.mktemp("medusa")
    model_dir = root / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    random_medusa_heads(model_dir / "medusa", H, V, heads=4, layers=2, v1=True, seed=5)
    with_heads = root / "adapter-medusa"
    shutil.copytree(
        adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj"), seed=31), with_heads
    )
    random_medusa_heads(with_heads, H, V, heads=3, layers=1, seed=6)
    plain = adapter_factory(tiny_model_dir, rank=4, target_modules=("o_proj", "up_proj"), seed=32)
    return model_dir, with_heads, plain


def engine_for(model_dir, adapters, k) -> ShardEngine:
    e = ShardEngine(ShardConfig(model_dir=model_dir, max_kv_cache_bytes=1 << 21, speculative_tokens=k))
    for i, a in enumerate(adapters, start=1):
        e.load_adapter(i, AdapterSpec(adapter_ids=(str(a),), source="local"))
    return e


def generate(engine: ShardEngine, reqs) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    res = engine.prefill(BatchSpec(id=1, requests=tuple(reqs)))
    while True:
        for g in res.generations:
            out.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if res.batch is None:
            break
        res = engine.decode([res.batch.id])
    assert engine.free_blocks() == engine.usable_blocks()
    return out


def mixed_requests():
    kinds = [SamplingParams(), SamplingParams(do_sample=True, seed=3, temperature=0.7), SamplingParams()]
    return [
        RequestSpec(
            id=i + 1,
            input_ids=tuple([1] + [(37 * i + 11 * j) % 500 + 3 for j in range(9 + i)]),
            sampling=kinds[i % 3],
            stopping=StoppingParams(max_new_tokens=18, ignore_eos_token=True),
            adapter_index=i % 3,
        )
        for i in range(6)
    ]


@pytest.mark.parametrize("base_heads", [True, False])
def test_medusa_drafts_for_base_and_adapter_equal_plain_decoding(medusa_model, tmp_path, base_heads):
    model_dir, with_heads, plain_adapter = medusa_model
    if not base_heads:  # the same model without MODEL_DIR/medusa: only adapter 1 drafts with Medusa
        copy = tmp_path / "model"
        shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("medusa"))
        model_dir = copy
    adapters = [with_heads, plain_adapter]
    want = generate(engine_for(model_dir, adapters, 0), mixed_requests())
    engine = engine_for(model_dir, adapters, 4)
    medusa = engine.speculator.medusa
    assert (medusa.heads_for(0) is not None) == base_heads and medusa.heads_for(1).num_heads == 3
    assert medusa.heads_for(2) is medusa.base
    assert generate(engine, mixed_requests()) == want
    assert engine.speculator.medusa_drafted > 0
    assert engine.speculator.drafted > engine.speculator.medusa_drafted or base_heads


def test_medusa_reads_the_hidden_state_of_the_last_kept_token(medusa_model):
    """After a step, a base row's next drafts are the heads applied to transformers' final (normed)
    hidden state at the last position in the KV cache, whatever number of drafts was accepted."""
    from transformers import MistralForCausalLM

    model_dir, _, _ = medusa_model
    engine = engine_for(model_dir, [], 4)
    req = RequestSpec(id=1, input_ids=(1, 7, 8, 9, 7, 8), stopping=StoppingParams(30, ignore_eos_token=True))
    res = engine.prefill(BatchSpec(id=1, requests=(req,)))
    hf = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    heads = engine.speculator.medusa.base
    for _ in range(4):
        res = engine.decode([res.batch.id])
        r = engine.batches[1].requests[0]
        seq = list(r.prompt_ids) + r.tracker.generated_ids
        with torch.no_grad():
            hidden = hf.model(torch.tensor([seq[: r.length]])).last_hidden_state[0, -1]
        want = heads.draft(hidden[None], lambda y: hf.lm_head(y))[0]
        assert torch.equal(r.drafts.medusa, want)


def test_load_adapter_with_bad_medusa_heads_is_refused_and_not_loaded(medusa_model, tmp_path):
    model_dir, with_heads, _ = medusa_model
    bad = tmp_path / "bad"
    shutil.copytree(with_heads, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "medusa_num_heads": 5}))
    engine = engine_for(model_dir, [], 2)
    with pytest.raises(InvalidArgument):
        engine.load_adapter(1, AdapterSpec(adapter_ids=(str(bad),), source="local"))
    assert not engine.adapters.is_loaded(1)
    engine.load_adapter(1, AdapterSpec(adapter_ids=(str(with_heads),), source="local"))
    assert engine.speculator.medusa.heads_for(1).num_heads == 3
    assert engine.offload_adapter(1, AdapterSpec(adapter_ids=(str(with_heads),), source="local"))
    assert engine.speculator.medusa.heads_for(1) is engine.speculator.medusa.base
