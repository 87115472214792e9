"""bench/speculative_demo.py end to end on the CPU with a tiny model (code paths, not numbers): plain vs
n-gram vs self-distilled Medusa heads through the real engine, the JSON it writes, and the host-time
profile of bench/spec_host_profile.py."""

import json

import pytest

from bench import speculative_demo
from bench.spec_data import DEMO_TASKS, demo_eval_texts, with_typos
from bench.spec_engine import EngineSettings, chat_ids, with_engine
from bench.spec_host_profile import profile

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def test_demo_bench_runs_plain_ngram_and_medusa(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    assert speculative_demo.main([
        "--model-dir", str(tiny_model_dir), "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--device", "cpu", "--batches", "1,2", "--ks", "2", "--max-new-tokens", "8", "--reps", "1",
        "--medusa-heads", "2", "--medusa-topics", "1", "--medusa-steps", "3", "--commit", "abc123",
        "--medusa-sampled-passages", "1",
        "--profile-k", "2",
    ]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    # waves at batch 1 and 2, then continuous batching at batch 2 (2 x 4 requests, rows replaced)
    assert [(r["system"], r["mode"], r["batch"], r["k"]) for r in rows] == [
        (system, mode, b, k) for system, k in (("plain", 0), ("ngram", 2), ("medusa", 2))
        for mode, b in (("waves", 1), ("waves", 2), ("continuous", 2))
    ]  # fmt: skip
    for r in rows:
        assert r["commit"] == "abc123" and r["device"] == "cpu"
        assert r["equal_to_plain"], r  # float32 on the CPU: speculation must not change a token
        assert r["tok_s"] > 0 and r["speedup"] > 0
        assert r["requests"] == (8 if r["mode"] == "continuous" else 4)
    assert all(r["tokens_per_step"] == 1.0 and r["acceptance"] is None for r in rows[:3])
    for r in rows[3:]:
        assert r["drafted"] > 0 and 0.0 <= r["acceptance"] <= 1.0
        assert 1.0 <= r["tokens_per_step"] <= 1 + r["k"]
    assert all(r["medusa_drafted"] == 0 for r in rows[3:6])  # the n-gram engines never saw the heads
    assert all(r["medusa_drafted"] > 0 for r in rows[6:])  # the Medusa engine loaded and used them
    training = result["medusa_training"]
    assert training["steps"] == 3 and training["positions"] > 0 and len(training["best"]["val_top1"]) == 2
    assert training["base_top1"] == 1.0  # float32: the features are the states that chose the tokens
    ev = training["eval"]  # the heads offline on the plain outputs of the medusa rows' requests
    assert len(ev["top1"]) == 2 and ev["base_top1"] == 1.0 and ev["steps"] > 0 and ev["drafted"] > 0
    heads = json.loads((tmp_path / "work" / "model-medusa" / "medusa" / "config.json").read_text())
    assert heads["medusa_num_heads"] == 2 and heads["medusa_num_layers"] == 1
    assert not (tmp_path / "work" / "model-plain" / "medusa").exists()
    assert set(result["timings"]) >= {"plain_and_medusa_training", "ngram_k2", "medusa", "total"}
    assert "speedup" in speculative_demo.table(result)
    prof = [(r["system"], r["batch"]) for r in result["host_profile"]]
    assert prof == [("plain", 1), ("plain", 2), ("ngram", 1), ("ngram", 2)]


def test_eval_requests_cover_the_tasks_and_carry_typos():
    texts = demo_eval_texts(32)
    assert len(set(texts)) == 32
    for start in (0, 5, 13):  # any 4 consecutive requests: the 4 tasks
        assert {t.split("\n")[0] for t in texts[start : start + 4]} == {
            template.split("\n")[0] for _, template in DEMO_TASKS
        }
    text = "On Saturdays the library opens at ten and closes at two, and on Sundays it stays closed."
    assert with_typos(text) == (
        "On Saturdays the lirbary opens at ten and clsoes at two, and on Sudnays it stays closed."
    )


def test_host_profile_phases(tiny_model_dir):
    es = EngineSettings(device="cpu", dtype="float32", max_batch=2, max_input=64, max_new=16,
                        kv_bytes=64 << 20, cuda_graphs=False)  # fmt: skip

    def work(engine):
        prompts = [chat_ids(engine.tokenizer, "a b c a b c a b c a b") for _ in range(2)]
        return profile(engine, prompts, 2, 8, passes=1)

    got = with_engine(tiny_model_dir, 3, es, work)
    ms, ops = got["wall_ms_per_step"], got["aten_ops_per_step"]
    assert {"decode", "compute", "ngram", "verify", "to_host", "commit", "emit", "(glue)"} <= set(ms)
    assert ms["decode"] >= ms["compute"] > ms["verify"] > 0
    assert ops["verify"] > 0 and got["decode_steps"] >= 1


def test_a_failed_section_is_recorded_and_the_others_go_on(tmp_path):
    out = {"path": str(tmp_path / "r.json"), "rows": []}
    logged = []
    assert speculative_demo._guarded(out, "medusa", logged.append, lambda: 1 / 0) is None
    assert "ZeroDivisionError" in out["errors"]["medusa"] and "medusa failed" in logged[0]
    assert "ZeroDivisionError" in json.loads((tmp_path / "r.json").read_text())["errors"]["medusa"]
    assert speculative_demo._guarded(out, "ngram_k3", logged.append, lambda x: x + 1, 2) == 3
