"""HAProxy as the anchor for bench.proxy: Debian's 2.6 in TCP mode, one thread, a relay
with no logic in the proxy's position in front of PgBouncer."""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

HAPROXY_CONFIG = """global
  maxconn {maxconn}
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen pgbouncer
  bind 127.0.0.1:{port}
  server pgbouncer 127.0.0.1:{upstream}
"""


def start_haproxy(port: int, upstream: int, workdir: Path) -> subprocess.Popen[bytes]:
    """HAProxy as a plain TCP relay to PgBouncer. Its maxconn must stay under the file limit,
    or it refuses to start."""
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        raise SystemExit("haproxy is not installed (scripts/setup installs it)")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(maxconn=min(2000, (soft - 100) // 2), port=port, upstream=upstream))
    proc = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"haproxy did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        time.sleep(0.05)
    raise SystemExit("haproxy did not start")
