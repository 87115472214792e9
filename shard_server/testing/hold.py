"""A test-only hold on Decode, so that a test can act while an RPC is certainly in flight.

`shard-server serve --test-hold-decode-file PATH` wraps the engine in `HeldDecode`: each Decode, on the
model thread, first creates `PATH.held` (the test's sign that the RPC has reached the model) and then
waits until PATH exists (the test's release). The test decides every step; nothing depends on how long
the machine takes. Everything else passes straight through to the engine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

POLL_SECONDS = 0.01
# A release that never comes (a test that died) must not pin the model thread forever.
MAX_HOLD_SECONDS = 600.0


def held_marker(release: Path) -> Path:
    return release.with_name(release.name + ".held")


class HeldDecode:
    def __init__(self, engine: Any, release: Path) -> None:
        self._engine = engine
        self._release = Path(release)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        held_marker(self._release).touch()
        deadline = time.monotonic() + MAX_HOLD_SECONDS
        while not self._release.exists() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        return self._engine.decode(*args, **kwargs)
