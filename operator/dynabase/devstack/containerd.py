"""containerd for the devstack node (devstack/node.py): Debian's containerd 1.6 and runc.

Its own root, state and socket below the node's folder, so it never meets a system
containerd; the CRI plugin's sandbox image is the pause program beside this module,
committed FROM scratch with buildah (no registry is reachable); images come from
podman's storage through ``ctr images import``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import binaries
from .processes import DevstackError, Service
from .stack import Devstack

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
K8S_NAMESPACE = "k8s.io"  # containerd's namespace for the CRI
RUNC = "/usr/sbin/runc"  # crun refuses hybrid cgroups (shared/notes/containers.md)
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


class ContainerdError(DevstackError):
    pass


class Containerd:
    def __init__(self, stack: Devstack, root: Path) -> None:
        self.stack = stack
        self.root = root
        self.socket = root / "containerd.sock"

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.socket), "-n", K8S_NAMESPACE, *args],
                              capture_output=True, text=True, check=False, timeout=300)

    def import_archive(self, archive: Path) -> None:
        proc = self.ctr("images", "import", str(archive))
        if proc.returncode != 0:
            raise ContainerdError(f"ctr images import {archive.name}: {proc.stderr.strip()}")

    def start(self) -> Service:
        binary = shutil.which("containerd") or "containerd"
        cni = self.root / "cni"
        cni.mkdir(exist_ok=True)
        # Every pod here uses the host network; the bridge is what any other pod would get.
        (cni / "10-devstack.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "devstack",
            "plugins": [{"type": "bridge", "bridge": "dynabase-cni0", "isGateway": True, "ipMasq": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}],
        }, indent=2))
        config = self.root / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(f"""version = 2
root = "{self.root / 'containerd'}"
state = "{self.root / 'containerd-state'}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.root / 'containerd-opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Lowering a process's oom_score_adj needs CAP_SYS_RESOURCE, which this kind of VM withholds.
  restrict_oom_score_adj = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
  [{cri}.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.runc.options]
      BinaryName = "{RUNC}"
""")
        pid, log = self.stack._spawn("containerd", [binary, "--config", str(config)], cwd=self.root)
        self.stack._wait("containerd", pid, log, lambda: self.ctr("version").returncode == 0)
        self.import_archive(self._pause_archive())
        return Service("containerd", pid, 0, log, {"socket": str(self.socket)})

    def _pause_archive(self) -> Path:
        """The sandbox image: the pause binary committed FROM scratch."""
        binary = binaries.ensure(binaries.PAUSE)
        archive = self.root / "images" / "pause.tar"
        archive.parent.mkdir(exist_ok=True)
        container = _check(["buildah", "from", "scratch"], "buildah from scratch").strip()
        try:
            _check(["buildah", "copy", "--quiet", container, str(binary), "/pause"], "buildah copy")
            _check(["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", container],
                   "buildah config")
            _check(["buildah", "commit", "--quiet", container, f"docker-archive:{archive}:{PAUSE_IMAGE}"],
                   "buildah commit")
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
        return archive

    def stop_tasks(self) -> None:
        """Pods' processes are the shims' children, not containerd's: stop them first."""
        remaining = self.ctr("tasks", "ls", "-q").stdout.split()
        for task in remaining:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task)
        deadline = time.monotonic() + 30
        while remaining and time.monotonic() < deadline:
            for task in remaining:
                self.ctr("tasks", "delete", task)  # refused while the task still runs
            remaining = self.ctr("tasks", "ls", "-q").stdout.split()
            if remaining:
                time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", container)

    def kill_shims(self) -> None:
        """Shims serve this node's containerd only (they carry its socket on their command line)."""
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
                if b"containerd-shim" in argv[0] and str(self.socket).encode() in argv:
                    os.kill(int(proc_dir.name), 9)

    def load_image(self, image: str) -> None:
        """An image from podman's local storage into containerd's, streamed (no archive on disk)."""
        started = time.monotonic()
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", image], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert save.stdout is not None
        imported = subprocess.run(["ctr", "--address", str(self.socket), "-n", K8S_NAMESPACE, "images", "import", "-"],
                                  stdin=save.stdout, capture_output=True, text=True, check=False, timeout=600)
        save.stdout.close()
        _, save_errors = save.communicate(timeout=60)
        if save.returncode != 0:
            raise ContainerdError(f"podman save {image} failed: {save_errors.decode(errors='replace').strip()}")
        if imported.returncode != 0:
            raise ContainerdError(f"ctr images import {image}: {imported.stderr.strip()}")
        _progress(f"image {image} loaded into containerd ({time.monotonic() - started:.1f}s)")


def _check(args: list[str], what: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise ContainerdError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _progress(message: str) -> None:
    print(f"[devstack node] {message}", file=sys.stderr, flush=True)
