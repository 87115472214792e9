"""What the shard keeps between calls: KV blocks, KV tensors, adapters."""
