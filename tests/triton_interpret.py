"""Shims that make triton 3.6's interpreter compute like the GPU (see tests/unit/test_kernels_interpret.py
for what they patch and why), and `interpreted()`, which applies them and loads model/kernels modules fresh.
TRITON_INTERPRET=1 must be set before triton is first imported (tests/conftest.py does it without CUDA)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import triton

KERNEL_DIR = Path(__file__).resolve().parents[1] / "model" / "kernels"


def _patch_interpreter(monkeypatch) -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    orig_patch_tensor = interp._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    orig_dot = interp.InterpreterBuilder.create_dot

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, *args):
        return orig_dot(self, as_f32(a), as_f32(b), d, *args)

    torch_dtypes = {"fp32": (torch.float32, torch.int32, np.uint32),
                    "fp16": (torch.float16, torch.int16, np.uint16),
                    "bf16": (torch.bfloat16, torch.int16, np.uint16),
                    "fp8e4nv": (torch.float8_e4m3fn, torch.uint8, np.uint8)}
    orig_convert = interp._convert_float

    def convert_float(data, in_dt, out_dt, rounding_mode):
        if in_dt.name not in torch_dtypes or out_dt.name not in torch_dtypes or \
                in_dt.primitive_bitwidth <= out_dt.primitive_bitwidth:
            return orig_convert(data, in_dt, out_dt, rounding_mode)
        src_t, src_bits, src_np = torch_dtypes[in_dt.name]
        dst_t, dst_bits, dst_np = torch_dtypes[out_dt.name]
        raw = np.ascontiguousarray(data).view(src_np).view(getattr(np, str(src_bits).split(".")[1]))
        res = torch.from_numpy(raw).view(src_t).to(dst_t)
        return res.view(dst_bits).numpy().view(dst_np)

    monkeypatch.setattr(interp, "_convert_float", convert_float)
    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_tensor)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


def _interpreter_internals_present() -> bool:
    # the shims patch private names of triton 3.6's interpreter; another version may lack them
    import triton.runtime.interpreter as interp

    return all(hasattr(interp, n) for n in ("_convert_float", "_patch_lang_tensor", "TensorHandle")) and \
        hasattr(getattr(interp, "InterpreterBuilder", None), "create_dot")


@contextlib.contextmanager
def interpreted(names):
    """name -> freshly loaded interpreted module of model/kernels (with the shims applied meanwhile)."""
    if not _interpreter_internals_present():
        pytest.skip(f"triton {triton.__version__}: interpreter internals the shims patch are gone")
    mp = pytest.MonkeyPatch()
    _patch_interpreter(mp)
    mods = {}
    for name in names:
        path = KERNEL_DIR / f"{name}.py"
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"_interpreted_kernels_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    try:
        yield mods
    finally:
        for mod in mods.values():
            sys.modules.pop(mod.__name__, None)
        mp.undo()
