"""The kernel splice program (bpf/splice.c): built with clang into the cache folder once
per source version, loaded with libbpf (through ctypes, no Python binding needed), and
its maps as the proxy uses them. fastpath.py decides which connections go through it.

Needs, at build time, clang and libbpf's headers (Debian: clang, libbpf-dev; installed
by scripts/setup), and at run time libbpf.so.1 and the rights to load BPF programs
(root, or CAP_BPF + CAP_NET_ADMIN). Anything missing is a KernelUnavailable naming it;
the proxy then forwards in Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import socket
import subprocess
import sysconfig
from importlib import resources
from pathlib import Path

SOURCE = "splice.c"
MAX_CONNS = 16384  # MAX_CONNS in splice.c: connections beyond it stay in Python
MODE_KERNEL, MODE_USER = 0, 1
FROM_CLIENT, FROM_SERVER = 0, 1
BPF_SK_SKB_STREAM_VERDICT = 5  # enum bpf_attach_type
BPF_F_LOCK = 4  # read a map value under its bpf_spin_lock
SO_COOKIE = 57


class KernelUnavailable(Exception):
    """Why the kernel splice cannot be used here (the proxy forwards in Python instead)."""


class Parse(ctypes.Structure):
    _fields_ = [("rem", ctypes.c_uint32), ("hdr", ctypes.c_uint8 * 5), ("hdr_len", ctypes.c_uint8),
                ("status_next", ctypes.c_uint8), ("user", ctypes.c_uint8), ("lost", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


class Batch(ctypes.Structure):
    _fields_ = [("syncs", ctypes.c_uint64), ("at", ctypes.c_uint64)]


RING = 16


class Work(ctypes.Structure):
    """struct work: the program's scratch for the packet in hand (not read here)."""

    _fields_ = [("counts", ctypes.c_uint32 * 8), ("p", Parse), ("total", ctypes.c_uint64),
                ("answered", ctypes.c_uint64), ("query_ns", ctypes.c_uint64), ("now", ctypes.c_uint64)]


class Conn(ctypes.Structure):
    """struct conn: one spliced connection's counters (see splice.c)."""

    _fields_ = [("lock", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("dir", Parse * 2),
                ("bytes", ctypes.c_uint64 * 2), ("queries", ctypes.c_uint64), ("syncs", ctypes.c_uint64),
                ("readies", ctypes.c_uint64), ("query_ns", ctypes.c_uint64), ("client_at", ctypes.c_uint64),
                ("ready_at", ctypes.c_uint64), ("batches", ctypes.c_uint64), ("answered", ctypes.c_uint64),
                ("status", ctypes.c_uint32), ("pad2", ctypes.c_uint32), ("ring", Batch * RING), ("work", Work * 2)]

    def sent_at(self, sync: int) -> float:
        """When sync point number ``sync`` (1-based) was sent, in seconds of time.monotonic();
        for one older than the ring remembers, its oldest remembered packet's time."""
        first = max(self.answered, self.batches - RING)
        for batch in range(first, self.batches):
            entry = self.ring[batch % RING]
            if entry.syncs >= sync:
                return float(entry.at) / 1e9
        return float(self.client_at) / 1e9


class Link(ctypes.Structure):
    _fields_ = [("peer", ctypes.c_uint64), ("slot", ctypes.c_uint32), ("side", ctypes.c_uint32)]


def cookie(sock: object) -> int:
    """The kernel's id of a socket (SO_COOKIE), the key of its entries."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)  # type: ignore[attr-defined]
    return int.from_bytes(raw, "little")


def build(cache: Path) -> Path:
    """The compiled object for this source, built with clang on first use."""
    source = resources.files("dynabase.proxy").joinpath("bpf", SOURCE).read_bytes()
    target = cache / "bpf" / f"splice-{hashlib.sha256(source).hexdigest()[:16]}.o"
    if target.exists():
        return target
    clang = shutil.which("clang")
    if clang is None:
        raise KernelUnavailable("clang is not installed (Debian: apt-get install clang libbpf-dev)")
    include = [f"-I/usr/include/{arch}"] if (arch := sysconfig.get_config_var("MULTIARCH")) else []
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    src = target.with_suffix(f".{os.getpid()}.c")
    src.write_bytes(source)
    try:
        out = subprocess.run([clang, "-O2", "-g", "-target", "bpf", *include, "-c", str(src), "-o", str(partial)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise KernelUnavailable(f"clang could not build {SOURCE} (libbpf-dev installed?): "
                                    f"{out.stderr.strip()[-400:]}")
        partial.replace(target)
    finally:
        src.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return target


def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise KernelUnavailable(f"libbpf is not installed (Debian: libbpf1): {exc}") from exc
    pointer, text, integer = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for function, restype, argtypes in (
        ("bpf_object__open_file", pointer, [text, pointer]),
        ("bpf_object__load", integer, [pointer]),
        ("bpf_object__close", None, [pointer]),
        ("bpf_object__find_program_by_name", pointer, [pointer, text]),
        ("bpf_object__find_map_fd_by_name", integer, [pointer, text]),
        ("bpf_program__fd", integer, [pointer]),
        ("bpf_prog_attach", integer, [integer, integer, integer, ctypes.c_uint]),
        ("bpf_map_update_elem", integer, [integer, pointer, pointer, ctypes.c_uint64]),
        ("bpf_map_lookup_elem_flags", integer, [integer, pointer, pointer, ctypes.c_uint64]),
        ("bpf_map_delete_elem", integer, [integer, pointer]),
        ("libbpf_set_print", pointer, [pointer]),
        ("bpf_object__find_map_by_name", pointer, [pointer, text]),
        ("bpf_map__value_size", ctypes.c_uint32, [pointer]),
    ):
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    lib.libbpf_set_print(None)  # its messages go to stderr; failures are reported through errno
    return lib


def _failed(what: str) -> KernelUnavailable:
    errno = ctypes.get_errno()
    return KernelUnavailable(f"{what}: {os.strerror(errno) if errno else 'failed'}"
                             + (" (loading BPF needs root or CAP_BPF + CAP_NET_ADMIN)" if errno == 1 else ""))


class SpliceProgram:
    """The loaded program and its maps: one per process, shared by its proxies."""

    def __init__(self, path: Path) -> None:
        self.lib = lib = _libbpf()
        obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            raise _failed(f"libbpf could not open {path}")
        if lib.bpf_object__load(obj) != 0:
            lib.bpf_object__close(obj)
            raise _failed("the kernel refused the splice program")
        self.obj = obj
        fds = {name: lib.bpf_object__find_map_fd_by_name(obj, name.encode())
               for name in ("socks", "links", "conns", "modes")}
        program = lib.bpf_object__find_program_by_name(obj, b"splice")
        if min(fds.values()) < 0 or not program:
            raise KernelUnavailable(f"{path} lacks the splice program or its maps")
        self.socks, self.links, self.conns, self.modes = (fds[n] for n in ("socks", "links", "conns", "modes"))
        size = lib.bpf_map__value_size(lib.bpf_object__find_map_by_name(obj, b"conns"))
        if size != ctypes.sizeof(Conn):
            raise KernelUnavailable(f"struct conn is {size} bytes in {SOURCE} but {ctypes.sizeof(Conn)} in kernel.py")
        if lib.bpf_prog_attach(lib.bpf_program__fd(program), self.socks, BPF_SK_SKB_STREAM_VERDICT, 0) != 0:
            raise _failed("attaching the splice program to its socket map")
        self.free = list(range(MAX_CONNS - 1, -1, -1))

    def _update(self, fd: int, key: object, value: object) -> None:
        if self.lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0) != 0:  # type: ignore[arg-type]
            raise _failed("updating a splice map")

    def open(self, client: object, server: object) -> tuple[int, int, int]:
        """Start forwarding between two sockets in the kernel; returns (slot, client cookie,
        server cookie). The caller has stopped reading both."""
        if not self.free:
            raise KernelUnavailable(f"all {MAX_CONNS} spliced connection slots are in use")
        slot = self.free.pop()
        ids = cookie(client), cookie(server)
        try:
            self._update(self.conns, ctypes.c_uint32(slot), Conn())
            self._update(self.modes, ctypes.c_uint32(slot), ctypes.c_uint32(MODE_KERNEL))
            for side in (FROM_CLIENT, FROM_SERVER):
                self._update(self.links, ctypes.c_uint64(ids[side]), Link(ids[1 - side], slot, side))
            for side, sock in enumerate((client, server)):
                self._update(self.socks, ctypes.c_uint64(ids[side]), ctypes.c_uint64(sock.fileno()))  # type: ignore[attr-defined]
        except KernelUnavailable:
            self.close(slot, ids)
            raise
        return slot, ids[0], ids[1]

    def to_user(self, slot: int) -> None:
        """From the next packet on, both directions go to the sockets' receive queues."""
        self._update(self.modes, ctypes.c_uint32(slot), ctypes.c_uint32(MODE_USER))

    def read(self, slot: int) -> Conn:
        """The connection's counters, read under its lock (so consistent with the mode)."""
        value = Conn()
        key = ctypes.c_uint32(slot)
        if self.lib.bpf_map_lookup_elem_flags(self.conns, ctypes.byref(key), ctypes.byref(value), BPF_F_LOCK) != 0:
            raise _failed("reading a spliced connection")
        return value

    def close(self, slot: int, ids: tuple[int, int]) -> None:
        """Forget a connection (its sockets leave the socket map when they close)."""
        for sock_id in ids:
            key = ctypes.c_uint64(sock_id)
            self.lib.bpf_map_delete_elem(self.links, ctypes.byref(key))
            self.lib.bpf_map_delete_elem(self.socks, ctypes.byref(key))
        self.free.append(slot)


_loaded: SpliceProgram | KernelUnavailable | None = None


def load(cache: Path) -> SpliceProgram:
    """The process's splice program, built and loaded on first use; raises KernelUnavailable
    (the same one again on later calls)."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = SpliceProgram(build(cache))
        except KernelUnavailable as exc:
            _loaded = exc
        except OSError as exc:
            _loaded = KernelUnavailable(f"building the splice program: {exc}")
    if isinstance(_loaded, KernelUnavailable):
        raise _loaded
    return _loaded
