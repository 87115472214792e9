"""bench.gpu's adapter sections run end to end on the CPU at the smoke scale (code paths, not numbers):
LoadAdapter, the rotation of more adapters than device slots (Zipf-drawn, misses re-read from their
files) against its all-resident baseline, and ranks 8/16/64 mixed in one batch."""

import json

import pytest

from bench.gpu import main

pytestmark = pytest.mark.slow  # ~30 s on two cores


def test_adapter_sections_run_on_cpu(tmp_path):
    # the deadline counts from the bench module's import, which in a test session is long before this
    assert main(["--smoke", "--only", "adapter_load,rotation,mixed_ranks", "--out-dir", str(tmp_path),
                 "--work-dir", str(tmp_path / "work"), "--rotation-seconds", "1.5",
                 "--deadline-seconds", "1e9"]) == 0  # fmt: skip
    (path,) = tmp_path.glob("cpu-smoke-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert not [r for r in rows if r.get("error")], rows
    base, rot = [r for r in rows if r["kind"] == "rotation"]
    assert base["adapters"] == 32 and rot["adapters"] == 24 and rot["device_slots"] == 8
    assert rot["misses"] > 0 and rot["ttft_miss_p50_ms"] is not None and rot["ratio_vs_resident"] > 0
    mixed = [r for r in rows if r.get("mixed_ranks")]
    assert mixed and all(r["ranks"] == [8, 16, 64] * 3 and r["adapter_bytes_GB"] > 0 for r in mixed)
    presized, growth = [r for r in rows if r["kind"] == "adapter_load"]
    assert presized["stacks"] == "presized" and growth["stacks"] == "growth"
    assert presized["ms"] > 0 and presized["relayouts"] == 0 and len(presized["samples_ms"]) == 3
