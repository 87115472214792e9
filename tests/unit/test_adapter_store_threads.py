"""DownloadAdapter runs on the server's I/O thread beside the model thread's load/offload/batches."""

import threading

import torch

from cache.adapter_store import AdapterStore
from model.config import MistralConfig
from shard_server.types import AdapterSpec


def test_download_beside_load_and_offload_never_races(tiny_model_dir, adapter_factory):
    config = MistralConfig.from_pretrained(tiny_model_dir)
    paths = [adapter_factory(tiny_model_dir, rank=r, seed=s) for r, s in ((2, 31), (4, 32), (6, 33))]
    specs = [AdapterSpec(adapter_ids=(str(p),), source="local") for p in paths]
    store = AdapterStore(config, "cpu", torch.float32, budget_bytes=1 << 30, host_cache_entries=1)
    errors: list[BaseException] = []
    stop = threading.Event()

    def downloads() -> None:
        try:
            while not stop.is_set():
                for spec in specs:
                    assert store.download(spec) > 0
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    worker = threading.Thread(target=downloads)
    worker.start()
    try:
        for _ in range(15):
            for index, spec in enumerate(specs, start=1):
                store.load(index, spec)
            store.batch_data([1, 2, 3, 0], [2, 1, 3, 1], is_prefill=True)
            for index in (1, 2, 3):
                assert store.offload(index)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert errors == []
