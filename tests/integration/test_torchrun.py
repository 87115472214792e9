"""`torchrun` starts the shard group as well as `shard-server launch` does: RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT come from it, each rank serves {uds_path}-{rank}, and the fan-out router
gets the single shard's tokens (JSON-schema requests too: every rank masks alike)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
from shard_harness import REPO, ShardProcess, assert_sharded_equals_single

from shard_server.testing.fake_router import RouterLimits
from shard_server.testing.json_schemas import SCHEMAS, schema_text
from shard_server.types import FinishReason, RequestSpec, SamplingParams, StoppingParams

SMALL = RouterLimits(max_input_length=16, max_total_tokens=32, max_prefill_tokens=32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_the_single_shard(tiny_model_dir, shared_shard):
    tmp = Path(tempfile.mkdtemp(prefix="shard-", dir="/tmp"))
    uds, log_path = str(tmp / "s"), tmp / "torchrun.log"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "shard_server", "serve", str(tiny_model_dir), "--uds-path", uds, "--device", "cpu",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    sp = ShardProcess(proc, uds, log_path, tmp)
    try:
        sp.wait_ready(2)
        reqs = [
            RequestSpec(
                id=k, input_ids=(1, 9 + k, 33, 34 + k), stopping=StoppingParams(6, ignore_eos_token=True)
            )
            for k in range(4)
        ]
        schemas = ["enum_str", "pattern_alt", "int_range"]
        reqs += [
            RequestSpec(
                id=0, input_ids=(1, 40 + k, 41), stopping=StoppingParams(16),
                sampling=SamplingParams(schema=schema_text(SCHEMAS[name]), do_sample=k == 1, seed=k),
            )
            for k, name in enumerate(schemas)
        ]  # fmt: skip
        sharded = assert_sharded_equals_single(sp, shared_shard, reqs, SMALL, ranks=2)
        assert all(len(r.token_ids) == 6 for r in sharded[:4])
        for r, name in zip(sharded[4:], schemas, strict=True):
            assert r.finish_reason == FinishReason.EOS_TOKEN
            jsonschema.validate(json.loads(r.text), SCHEMAS[name])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
