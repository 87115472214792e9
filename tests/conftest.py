"""Shared fixtures: tiny Mistral models and PEFT adapters, made locally (no hub).

Also, before anything else is imported: without CUDA, TRITON_INTERPRET=1, because triton decides between
interpreter and compiler once, when it is first imported, and transformers and peft import it. Set here,
the Triton kernel tests (tests/unit/test_kernels_interpret.py) run in the interpreter whatever ran first;
nothing else uses triton on the CPU (the model picks Triton kernels only on CUDA devices).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from shard_server.tools.tiny_model import TinyModelSpec, make_tiny_adapter, make_tiny_model  # noqa: E402

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration (real server processes) is marked `integration`."""
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(**spec_fields) -> directory; one directory per distinct spec per session."""
    made: dict[tuple, Path] = {}

    def make(**fields) -> Path:
        key = tuple(sorted(fields.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-model")
            made[key] = make_tiny_model(out, TinyModelSpec(**fields))
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    """The default tiny model: 2 layers, hidden 64, 4 heads, 2 KV heads, full attention."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """adapter_factory(base_dir, rank=, target_modules=, use_rslora=, seed=) -> PEFT adapter dir."""
    made: dict[tuple, Path] = {}

    def make(base_dir: Path, **kwargs) -> Path:
        if "target_modules" in kwargs:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        key = (str(base_dir), tuple(sorted(kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("adapter")
            made[key] = make_tiny_adapter(base_dir, out, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def fake_s3():
    """A real S3-compatible server (moto, IAM enforced) on 127.0.0.1 for the session; see tests/s3_fake.py."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from s3_fake import FakeS3

    server = FakeS3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core host: torch's CPU thread pool only adds wake-up latency (tens of
    ms per op on a loaded machine), so modules of tiny-model tests run with one thread. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
