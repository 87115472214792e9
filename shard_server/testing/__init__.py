"""Test and demo tooling that drives real shard processes over gRPC (no engine imports)."""
