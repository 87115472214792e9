"""Adapter bytes on the host, and their trip to the device.

`HostAdapter` is what the store keeps per registered adapter: a table of its modules (per (layer,
target): where A and B lie in the adapter's bytes, as dtype/shape/strides after the tensor-parallel
slice, and B's scale) and where the bytes are:

  file-backed    a local safetensors file (path + identity): the bytes stay in the OS page cache (host
                 memory) or on disk and are read again whenever the adapter becomes device-resident, so
                 a thousand registered 7B rank-16 adapters cost a thousand module tables, not 84 GB of
                 copies; the page cache evicts the idle ones. A file that changed since it was loaded
                 is refused (FailedPrecondition) instead of silently serving other weights.
  memory-backed  merged adapters (no file holds them): one buffer in the store dtype, scaled.

`Uploader` moves the bytes, once each: the file is read by a few threads in chunks (preadv) into a
pinned staging buffer, and each chunk's host->device copy is queued on a side CUDA stream as soon as
the chunk has landed, so reading and copying overlap; the device buffer then holds the adapter's bytes
as laid out in the file, for the store's unpack into the slot (cache/adapter_unpack.py), queued on the
same stream. Two staging buffers in turn (reading the next adapter overlaps the copy of the last) and
the device buffer are allocated once, at their largest size so far (`reserve` sizes them at start-up),
never inside a load of an adapter that fits them. On the CPU the same code runs synchronously: the
staging buffer is the unpack's source, no pinning, no streams, no events.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from model.errors import FailedPrecondition

Key = tuple[int, str]  # (layer_idx, target); layer_idx -1 is lm_head
Sliced = dict[Key, tuple[torch.Tensor, torch.Tensor, float]]  # this rank's (A, B, scale) per module
_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)
MIN_CHUNK = 4 << 20  # bytes per read (and host->device copy) at least: fewer, larger copies


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
    _layout_key: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def layout_key(self) -> tuple:
        """What decides how the bytes unpack into a slot: the module table (byte views and scales)."""
        if self._layout_key is None:
            self._layout_key = (self.nbytes, tuple(sorted(self.modules.items())))
        return self._layout_key

    def shapes(self) -> list[tuple[Key, int, int, int]]:
        """(key, r, in_local, out_local) per module."""
        return [(k, m.a.shape[0], m.a.shape[1], m.b.shape[0]) for k, m in self.modules.items()]

    def read_into(self, buf: torch.Tensor, pool: ThreadPoolExecutor | None) -> None:
        """Copy the adapter's bytes into buf[:nbytes] (uint8): the file in parallel chunks, or memory."""
        for _ in self.read_chunks(buf, pool):
            pass

    def read_chunks(self, buf: torch.Tensor, pool: ThreadPoolExecutor | None,
                    chunks: int = 1) -> Iterator[tuple[int, int]]:  # fmt: skip
        """Copy the adapter's bytes into buf[:nbytes] (uint8), yielding each byte span [lo, hi) in order
        as soon as it (and every span before it) has landed: about `chunks` spans of at least
        MIN_CHUNK bytes, read by `pool`'s threads at once (a file), or one memcpy (memory). Returns only
        once no thread writes into `buf` any more, also when it raises or the caller stops early."""
        if self.memory is not None:
            buf[: self.nbytes].copy_(self.memory)
            yield 0, self.nbytes
            return
        f = self.file
        try:
            fd = os.open(f.path, os.O_RDONLY)
        except OSError as e:
            raise FailedPrecondition(
                f"{f.path} is gone since it was loaded ({e.strerror}); offload the adapter and load it again"
            ) from e
        futures = []
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (f.device, f.inode, f.size, f.mtime_ns):
                raise FailedPrecondition(
                    f"{f.path} changed since it was loaded; offload the adapter and load it again"
                )
            view = memoryview(buf.numpy()).cast("B")
            size = max(MIN_CHUNK, -(-self.nbytes // max(1, chunks)))
            spans = [(o, min(self.nbytes, o + size)) for o in range(0, self.nbytes, size)]

            def read(span: tuple[int, int]) -> None:
                lo, hi = span
                while lo < hi:  # preadv may return short
                    n = os.preadv(fd, [view[lo:hi]], lo)
                    if n <= 0:
                        raise FailedPrecondition(
                            f"{f.path} ended early; offload the adapter and load it again"
                        )
                    lo += n

            if pool is None or len(spans) == 1:
                for span in spans:
                    read(span)
                    yield span
                return
            futures = [pool.submit(read, span) for span in spans]
            for span, fut in zip(spans, futures, strict=True):
                fut.result()
                yield span
        finally:
            for fut in futures:  # a failed or abandoned read: no thread may write into buf afterwards
                fut.cancel()
            wait(futures)
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
    """Host bytes -> device bytes through pinned staging buffers (module docstring). One per store."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staged: list[torch.cuda.Event | None] = [None, None]  # the copies out of each buffer done
        self._turn = 0
        self._raw: torch.Tensor | None = None  # the adapter's bytes on the device (CUDA), side stream's
        self.workers = min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="adapter-read")

    def reserve(self, nbytes: int) -> None:
        """Allocate the staging buffers (and the device buffer) for adapters of up to `nbytes` now."""
        for which in (0, 1):
            buf = self._buffer(which, nbytes)
            if not self.cuda:
                buf.zero_()  # touched now, not page by page inside the first loads (pinned memory is)
        if self.cuda:
            self._device_buffer(nbytes)

    def _buffer(self, which: int, nbytes: int) -> torch.Tensor:
        buf = self._staging[which]
        if buf is None or buf.numel() < nbytes:
            self._staging[which] = None  # the old one goes back before the new one is pinned
            size = 1 << max(nbytes - 1, 1).bit_length()
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            self._staging[which] = buf
        return buf

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        if self._raw is None or self._raw.numel() < nbytes:
            self._raw = None
            with torch.cuda.stream(self.stream):  # owned by the side stream: every use is ordered on it
                self._raw = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8,
                                        device=self.device)  # fmt: skip
        return self._raw

    def stage(self, host: HostAdapter) -> tuple[torch.Tensor, int]:
        """Read `host`'s bytes and (CUDA) queue their copy to the device on the side stream, after the
        work queued so far on the current stream (slots may still be read there) -> (the bytes: device
        buffer on CUDA, staging buffer on the CPU; which staging buffer, for `staged`). Work queued on
        `self.stream` afterwards sees the bytes; call `staged(which)` after the last such work."""
        which = self._turn
        self._turn ^= 1
        if self._staged[which] is not None:
            self._staged[which].synchronize()  # the previous copies out of this buffer have finished
            self._staged[which] = None
        buf = self._buffer(which, host.nbytes)
        if not self.cuda:
            host.read_into(buf, self._pool)
            return buf, which
        raw = self._device_buffer(host.nbytes)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for lo, hi in host.read_chunks(buf, self._pool, chunks=2 * self.workers):
                raw[lo:hi].copy_(buf[lo:hi], non_blocking=True)
        return raw, which

    def staged(self, which: int) -> torch.cuda.Event | None:
        """After the last work that reads what `stage` returned: an event on the side stream (CUDA), which
        also frees staging buffer `which` for the next adapter once it completes."""
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)
        self._staged[which] = done
        return done

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
