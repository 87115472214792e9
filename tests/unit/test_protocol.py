"""The generated descriptors match PROTOCOL.md field by field (this test keeps its own copy)."""

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from shard_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc

# message -> [(field name, number, type, label)], label: "" singular, "repeated", "optional" (proto3 optional)
# Types: scalar names, "msg:Name" for messages, "enum:Name" for enums.
PROTOCOL = {
    "HealthRequest": [],
    "HealthResponse": [],
    "InfoRequest": [],
    "ServiceDiscoveryRequest": [],
    "ClearCacheResponse": [],
    "InfoResponse": [
        ("requires_padding", 1, "bool", ""), ("dtype", 2, "string", ""), ("device_type", 3, "string", ""),
        ("window_size", 4, "uint32", "optional"), ("block_size", 5, "uint32", ""), ("speculate", 6, "uint32", ""),
        ("preloaded_adapters", 7, "msg:PreloadedAdapter", "repeated"), ("supports_generation", 8, "bool", ""),
        ("supports_embeddings", 9, "bool", ""), ("supports_classification", 10, "bool", ""),
        ("chunked_prefill", 11, "bool", ""), ("requires_block_allocator", 12, "bool", ""),
    ],
    "PreloadedAdapter": [
        ("adapter_parameters", 1, "msg:AdapterParameters", ""), ("adapter_source", 2, "enum:AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""),
    ],
    "ServiceDiscoveryResponse": [("urls", 1, "string", "repeated")],
    "ClearCacheRequest": [("id", 1, "uint64", "optional")],
    "NextTokenChooserParameters": [
        ("temperature", 1, "float", ""), ("top_k", 2, "uint32", ""), ("top_p", 3, "float", ""),
        ("typical_p", 4, "float", ""), ("do_sample", 5, "bool", ""), ("seed", 6, "uint64", ""),
        ("repetition_penalty", 7, "float", ""), ("frequency_penalty", 8, "float", ""),
        ("presence_penalty", 9, "float", ""), ("watermark", 10, "bool", ""), ("adapter_id", 11, "string", ""),
        ("schema", 12, "string", "optional"), ("return_k_alternatives", 13, "uint32", ""),
    ],
    "StoppingCriteriaParameters": [
        ("max_new_tokens", 1, "uint32", ""), ("stop_sequences", 2, "string", "repeated"),
        ("ignore_eos_token", 3, "bool", ""),
    ],
    "Image": [("data", 1, "bytes", ""), ("mimetype", 2, "string", "")],
    "InputChunk": [("text", 1, "string", "oneof:chunk"), ("image", 2, "msg:Image", "oneof:chunk")],
    "TokenizedInputs": [("ids", 1, "uint32", "repeated"), ("input_chunks", 2, "msg:InputChunk", "repeated")],
    "Request": [
        ("id", 1, "uint64", ""), ("inputs", 2, "string", ""), ("tokenized_inputs", 3, "msg:TokenizedInputs", ""),
        ("truncate", 4, "uint32", ""), ("parameters", 5, "msg:NextTokenChooserParameters", ""),
        ("stopping_parameters", 6, "msg:StoppingCriteriaParameters", ""), ("prefill_logprobs", 7, "bool", ""),
        ("adapter_index", 8, "uint32", ""), ("blocks", 9, "uint32", "repeated"), ("slots", 10, "uint32", "repeated"),
        ("cache_len", 11, "uint32", ""), ("chunk_len", 12, "uint32", "optional"),
    ],
    "Batch": [
        ("id", 1, "uint64", ""), ("requests", 2, "msg:Request", "repeated"), ("size", 3, "uint32", ""),
        ("max_tokens", 4, "uint32", ""), ("max_blocks", 5, "uint32", ""),
    ],
    "CachedBatch": [
        ("id", 1, "uint64", ""), ("request_ids", 2, "uint64", "repeated"), ("size", 3, "uint32", ""),
        ("max_tokens", 4, "uint32", ""), ("current_tokens", 5, "uint32", ""),
    ],
    "GeneratedText": [
        ("text", 1, "string", ""), ("generated_tokens", 2, "uint32", ""), ("skipped_tokens", 3, "uint32", ""),
        ("finish_reason", 4, "enum:FinishReason", ""), ("seed", 5, "uint64", "optional"),
    ],
    "AlternativeTokens": [
        ("ids", 1, "uint32", "repeated"), ("logprobs", 2, "float", "repeated"), ("texts", 3, "string", "repeated"),
    ],
    "NextTokens": [
        ("ids", 1, "uint32", "repeated"), ("logprobs", 2, "float", "repeated"), ("texts", 3, "string", "repeated"),
        ("is_special", 4, "bool", "repeated"), ("alternative_tokens", 5, "msg:AlternativeTokens", "repeated"),
    ],
    "Generation": [
        ("request_id", 1, "uint64", ""), ("prefill_tokens", 2, "msg:NextTokens", ""),
        ("next_tokens", 3, "msg:NextTokens", ""), ("generated_text", 4, "msg:GeneratedText", "optional"),
        ("prefill_tokens_length", 5, "uint32", ""),
    ],
    "FilterBatchRequest": [("batch_id", 1, "uint64", ""), ("request_ids", 2, "uint64", "repeated")],
    "FilterBatchResponse": [("batch", 1, "msg:CachedBatch", "")],
    "PrefillRequest": [("batch", 1, "msg:Batch", ""), ("cached_batch", 2, "msg:CachedBatch", "")],
    "PrefillResponse": [
        ("generations", 1, "msg:Generation", "repeated"), ("batch", 2, "msg:CachedBatch", "optional"),
    ],
    "DecodeRequest": [("batches", 1, "msg:CachedBatch", "repeated")],
    "DecodeResponse": [
        ("generations", 1, "msg:Generation", "repeated"), ("batch", 2, "msg:CachedBatch", "optional"),
    ],
    "Embedding": [("request_id", 1, "uint64", ""), ("values", 2, "float", "repeated")],
    "EmbedRequest": [("batch", 1, "msg:Batch", "")],
    "EmbedResponse": [("embeddings", 1, "msg:Embedding", "repeated"), ("errorMsg", 2, "string", "")],
    "Entity": [
        ("entity", 1, "string", ""), ("score", 2, "float", ""), ("index", 3, "uint32", ""), ("word", 4, "string", ""),
        ("start", 5, "uint32", ""), ("end", 6, "uint32", ""),
    ],
    "EntityList": [
        ("request_id", 1, "uint64", ""), ("entities", 2, "msg:Entity", "repeated"),
        ("input_ids", 4, "uint32", "repeated"),
    ],
    "ClassifyPredictionList": [
        ("request_id", 1, "uint64", ""), ("predictions", 2, "string", "repeated"), ("scores", 3, "float", "repeated"),
    ],
    "ClassifyRequest": [("batch", 1, "msg:Batch", "")],
    "ClassifyResponse": [
        ("classify_prediction_lists", 1, "msg:ClassifyPredictionList", "repeated"), ("errorMsg", 2, "string", ""),
    ],
    "WarmupRequest": [
        ("batch", 1, "msg:Batch", ""), ("max_input_length", 2, "uint32", ""), ("max_prefill_tokens", 3, "uint32", ""),
        ("max_new_tokens", 4, "uint32", ""),
    ],
    "WarmupResponse": [("max_supported_total_tokens", 1, "uint32", "optional")],
    "AdapterParameters": [
        ("adapter_ids", 1, "string", "repeated"), ("weights", 2, "float", "repeated"),
        ("merge_strategy", 3, "enum:MergeStrategy", ""), ("density", 4, "float", ""),
        ("majority_sign_method", 5, "enum:MajoritySignMethod", ""),
    ],
    "DownloadAdapterRequest": [
        ("adapter_parameters", 1, "msg:AdapterParameters", ""), ("adapter_source", 2, "enum:AdapterSource", ""),
        ("api_token", 3, "string", "optional"),
    ],
    "DownloadAdapterResponse": [("downloaded", 1, "bool", ""), ("memory_fraction", 2, "float", "")],
    "LoadAdapterRequest": [
        ("adapter_parameters", 1, "msg:AdapterParameters", ""), ("adapter_source", 2, "enum:AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""), ("api_token", 4, "string", "optional"),
    ],
    "LoadAdapterResponse": [("loaded", 1, "bool", "")],
    "OffloadAdapterRequest": [
        ("adapter_parameters", 1, "msg:AdapterParameters", ""), ("adapter_source", 2, "enum:AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""),
    ],
    "OffloadAdapterResponse": [("offloaded", 1, "bool", "")],
}

ENUMS = {
    "FinishReason": {"FINISH_REASON_LENGTH": 0, "FINISH_REASON_EOS_TOKEN": 1, "FINISH_REASON_STOP_SEQUENCE": 2},
    "AdapterSource": {"HUB": 0, "S3": 1, "LOCAL": 2, "PBASE": 3},
    "MergeStrategy": {"LINEAR": 0, "TIES": 1, "DARE_LINEAR": 2, "DARE_TIES": 3},
    "MajoritySignMethod": {"TOTAL": 0, "FREQUENCY": 1},
}

RPCS = {
    "Info": ("InfoRequest", "InfoResponse"),
    "ServiceDiscovery": ("ServiceDiscoveryRequest", "ServiceDiscoveryResponse"),
    "ClearCache": ("ClearCacheRequest", "ClearCacheResponse"),
    "FilterBatch": ("FilterBatchRequest", "FilterBatchResponse"),
    "Warmup": ("WarmupRequest", "WarmupResponse"),
    "Prefill": ("PrefillRequest", "PrefillResponse"),
    "Decode": ("DecodeRequest", "DecodeResponse"),
    "Embed": ("EmbedRequest", "EmbedResponse"),
    "Classify": ("ClassifyRequest", "ClassifyResponse"),
    "Health": ("HealthRequest", "HealthResponse"),
    "DownloadAdapter": ("DownloadAdapterRequest", "DownloadAdapterResponse"),
    "LoadAdapter": ("LoadAdapterRequest", "LoadAdapterResponse"),
    "OffloadAdapter": ("OffloadAdapterRequest", "OffloadAdapterResponse"),
}

SCALARS = {
    FD.TYPE_BOOL: "bool", FD.TYPE_STRING: "string", FD.TYPE_BYTES: "bytes", FD.TYPE_UINT32: "uint32",
    FD.TYPE_UINT64: "uint64", FD.TYPE_FLOAT: "float",
}

FILE = generate_pb2.DESCRIPTOR


def describe(field) -> tuple[str, int, str, str]:
    if field.type == FD.TYPE_MESSAGE:
        type_name = "msg:" + field.message_type.name
    elif field.type == FD.TYPE_ENUM:
        type_name = "enum:" + field.enum_type.name
    else:
        type_name = SCALARS.get(field.type, f"unexpected type {field.type}")
    if field.is_repeated:
        label = "repeated"
    elif field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
        label = "oneof:" + field.containing_oneof.name
    elif field.has_presence and field.type != FD.TYPE_MESSAGE:
        label = "optional"
    elif field.type == FD.TYPE_MESSAGE and field.containing_oneof is not None:
        label = "optional"  # proto3 `optional` on a message field: synthetic oneof
    else:
        label = ""
    return field.name, field.number, type_name, label


def test_package_and_service():
    assert FILE.package == "generate.v1"
    assert list(FILE.services_by_name) == ["LoraxService"]


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_message_fields(name):
    message = FILE.message_types_by_name[name]
    # Additions are allowed only with numbers >= 100.
    ours = [describe(f) for f in message.fields if f.number < 100]
    assert sorted(ours, key=lambda f: f[1]) == sorted(PROTOCOL[name], key=lambda f: f[1])


def test_every_protocol_message_and_no_unexpected_ones():
    assert set(FILE.message_types_by_name) == set(PROTOCOL)


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values(name):
    enum = FILE.enum_types_by_name[name]
    assert {v.name: v.number for v in enum.values} == ENUMS[name]


def test_service_rpcs():
    service = FILE.services_by_name["LoraxService"]
    got = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert got == RPCS
    assert all(not m.client_streaming and not m.server_streaming for m in service.methods)
    assert hasattr(generate_pb2_grpc, "LoraxServiceServicer") and hasattr(generate_pb2_grpc, "LoraxServiceStub")
