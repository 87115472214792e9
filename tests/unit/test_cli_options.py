"""Command line -> ServeConfig: every serve option is defined once (shard_server/server/options.py) and
reaches each rank that `launch` starts unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shard_server.config import ServeConfig, ShardConfig
from shard_server.server.cli import build_parser, serve_argv
from shard_server.server.options import OPTIONS, Option, serve_config

ENV = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


def other_value(o: Option) -> list[str]:
    """Command-line words that set `o` to a value other than its default."""
    default = None if o.required else o.default_value()
    if o.switch:
        return [o.name if not default else f"--no-{o.name[2:]}"]
    if o.choices is not None:
        words = [c for c in o.choices if o.type(c) != default][:1]
    elif o.many:
        words = ["a", "b c"]
    elif o.type is int:
        words = [str((default or 0) + 7)]
    elif o.type is float:
        words = [repr((default or 0.0) * 0.5 + 0.125)]  # still in range for fractions and seconds
    else:
        words = ["/tmp/some where"]
    return words if o.positional else [o.name, *words]


def launch_args(model_dir, *extra: str):
    argv = ["launch", "--num-shard", "2", str(model_dir), "--uds-path", "/tmp/x", *extra]
    return build_parser().parse_args(argv)


def test_every_option_fills_a_config_field_and_appears_in_serve_and_launch():
    fields = {f"shard.{f.name}" for f in dataclasses.fields(ShardConfig)}
    fields |= {f"serve.{f.name}" for f in dataclasses.fields(ServeConfig)}
    assert len({o.field for o in OPTIONS}) == len(OPTIONS)
    assert {o.field for o in OPTIONS} <= fields
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    dests = {name: {a.dest for a in sub[name]._actions} - {"help"} for name in ("serve", "launch")}
    assert dests["serve"] == {o.dest for o in OPTIONS}
    assert dests["launch"] == dests["serve"] | {"num_shard"}


@pytest.mark.parametrize("option", [o for o in OPTIONS if not o.required], ids=lambda o: o.name)
def test_each_serve_option_round_trips_through_launch(tmp_path, option):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    if option.positional:  # the model directory itself: launch_args gives it
        launch = launch_args(tmp_path)
    else:
        launch = launch_args(tmp_path, *other_value(option))
    child = build_parser().parse_args(serve_argv(launch))  # what each rank's `serve` receives
    assert child.command == "serve"
    assert getattr(child, option.dest) == getattr(launch, option.dest)
    if not option.positional:
        assert getattr(child, option.dest) != option.default_value()  # the test set a real value
    assert {o.dest: getattr(child, o.dest) for o in OPTIONS} == {
        o.dest: getattr(launch, o.dest) for o in OPTIONS
    }
    try:
        expected = serve_config(launch, ENV)
    except ValueError:  # an out-of-range sample value: the child must refuse it the same way
        with pytest.raises(ValueError):
            serve_config(child, ENV)
        return
    assert serve_config(child, ENV) == expected


def test_all_options_at_once_and_the_resolved_defaults(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    every = [o for o in OPTIONS if not (o.positional or o.required or o.name == "--device")]
    launch = launch_args(tmp_path, "--device", "cuda", *[w for o in every for w in other_value(o)])
    child = build_parser().parse_args(serve_argv(launch))
    assert serve_config(child, ENV) == serve_config(launch, ENV)
    cfg = serve_config(
        launch_args(
            tmp_path, "--device", "cuda", "--no-cuda-graphs", "--max-kv-cache-bytes", "4096",
            "--preloaded-adapter-ids", "a", "b", "--block-allocator", "router", "--log-format", "json",
        ),
        ENV,
    )  # fmt: skip
    shard = cfg.shard
    assert shard.dtype == "bfloat16"  # the checkpoint's dtype on cuda
    assert (shard.rank, shard.world_size, shard.master_port) == (1, 2, 29555)
    assert (shard.cuda_graphs, shard.max_kv_cache_bytes, shard.block_allocator) == (False, 4096, "router")
    assert shard.preloaded_adapter_ids == ("a", "b") and cfg.log_format == "json"
    cpu = serve_config(
        build_parser().parse_args(["serve", str(tmp_path), "--uds-path", "/x", "--device", "cpu"]), {}
    ).shard
    assert (cpu.dtype, cpu.rank, cpu.world_size, cpu.cuda_graphs) == ("float32", 0, 1, True)
    # S3 downloads go under the user's cache directory unless --adapter-cache-dir says otherwise
    assert cpu.adapter_cache_dir == Path("/tmp/.cache/shard-server/adapters")
    xdg = serve_config(
        build_parser().parse_args(["serve", str(tmp_path), "--uds-path", "/x", "--device", "cpu"]),
        {"XDG_CACHE_HOME": "/c", "HOME": "/h"},
    ).shard
    assert xdg.adapter_cache_dir == Path("/c/shard-server/adapters")
    home = serve_config(
        build_parser().parse_args(["serve", str(tmp_path), "--uds-path", "/x", "--device", "cpu"]),
        {"HOME": "/home/u"},
    ).shard
    assert home.adapter_cache_dir == Path("/home/u/.cache/shard-server/adapters")
    # every other option at the config's own default
    assert dataclasses.replace(cpu, adapter_cache_dir=None) == ShardConfig(model_dir=tmp_path)
