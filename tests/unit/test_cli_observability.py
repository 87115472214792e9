"""The observability flags: off by default, shared by serve and launch, passed through to every rank."""

from __future__ import annotations

from shard_server.server.cli import build_parser, serve_argv
from shard_server.server.options import serve_config


def test_metrics_and_tracing_are_off_by_default(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path), "--uds-path", "/tmp/x", "--device", "cpu"])
    cfg = serve_config(args, {})
    assert cfg.metrics_port is None and cfg.otlp_endpoint is None


def test_launch_passes_the_observability_flags_to_each_rank(tmp_path):
    parser = build_parser()
    launch = parser.parse_args(
        ["launch", "--num-shard", "2", str(tmp_path), "--uds-path", "/tmp/x", "--device", "cpu",
         "--metrics-port", "9100", "--metrics-host", "0.0.0.0", "--otlp-endpoint", "collector:4317",
         "--otlp-service-name", "shard-a"]
    )  # fmt: skip
    child = parser.parse_args(serve_argv(launch))
    cfg = serve_config(child, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"})
    assert (cfg.metrics_port, cfg.metrics_host) == (9100, "0.0.0.0")  # rank r serves on 9100 + r
    assert (cfg.otlp_endpoint, cfg.otlp_service_name) == ("collector:4317", "shard-a")
    assert cfg.shard.rank == 1
