"""What the servicer accepts and echoes: bounded status messages, finite merge parameters, and a failed
host allocation mapped to RESOURCE_EXHAUSTED (torch reports it as a plain RuntimeError)."""

from __future__ import annotations

import pytest
import torch

from model import errors
from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.bounds import MAX_STATUS_MESSAGE_BYTES, bounded_message
from shard_server.server.convert import adapter_from_pb
from shard_server.server.service import _is_out_of_memory


def test_status_messages_are_cut_on_a_character_boundary():
    assert bounded_message("short") == "short"
    cut = bounded_message("é" * 50_000)
    assert len(cut.encode()) <= MAX_STATUS_MESSAGE_BYTES and cut.endswith("(100000 bytes in all)")
    cut.encode("utf-8")  # no half character


@pytest.mark.parametrize(
    "params",
    [
        pb.AdapterParameters(adapter_ids=["a", "b"], weights=[float("nan"), 1.0]),
        pb.AdapterParameters(adapter_ids=["a", "b"], weights=[1.0, float("-inf")]),
        pb.AdapterParameters(adapter_ids=["a"], density=float("inf")),
        pb.AdapterParameters(adapter_ids=["x" * 5000]),
        pb.AdapterParameters(adapter_ids=["a"] * 65),
    ],
)
def test_adapter_parameters_are_bounded_and_finite(params):
    with pytest.raises(errors.InvalidArgument):
        adapter_from_pb(params, pb.LOCAL)


def test_a_failed_host_allocation_is_out_of_memory():
    with pytest.raises(RuntimeError) as e:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses
    assert _is_out_of_memory(e.value)
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("token", ["\x80", "tok en", "tok\n", "é", "x" * 4097])
def test_an_api_token_that_cannot_travel_in_an_http_header_is_invalid(token):
    """Found by `make fuzz`: a non-ASCII token reached the hub client and failed there as INTERNAL."""
    with pytest.raises(errors.InvalidArgument, match="api_token"):
        adapter_from_pb(pb.AdapterParameters(adapter_ids=["org/name"]), pb.HUB, token)


def test_an_ordinary_api_token_passes():
    spec = adapter_from_pb(pb.AdapterParameters(adapter_ids=["org/name"]), pb.HUB, "hf_AbC123-_.~")
    assert spec.api_token == "hf_AbC123-_.~"
