"""ShardEngine and what it owns between calls: cached batches, admission of requests, prefill chunks,
outputs, KV block accounting (shard or router allocation), KV sizing and FP8 calibration at Warmup."""
