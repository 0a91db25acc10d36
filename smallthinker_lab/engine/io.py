"""Reading expert records: a pool of I/O threads, one ``os.preadv`` per expert into a preallocated buffer.

* The buffers are the cache's page-aligned slots (CPU) or pinned staging buffers (CUDA), never allocated per read.
* ``bypass_page_cache``: the file is opened with ``O_DIRECT`` when the filesystem accepts it (records, offsets and
  buffers are 4 KiB aligned); otherwise each read is followed by ``posix_fadvise(POSIX_FADV_DONTNEED)`` so the
  next read of that record comes from storage again, not from the OS page cache.
* Each record's checksum (the bundle's algorithm: XXH3-64, or crc32) is checked after the read
  (``verify_checksums``, on by default). A read error (OSError), short read or checksum mismatch becomes
  :class:`ExpertReadError` naming layer and expert, raised to the caller through the future. A ``landed`` future
  (optional) is set when the bytes are in the buffer; the checksum then runs in a separate verify thread (the read
  thread goes on to its next read) and the returned future completes after it, so a caller can compute meanwhile.
* ``fault(layer, expert, buffer)``: a test hook called in the I/O thread after each read, before the checksum;
  it may raise (an injected read error) or modify the buffer (corruption).
* ``close()`` joins the threads and closes the file descriptor; idempotent.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .bundle import CHECKSUMS, PAGE, Bundle, ExpertReadError

THREAD_PREFIX = "smallthinker-io"
Fault = Callable[[int, int, memoryview], None]


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """An anonymous page-aligned buffer (for O_DIRECT reads)."""
    return mmap.mmap(-1, max(PAGE, nbytes), flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))


class ExpertReader:
    def __init__(self, bundle: Bundle, threads: int = 4, bypass_page_cache: bool = False,
                 verify_checksums: bool = True, fault: Fault | None = None) -> None:
        if threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {threads}")
        self.bundle = bundle
        self.path = bundle.data_path
        self.bypass_page_cache = bypass_page_cache
        self.verify_checksums = verify_checksums
        self.fault = fault
        self._digest = CHECKSUMS[bundle.checksum]()
        self.direct = False
        self.fd: int | None = None
        self.fd = self._open()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=THREAD_PREFIX)
        # checksums of reads submitted with ``landed`` run here, so a read thread goes straight to its next read
        self.verify_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_PREFIX + "-verify")
        self._outstanding: dict[Future, Future] = {}  # read future -> its landed future, until the read completes
        self.threads = threads

    def _open(self) -> int:
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self.bypass_page_cache and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError:
                fd = None
            if fd is not None:
                probe = aligned_buffer(PAGE)
                try:
                    os.preadv(fd, [memoryview(probe)[:PAGE]], 0)
                    self.direct = True
                    return fd
                except OSError:
                    os.close(fd)
                finally:
                    probe.close()
        return os.open(self.path, flags)

    # ------------------------------------------------------------------ reads
    def read_into(self, layer: int, expert: int, dest: memoryview, landed: Future | None = None,
                  verify: bool = True) -> None:
        """Read record (layer, expert) into ``dest`` (>= stride bytes, page aligned); verify; raise on failure.

        ``landed``: a future set once the bytes are in ``dest``, before the checksum (to the read error if the read
        itself fails), so a caller may compute while the checksum runs and check the outcome later."""
        b = self.bundle
        fd = self.fd
        if fd is None:
            raise ExpertReadError(f"layer {layer} expert {expert}: the reader of {self.path} is closed", layer, expert)
        off, n = b.offset(layer, expert), b.stride
        where = f"layer {layer} expert {expert} ({n} bytes at offset {off} of {self.path})"
        try:
            got = 0
            while got < n:
                r = os.preadv(fd, [dest[got:n]], off + got)  # releases the GIL
                if r <= 0:
                    break
                got += r
            if self.bypass_page_cache and not self.direct:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            if self.fault is not None:
                self.fault(layer, expert, dest)
        except OSError as e:
            err = ExpertReadError(f"reading {where} failed: {e}", layer, expert)
            if landed is not None:
                landed.set_exception(err)
            raise err from e
        if got < n:
            err = ExpertReadError(f"short read of {where}: got {got} bytes; the bundle is truncated or changed "
                                  f"since it was opened", layer, expert)
            if landed is not None:
                landed.set_exception(err)
            raise err
        if landed is not None:
            landed.set_result(None)
        if verify:
            self.verify(layer, expert, dest)

    def verify(self, layer: int, expert: int, dest: memoryview) -> None:
        """Check the record's checksum (when ``verify_checksums``); raise ExpertReadError on a mismatch."""
        b = self.bundle
        if self.verify_checksums:
            where = f"layer {layer} expert {expert} ({b.stride} bytes at offset {b.offset(layer, expert)} of " \
                    f"{self.path})"
            got_sum = self._digest(dest[:b.payload_nbytes])  # releases the GIL for large buffers
            want = int(b.checksums[layer, expert])
            if got_sum != want:
                raise ExpertReadError(f"checksum mismatch in {where}: {b.checksum} {got_sum:016x}, the index says "
                                      f"{want:016x}; the bundle is corrupt: convert the checkpoint again", layer,
                                      expert)

    def submit(self, layer: int, expert: int, dest: memoryview,
               then: Callable[[], object] | None = None, landed: Future | None = None) -> Future:
        """Read in an I/O thread; the future's result is ``then()`` (or None), its exception the read error.
        ``landed``: see :meth:`read_into` (set before the checksum; the returned future completes after it)."""
        if landed is None or then is not None:
            def task():
                self.read_into(layer, expert, dest, landed)
                return then() if then is not None else None

            fut = self.pool.submit(task)
            if landed is not None:
                self._watch(fut, landed)
            return fut
        out: Future = Future()  # completes after the checksum, in the verify thread
        self._watch(out, landed)

        def check():
            try:
                self.verify(layer, expert, dest)
            except BaseException as e:
                out.set_exception(e)
            else:
                out.set_result(None)

        def read():
            try:
                self.read_into(layer, expert, dest, landed, verify=False)
            except BaseException as e:  # read_into already failed ``landed`` where the bytes never landed
                if not landed.done():
                    landed.set_exception(e)
                out.set_exception(e)
                return
            try:
                self.verify_pool.submit(check)
            except RuntimeError as e:  # the reader is closing
                out.set_exception(ExpertReadError(f"layer {layer} expert {expert}: the reader closed before the "
                                                  f"checksum ran ({e})", layer, expert))

        self.pool.submit(read)
        return out

    def _watch(self, fut: Future, landed: Future) -> None:
        """Remember a read until it completes, so that close() can fail what the pools' shutdown left unfinished
        (a cancelled queued read or checksum would leave its futures pending for ever)."""
        self._outstanding[fut] = landed
        fut.add_done_callback(lambda f: self._outstanding.pop(f, None))

    def submit_call(self, fn: Callable[[], object]) -> Future:
        return self.pool.submit(fn)

    def close(self) -> None:
        pool, self.pool = getattr(self, "pool", None), None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        vpool, self.verify_pool = getattr(self, "verify_pool", None), None
        if vpool is not None:
            vpool.shutdown(wait=True, cancel_futures=True)
        for fut, landed in list(getattr(self, "_outstanding", {}).items()):
            err = ExpertReadError(f"the reader of {self.path} closed before this read completed")
            for f in (landed, fut):
                if not f.done():  # waiters wake with the error
                    f.set_exception(err)
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_all_records(reader: ExpertReader) -> tuple[mmap.mmap, torch.Tensor]:
    """Every expert record of the reader's bundle, read (and verified, as the reader does) into one page-aligned
    host buffer laid out as the expert file: the buffer and a uint8 tensor over it."""
    b = reader.bundle
    buf = aligned_buffer(b.file_size)
    view = memoryview(buf)
    futures = [reader.submit(layer, e, view[b.offset(layer, e):b.offset(layer, e) + b.stride])
               for layer in range(b.num_layers) for e in range(b.num_experts)]
    for f in futures:
        f.result()
    return buf, torch.frombuffer(buf, dtype=torch.uint8)[:b.file_size]


# ------------------------------------------------------------------ CUDA transfers
class PinnedBuffers:
    """A fixed pool of page-aligned, page-locked host buffers (staging for storage -> GPU copies)."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self._maps, self._tensors = [], []
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(count):
            m = aligned_buffer(nbytes)
            t = torch.frombuffer(m, dtype=torch.uint8)[:nbytes]
            _pin(t)
            self._maps.append(m)
            self._tensors.append(t)
            self._free.put(i)

    def acquire(self) -> int:
        return self._free.get()

    def release(self, i: int) -> None:
        self._free.put(i)

    def tensor(self, i: int) -> torch.Tensor:
        return self._tensors[i]

    def buffer(self, i: int) -> memoryview:
        return memoryview(self._maps[i])[:self.nbytes]

    def close(self) -> None:
        for t in self._tensors:
            _unpin(t)
        self._tensors, self._maps = [], []


_registered: set[int] = set()
_reg_lock = threading.Lock()


def _pin(t: torch.Tensor) -> None:
    """Page-lock an existing host buffer (cudaHostRegister) so copies from it are truly asynchronous."""
    if not torch.cuda.is_available():
        return
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    except Exception:  # no cudart binding: copies from pageable memory are correct, only slower
        return
    if int(rc) == 0:
        with _reg_lock:
            _registered.add(t.data_ptr())


def _unpin(t: torch.Tensor) -> None:
    with _reg_lock:
        if t.data_ptr() not in _registered:
            return
        _registered.discard(t.data_ptr())
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class CudaTransfer:
    """Fills GPU cache slots: from a pinned host copy of the whole bundle (``host_cache``) or from storage through
    pinned staging buffers, on a separate copy stream. A slot's previous contents are fenced by an event the
    compute stream records when the entry is evicted; each load's result is an event the compute stream waits on.
    """

    def __init__(self, reader: ExpertReader, device: torch.device, host_cache: bool, staging: int) -> None:
        self.reader, self.device, self.bundle = reader, device, reader.bundle
        self.stream = torch.cuda.Stream(device=device)
        self.fences: dict[int, torch.cuda.Event] = {}
        self.host = None
        self.staging = None
        if host_cache:
            self._host_map, self.host = read_all_records(reader)
            _pin(self.host)
        else:
            self.staging = PinnedBuffers(staging, self.bundle.stride)

    def fence(self, slot: int) -> None:
        """Called when a slot's entry is evicted: later copies into it wait for the compute issued so far."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.fences[slot] = ev

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, fence: torch.cuda.Event | None) -> torch.cuda.Event:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if fence is not None:
                self.stream.wait_event(fence)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def load(self, layer: int, expert: int, dst: torch.Tensor, slot: int) -> Future:
        fence = self.fences.pop(slot, None)
        if self.host is not None:
            off = self.bundle.offset(layer, expert)
            fut: Future = Future()
            fut.set_result(self._copy(dst, self.host[off:off + self.bundle.stride], fence))
            return fut
        staging = self.staging

        def task():
            i = staging.acquire()
            try:
                self.reader.read_into(layer, expert, staging.buffer(i))
                ev = self._copy(dst, staging.tensor(i), fence)
                ev.synchronize()  # the staging buffer is free again once the copy landed
                return ev
            finally:
                staging.release(i)

        return self.reader.submit_call(task)

    def close(self) -> None:
        self.stream.synchronize()  # no copy may still write into a slot or read a staging buffer
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        if self.host is not None:
            _unpin(self.host)
            self.host = None
