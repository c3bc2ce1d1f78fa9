"""Where the operator's memory goes, logged periodically when DYNABASE_DEBUG_MEMORY=1.

RSS alone does not say whether Python objects, native allocations (TLS, threads)
or mapped libraries grow, so each line splits it. Run with PYTHONTRACEMALLOC=1 to
add the Python allocation sites (tracing itself costs memory and time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import gc
import logging
import os
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("DYNABASE_DEBUG_MEMORY", "") not in ("", "0")


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, rest = line.partition(":")
        if key in names:
            out[key] = int(rest.split()[0])
    return out


def _sockets() -> int:
    # Each TLS connection holds asyncio's 256 KB read buffer and OpenSSL's buffers.
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd).startswith("socket:")
    return count


def breakdown(top: int = 12) -> dict[str, object]:
    """One snapshot: RSS split anon/file (MB), threads, tasks, object counts, allocation sites."""
    rollup = _kib_fields("/proc/self/smaps_rollup", ("Rss", "Anonymous"))
    status = _kib_fields("/proc/self/status", ("Threads",))
    rss, anon = rollup.get("Rss", 0), rollup.get("Anonymous", 0)
    objects = gc.get_objects()
    types = collections.Counter(type(o).__name__ for o in objects)
    sizes: collections.Counter[str] = collections.Counter()
    for o in objects:
        sizes[type(o).__name__] += sys.getsizeof(o)
    info: dict[str, object] = {
        "rss_mb": round(rss / 1024, 1), "anon_mb": round(anon / 1024, 1), "file_mb": round((rss - anon) / 1024, 1),
        "sockets": _sockets(), "os_threads": status.get("Threads", 0), "py_threads": threading.active_count(),
        "tasks": len(asyncio.all_tasks()), "gc_objects": sum(types.values()),
        "types": ", ".join(f"{name}={count}" for name, count in types.most_common(top)),
        "type_mb": ", ".join(f"{name}={size / 2**20:.1f}" for name, size in sizes.most_common(top)),
        **_native_heap(), **_pymalloc(),
    }
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        info["traced_mb"], info["traced_peak_mb"] = round(current / 2**20, 1), round(peak / 2**20, 1)
        info["sites"] = ", ".join(f"{s.traceback[0].filename.rsplit('site-packages/', 1)[-1]}:{s.traceback[0].lineno}="
                                  f"{s.size / 2**20:.1f}MB" for s in stats)
    return info


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _native_heap() -> dict[str, float]:
    """glibc's heap (MB): in use by C code and large Python objects, free but kept, and mmapped."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"heap_used_mb": round(info.uordblks / 2**20, 1), "heap_free_mb": round(info.fordblks / 2**20, 1),
            "mmapped_mb": round(info.hblkhd / 2**20, 1)}


def _pymalloc() -> dict[str, float]:
    """pymalloc's arenas (MB) against the bytes its live small objects use: the gap is fragmentation."""
    out: dict[str, float] = {}
    with tempfile.TemporaryFile("w+") as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)  # _debugmallocstats writes to C stderr
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        for line in capture:
            if line.startswith("# arenas allocated current"):
                out["pymalloc_arenas_mb"] = float(int(line.split("=")[1].replace(",", "")))  # 1 MiB each
            elif line.startswith("# bytes in allocated blocks"):
                out["pymalloc_used_mb"] = round(int(line.split("=")[1].replace(",", "")) / 2**20, 1)
    return out


def _trim_probe() -> float | None:
    """RSS (MB) after glibc returns its free heap pages: what of RSS is only freed memory."""
    if os.environ.get("DYNABASE_DEBUG_MEMORY") != "trim":
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return round(_kib_fields("/proc/self/status", ("VmRSS",)).get("VmRSS", 0) / 1024, 1)


async def log_periodically(interval: float = 10.0) -> None:
    # The root logger sits at WARNING in production; these lines were asked for explicitly.
    log.setLevel(logging.INFO)
    while True:
        info = breakdown()
        info["rss_after_trim_mb"] = _trim_probe()
        log.info("memory", extra=info)
        await asyncio.sleep(interval)
