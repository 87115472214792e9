"""Adapter bytes on the host, and their trip to the device stacks.

`HostAdapter` is what the store keeps per registered adapter: a table of its modules (per (layer,
target): where A and B lie in the adapter's bytes, as dtype/shape/strides after the tensor-parallel
slice, and B's scale) and where the bytes are:

  file-backed    a local safetensors file (path + identity): the bytes stay in the OS page cache (host
                 memory) or on disk and are read again whenever the adapter becomes device-resident, so
                 a thousand registered 7B rank-16 adapters cost a thousand module tables, not 84 GB of
                 copies; the page cache evicts the idle ones. A file that changed since it was loaded
                 is refused (FailedPrecondition) instead of silently serving other weights.
  memory-backed  merged adapters (no file holds them): one buffer in the store dtype, scaled.

`Uploader` moves the bytes: one read into a pinned staging buffer (parallel preadv of the file, or a
memcpy of the memory buffer; two staging buffers in turn, so reading the next adapter overlaps the copy
of the last), then per layer, on a side CUDA stream: the host->device copy of that layer's byte range,
and the store's unpack into the slot (slice, B * scale, copy), followed by an event. The forward waits
for layer l's event before layer l's LoRA (AdapterBatchData), a decode step for all of them, LoadAdapter
for the last one. On the CPU the same code runs synchronously: no pinning, no streams, no events.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.errors import FailedPrecondition

Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
Sliced = dict[Key, tuple[torch.Tensor, torch.Tensor, float]]  # this rank's (A, B, scale) per module
_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting src -> dst loses nothing, so B may be scaled after the cast, in dst."""
    return src == dst or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


@dataclasses.dataclass(frozen=True)
class TensorBytes:
    """A strided view into the adapter's bytes: byte offset, dtype, shape and strides (elements)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor, base_ptr: int) -> TensorBytes:
        return cls(t.data_ptr() - base_ptr, t.dtype, tuple(t.shape), tuple(t.stride()))

    def view(self, raw: torch.Tensor) -> torch.Tensor:
        """The tensor over `raw` (uint8, the adapter's bytes: on the host or on the device)."""
        size = self.dtype.itemsize
        typed = raw[: raw.numel() - raw.numel() % size].view(self.dtype)
        return typed.as_strided(self.shape, self.stride, self.offset // size)

    @property
    def end(self) -> int:
        if not all(self.shape):
            return self.offset
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return self.offset + (last + 1) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ModuleBytes:
    a: TensorBytes  # [r, in_local]
    b: TensorBytes  # [out_local, r], unscaled
    scale: float


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = os.stat(path)
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass
class HostAdapter:
    """One registered adapter's module table and the source of its bytes (file or memory)."""

    modules: dict[Key, ModuleBytes]
    nbytes: int  # length of the byte source
    file: FileIdentity | None = None
    memory: torch.Tensor | None = None  # uint8 [nbytes] (memory-backed only)
    # DoRA: per module the magnitude m [out_local] (float32) from the file, and the output scales
    # m / ||W + s B A|| [out_local] (float32) that need the base model, computed when it is loaded.
    magnitudes: dict[Key, torch.Tensor] = dataclasses.field(default_factory=dict)
    scales: dict[Key, torch.Tensor] = dataclasses.field(default_factory=dict)

    def shapes(self) -> list[tuple[Key, int, int, int]]:
        """(key, r, in_local, out_local) per module."""
        return [(k, m.a.shape[0], m.a.shape[1], m.b.shape[0]) for k, m in self.modules.items()]

    def layer_ranges(self) -> list[tuple[list[Key], int, int]]:
        """(keys, first byte, end byte) per layer in forward order (layers 0.., then lm_head): the bytes
        one layer's unpack needs. Overlapping ranges (an unusual file order) collapse into one."""
        by_layer: dict[int, list[Key]] = defaultdict(list)
        for key in self.modules:
            by_layer[key[0]].append(key)
        out = []
        for layer in sorted(by_layer, key=lambda layer: (layer < 0, layer)):
            keys = by_layer[layer]
            lo = min(min(self.modules[k].a.offset, self.modules[k].b.offset) for k in keys)
            hi = max(max(self.modules[k].a.end, self.modules[k].b.end) for k in keys)
            out.append((keys, lo, hi))
        spans = sorted((lo, hi) for _, lo, hi in out)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
            return [([k for keys, _, _ in out for k in keys], spans[0][0], max(h for _, h in spans))]
        return out

    def read_into(self, buf: torch.Tensor, pool: ThreadPoolExecutor | None) -> None:
        """Copy the adapter's bytes into buf[:nbytes] (uint8): the file in parallel chunks, or memory."""
        if self.memory is not None:
            buf[: self.nbytes].copy_(self.memory)
            return
        f = self.file
        try:
            fd = os.open(f.path, os.O_RDONLY)
        except OSError as e:
            raise FailedPrecondition(
                f"{f.path} is gone since it was loaded ({e.strerror}); offload the adapter and load it again"
            ) from e
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (f.device, f.inode, f.size, f.mtime_ns):
                raise FailedPrecondition(
                    f"{f.path} changed since it was loaded; offload the adapter and load it again"
                )
            view = memoryview(buf.numpy()).cast("B")
            chunk = max(8 << 20, -(-self.nbytes // 4))
            jobs = [(o, min(self.nbytes, o + chunk)) for o in range(0, self.nbytes, chunk)]

            def read(span: tuple[int, int]) -> None:
                lo, hi = span
                while lo < hi:  # preadv may return short
                    n = os.preadv(fd, [view[lo:hi]], lo)
                    if n <= 0:
                        raise FailedPrecondition(
                            f"{f.path} ended early; offload the adapter and load it again"
                        )
                    lo += n

            if pool is None or len(jobs) == 1:
                for span in jobs:
                    read(span)
            else:
                list(pool.map(read, jobs))
        finally:
            os.close(fd)

    @classmethod
    def from_file(cls, identity: FileIdentity, modules: Sliced) -> HostAdapter | None:
        """Module table over a mapped file: modules[key] = (A, B, scale) as TP-sliced views of one file
        mapping. None when some tensor is not a view of it (an unaligned tensor the loader copied)."""
        first = next(iter(modules.values()))[0]
        storage = first.untyped_storage()
        base = storage.data_ptr()
        table = {}
        for key, (a, b, scale) in modules.items():
            for t in (a, b):
                if t.untyped_storage().data_ptr() != base:
                    return None
            table[key] = ModuleBytes(TensorBytes.of(a, base), TensorBytes.of(b, base), float(scale))
        return cls(table, identity.size, file=identity)

    @classmethod
    def packed(cls, modules: Sliced, dtype: torch.dtype) -> HostAdapter:
        """A memory-backed copy: every A then every B, cast to `dtype` and B scaled (as `unpack` would)."""
        items = sorted(modules.items())
        numel_a = sum(a.numel() for _, (a, _, _) in items)
        flat = torch.empty(numel_a + sum(b.numel() for _, (_, b, _) in items), dtype=dtype)
        table, oa, ob = {}, 0, numel_a
        for key, (a, b, scale) in items:
            dst_a = flat[oa : oa + a.numel()].view(a.shape)
            dst_b = flat[ob : ob + b.numel()].view(b.shape)
            a_src, b_src = prepared(a, b, scale, dtype)
            dst_a.copy_(a_src)
            dst_b.copy_(b_src)
            base = flat.data_ptr()
            table[key] = ModuleBytes(TensorBytes.of(dst_a, base), TensorBytes.of(dst_b, base), 1.0)
            oa, ob = oa + a.numel(), ob + b.numel()
        raw = flat.view(torch.uint8)
        return cls(table, raw.numel(), memory=raw)


def prepared(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype):
    """(A, B * scale) ready to copy into `dtype` stacks, rounded as the float32 fold-then-cast path: B is
    scaled after an exact cast (in `dtype`), else in float32 before the cast; float64 goes via float32."""
    if a.dtype not in _HALF_OR_SINGLE:
        a = a.float()
    if b.dtype not in _HALF_OR_SINGLE:
        b = b.float()
    if scale == 1.0:
        return a, b
    if exact_cast(b.dtype, dtype):
        return a, b.to(dtype) * scale
    return a, b.float() * scale


class Uploader:
    """Host bytes -> device bytes, layer by layer (module docstring). One per store."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staged: list[torch.cuda.Event | None] = [None, None]  # the copies out of each buffer done
        self._turn = 0
        workers = min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-read")

    def read(self, host: HostAdapter) -> tuple[torch.Tensor, int]:
        """The adapter's bytes in a staging buffer (pinned on CUDA) -> (buffer, which)."""
        which = self._turn
        self._turn ^= 1
        if self._staged[which] is not None:
            self._staged[which].synchronize()  # the previous copies out of this buffer have finished
        buf = self._staging[which]
        if buf is None or buf.numel() < host.nbytes:
            size = 1 << max(host.nbytes - 1, 1).bit_length()
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            self._staging[which] = buf
        host.read_into(buf, self._pool)
        return buf, which

    def upload(self, host: HostAdapter, begin, unpack, finish) -> None:
        """Read `host`; then, on the side stream after the work queued so far: begin(); per layer range
        its copy to the device and unpack(raw, keys); finish(). The device buffer goes back to the side
        stream's allocator afterwards (reused only by later work on that stream)."""
        staging, which = self.read(host)
        ranges = host.layer_ranges()
        if not self.cuda:
            begin()
            for keys, _, _ in ranges:
                unpack(staging, keys)
            finish()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # slots may still be read there
        with torch.cuda.stream(self.stream):
            raw = torch.empty(host.nbytes, dtype=torch.uint8, device=self.device)
            begin()
            for keys, lo, hi in ranges:
                raw[lo:hi].copy_(staging[lo:hi], non_blocking=True)
                unpack(raw, keys)
            finish()
            done = torch.cuda.Event()
            done.record(self.stream)
            self._staged[which] = done
            del raw

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
