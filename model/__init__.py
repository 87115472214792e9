"""The math of the shard: Mistral with a paged KV cache and LoRA adapters. No gRPC, no protobuf."""
