"""Engine-level refusals that keep one client's mistakes (or its vanished deadline) away from the shard's
state: nothing is committed for a caller that is gone, a failed Warmup leaves the KV cache as it was,
request ids stay unique across concatenated batches, OffloadAdapter checks what it offloads, Embed is
validated like Prefill."""

from __future__ import annotations

import pytest
import torch

from model import errors
from shard_server.config import ShardConfig
from shard_server.engine.engine import ShardEngine
from shard_server.types import AdapterSpec, BatchSpec, RequestSpec, StoppingParams

PROMPT = (1, 17, 99, 250, 3, 42, 7, 8)


def req(rid: int, ids=PROMPT, adapter: int = 0, new: int = 6) -> RequestSpec:
    return RequestSpec(
        id=rid,
        input_ids=tuple(ids),
        adapter_index=adapter,
        stopping=StoppingParams(max_new_tokens=new, ignore_eos_token=True),
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_factory):
    e = ShardEngine(ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))
    full = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    e.adapters_dirs = {
        1: adapter_factory(tiny_model_dir, rank=4, target_modules=full, seed=21),
        2: adapter_factory(tiny_model_dir, rank=8, target_modules=("q_proj", "v_proj"), seed=22),
    }
    for index, path in e.adapters_dirs.items():
        e.load_adapter(index, AdapterSpec(adapter_ids=(str(path),), source="local"))
    return e


@pytest.fixture(autouse=True)
def clean(engine):
    yield
    engine.clear_cache()
    assert engine.free_blocks() == engine.usable_blocks()


def greedy_tokens(engine, rid: int, ids=PROMPT, new: int = 6) -> list[int]:
    out = engine.prefill(BatchSpec(id=rid, requests=(req(rid, ids, new=new),)))
    tokens = [g.next_tokens.ids[0] for g in out.generations]
    while out.batch is not None:
        out = engine.decode([rid])
        tokens += [g.next_tokens.ids[0] for g in out.generations]
    return tokens


# ---------------------------------------------------------------- 8. a caller that is gone


def test_prefill_for_a_caller_that_is_gone_commits_nothing(engine):
    free = engine.free_blocks()
    with pytest.raises(errors.Cancelled):
        engine.prefill(BatchSpec(id=80, requests=(req(1),)), None, still_wanted=lambda: False)
    assert 80 not in engine.batches and engine.free_blocks() == free
    engine.prefill(BatchSpec(id=80, requests=(req(1),)))  # the id is free for the router's retry


def test_decode_for_a_caller_that_is_gone_does_not_advance(engine):
    expected = greedy_tokens(engine, 81)
    out = engine.prefill(BatchSpec(id=82, requests=(req(2),)))
    tokens = [out.generations[0].next_tokens.ids[0]]
    before = engine.batches[82].info()
    with pytest.raises(errors.Cancelled):
        engine.decode([82], still_wanted=lambda: False)
    assert engine.batches[82].info() == before
    while out.batch is not None:
        out = engine.decode([82])
        tokens += [g.next_tokens.ids[0] for g in out.generations]
    assert tokens == expected  # the router saw every token, none was skipped


def test_cancelled_decode_with_overlap_keeps_the_lookahead_it_had(engine):
    """The step the router never receives stores no lookahead of its own: the batch keeps the one it had
    (still right for its unchanged rows), and the tokens after a retry are the same."""
    expected = greedy_tokens(engine, 79, new=8)
    engine.overlap = True
    try:
        out = engine.prefill(BatchSpec(id=78, requests=(req(79, new=8),)))
        tokens = [out.generations[0].next_tokens.ids[0]]
        out = engine.decode([78])  # stores the next step's lookahead
        tokens += [g.next_tokens.ids[0] for g in out.generations]
        had = engine.lookaheads[78]
        with pytest.raises(errors.Cancelled):
            engine.decode([78], still_wanted=lambda: False)
        assert engine.lookaheads[78] is had
        used = engine.lookahead_rows_used
        while out.batch is not None:
            out = engine.decode([78])
            tokens += [g.next_tokens.ids[0] for g in out.generations]
        assert engine.lookahead_rows_used > used  # the kept lookahead was used, not recomputed
    finally:
        engine.overlap = False
    assert tokens == expected


def test_a_repeated_prefill_of_a_cached_batch_id_is_failed_precondition(engine):
    engine.prefill(BatchSpec(id=83, requests=(req(1),)))
    with pytest.raises(errors.FailedPrecondition, match="ClearCache"):
        engine.prefill(BatchSpec(id=83, requests=(req(1),)))
    assert [r.id for r in engine.batches[83].all_requests] == [1]


# ---------------------------------------------------------------- 9. request ids unique across batches


def test_decode_refuses_batches_that_share_a_request_id(engine):
    engine.prefill(BatchSpec(id=84, requests=(req(1), req(2))))
    engine.prefill(BatchSpec(id=85, requests=(req(2), req(3))))
    with pytest.raises(errors.InvalidArgument, match="request id 2"):
        engine.decode([84, 85])
    assert {84, 85} <= set(engine.batches)  # both intact
    assert len(engine.decode([84]).generations) == 2


def test_prefill_refuses_new_ids_already_in_the_cached_batch(engine):
    out = engine.prefill(BatchSpec(id=86, requests=(req(1), req(2))))
    free = engine.free_blocks()
    with pytest.raises(errors.InvalidArgument, match="request id 2"):
        engine.prefill(BatchSpec(id=87, requests=(req(2),)), 86)
    assert engine.batches[86].info() == out.batch and engine.free_blocks() == free


# ---------------------------------------------------------------- 4. Warmup failure restores the cache


def test_failed_warmup_restores_the_kv_cache(engine):
    blocks, usable = engine.runner.kv_cache.num_blocks, engine.usable_blocks()
    with pytest.raises(errors.ShardError) as e:
        engine.warmup(BatchSpec(id=0, requests=(req(0, adapter=9),)), 16, 64, 16)
    assert e.value.status.name == "NOT_FOUND"
    assert engine.runner.kv_cache.num_blocks == blocks and engine.usable_blocks() == usable
    long = tuple(range(3, 3 + 500))
    assert greedy_tokens(engine, 88, long, new=2)  # a request far larger than the warmup batch fits


class RecordingGraphs:
    """DecodeGraphs' interface as the runner and engine call it; replays nothing (decode runs eagerly)."""

    def __init__(self):
        self.calls: list = []

    def clear(self):
        self.calls.append("clear")

    def capture(self, max_total_tokens):
        self.calls.append(("capture", max_total_tokens))

    def refresh_lora(self):
        pass

    def run(self, batch, request_slots):
        return None


def test_failed_warmup_captures_the_last_good_graphs_again_for_the_restored_cache(engine):
    graphs = engine.runner.graphs = RecordingGraphs()
    engine.graph_tokens = 48
    try:
        with pytest.raises(errors.NotFound):
            engine.warmup(BatchSpec(id=0, requests=(req(0, adapter=9),)), 16, 64, 16)
        # the restored cache dropped every graph, then the last good Warmup's were captured against it
        assert graphs.calls[-2:] == ["clear", ("capture", 48)]
        assert engine.graph_tokens == 48
    finally:
        engine.runner.graphs, engine.graph_tokens = None, None


# ---------------------------------------------------------------- 11. OffloadAdapter checks the id


def test_offload_with_another_adapters_id_is_refused(engine):
    other = AdapterSpec(adapter_ids=(str(engine.adapters_dirs[1]),), source="local")
    with pytest.raises(errors.FailedPrecondition, match="holds"):
        engine.offload_adapter(2, other)
    assert engine.adapters.is_loaded(2)


# ---------------------------------------------------------------- 3. Embed validated like Prefill


def test_embed_of_an_unloaded_adapter_is_not_found(engine):
    with pytest.raises(errors.NotFound, match="adapter_index 7"):
        engine.embed(BatchSpec(id=1, requests=(req(1, adapter=7),)))


def test_embed_applies_the_requests_adapter(engine):
    rows = engine.embed(BatchSpec(id=1, requests=(req(1), req(2, adapter=1), req(3, adapter=2))))
    base, one, two = (torch.tensor(v) for _, v in rows)
    assert not torch.allclose(base, one) and not torch.allclose(base, two)
    alone = engine.embed(BatchSpec(id=1, requests=(req(5, adapter=1),)))
    torch.testing.assert_close(torch.tensor(alone[0][1]), one, rtol=1e-4, atol=1e-5)


def test_embed_refuses_prompts_beyond_the_models_positions(engine):
    n = engine.model_config.max_position_embeddings + 1
    with pytest.raises(errors.InvalidArgument, match="positions"):
        engine.embed(BatchSpec(id=1, requests=(req(1, tuple(3 + i % 400 for i in range(n))),)))


def test_embed_refuses_more_tokens_than_one_call_may_compute(engine):
    n = engine.model_config.max_position_embeddings
    many = tuple(req(i, tuple(3 + (i + k) % 400 for k in range(n))) for i in range(60))
    with pytest.raises(errors.ResourceExhausted, match="tokens"):
        engine.embed(BatchSpec(id=1, requests=many))
