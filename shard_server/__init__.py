"""The shard process: gRPC service, batch lifecycle, sampling, CLI."""
