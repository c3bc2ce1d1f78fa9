"""A single-node Kubernetes cluster from real parts, beside the devstack's kube-apiserver.

containerd and runc from Debian run the pods; kubelet, kube-controller-manager and
kube-scheduler are built from k8s.io/kubernetes like the apiserver (binaries.py), each
with its own client certificate (the kubelet in system:nodes, authorized by the Node
authorizer). Deployments, ReplicaSets, ServiceAccount tokens and the kube-root-ca.crt
ConfigMap are the real controllers' work.

Pods run on the host network: the devstack's servers listen on loopback, and there is
no kube-proxy, so an in-cluster client is pointed at the apiserver's own address
(``KUBERNETES_SERVICE_HOST``/``PORT``), as clusters without kube-proxy do. containerd
still gets a CNI bridge configuration, because a node without one is never Ready.

The kubelet changes kernel tunables (vm.overcommit_memory, kernel.panic, …) and makes
cgroups and mounts; ``down`` stops every pod's task before containerd, then puts the
tunables back and removes the mounts and empty cgroups it created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from . import binaries, pki
from .containerd import CNI_BIN_DIR, RUNC, Containerd
from .processes import DevstackError, Service
from .stack import Devstack, free_port

NODE_NAME = "devstack-node"
# The kubelet sets these to its own values unless protectKernelDefaults (then it refuses to start).
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
COMPONENTS = ("containerd", "kube-controller-manager", "kube-scheduler", "kubelet")


class NodeError(DevstackError):
    pass


def unavailable() -> str | None:
    """Why a node cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the kubelet and containerd need root (mounts, cgroups)"
    for command, package in (("containerd", "containerd"), ("ctr", "containerd"), ("buildah", "buildah"),
                             ("podman", "podman")):
        if shutil.which(command) is None:
            return f"{command} not found: apt-get install {package} (./scripts/setup does)"
    if not Path(RUNC).exists():
        return f"{RUNC} not found: apt-get install runc"
    if not (Path(CNI_BIN_DIR) / "bridge").exists():
        return f"{CNI_BIN_DIR}/bridge not found: apt-get install containernetworking-plugins"
    for binary in (*binaries.NODE_BINARIES, binaries.PAUSE):
        try:
            binaries.ensure(binary, build=False)
        except binaries.BinaryUnavailable as exc:
            return str(exc)
    return None


def node_address() -> str:
    """The address the kubelet reports (it refuses loopback): the default route's interface's."""
    routes = json.loads(_output(["ip", "-j", "-4", "route", "show", "default"]) or "[]")
    devices = [r["dev"] for r in routes if "dev" in r]
    addresses = json.loads(_output(["ip", "-j", "-4", "addr", "show"]) or "[]")
    for interface in sorted(addresses, key=lambda a: a.get("ifname") not in devices):
        for info in interface.get("addr_info", []):
            if info.get("family") == "inet" and not info["local"].startswith("127."):
                return str(info["local"])
    raise NodeError("no non-loopback IPv4 address for the kubelet's node address")


def _output(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


class Node:
    def __init__(self, stack: Devstack) -> None:
        api = stack.state.services.get("kube-apiserver")
        if api is None or "pki" not in api.extra:
            raise NodeError("a node needs the devstack's kube-apiserver (devstack up --only kube)")
        self.stack = stack
        self.root = stack.root / "node"
        self.pki = pki.at(Path(api.extra["pki"]))
        self.server: str = api.extra["server"]
        self.apiserver_port = api.port
        self.kubectl_path: str = api.extra["kubectl"]
        self.admin_kubeconfig: str = api.extra["kubeconfig"]
        self.runtime = Containerd(stack, self.root)
        self.state_file = self.root / "state.json"
        self.services: dict[str, Service] = {}
        self.tunables: dict[str, str] = {}
        self.cgroups_before: set[Path] = set()
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            self.services = {k: Service(**v) for k, v in saved["services"].items()}
            self.tunables = saved["tunables"]
            self.cgroups_before = {Path(p) for p in saved["cgroups_before"]}

    # -- public ---------------------------------------------------------------

    def up(self) -> None:
        reason = unavailable()
        if reason:
            raise NodeError(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.tunables:
            self.tunables = {name: Path("/proc/sys", name).read_text().strip() for name in KERNEL_TUNABLES}
            self.cgroups_before = set(_kubepods_cgroups())
            self._save()
        starters = {"containerd": self.runtime.start,
                    "kube-controller-manager": self._start_controller_manager,
                    "kube-scheduler": self._start_scheduler, "kubelet": self._start_kubelet}
        try:
            for name in COMPONENTS:
                if name in self.services and self.stack._alive(self.services[name].pid):
                    continue
                started = time.monotonic()
                self.services[name] = starters[name]()
                self._save()
                _progress(f"{name}: ready ({time.monotonic() - started:.1f}s)")
        except BaseException:
            self.down()
            raise

    def load_image(self, image: str) -> None:
        """An image from podman's local storage into the node's containerd (imagePullPolicy: Never)."""
        self.runtime.load_image(image)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.kubectl_path, *args], capture_output=True, text=True, input=input,
                              env={**os.environ, "KUBECONFIG": self.admin_kubeconfig}, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def down(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kubelet"):
            service = self.services.pop(name, None)
            if service is not None:
                self.stack._stop(service)
                _progress(f"{name}: stopped")
        containerd = self.services.pop("containerd", None)
        if containerd is not None:
            if self.stack._alive(containerd.pid):
                self.runtime.stop_tasks()
            self.stack._stop(containerd)
            _progress("containerd: stopped")
        self.runtime.kill_shims()
        self._unmount_all()
        self._remove_new_cgroups()
        self._remove_log_links()
        for name, value in self.tunables.items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", name).write_text(value + "\n")
        self.tunables = {}
        if self.root.exists():
            self._save()

    # -- control-plane components ---------------------------------------------

    def _component_kubeconfig(self, name: str, user: str, group: str | None = None) -> Path:
        cert = pki.client_certificate(self.pki, name, user, group)
        path = self.root / f"{name}.kubeconfig"
        path.write_text(pki.kubeconfig(self.pki, self.server, cert))
        path.chmod(0o600)
        return path

    def _wait_healthz(self, name: str, pid: int, log: str, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the component's self-signed serving certificate

        def ready() -> bool:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2) as r:
                return bool(r.status == 200)

        self.stack._wait(name, pid, log, ready, timeout=120)

    def _start_controller_manager(self) -> Service:
        binary = str(binaries.ensure(binaries.KUBE_CONTROLLER_MANAGER, build=False))
        kubeconfig = self._component_kubeconfig("kube-controller-manager", "system:kube-controller-manager")
        port = free_port()
        pid, log = self.stack._spawn("kube-controller-manager", [
            binary, f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.root / 'kube-controller-manager'}", "--leader-elect=false",
            # Each controller with its own ServiceAccount, as kubeadm runs it.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_private}", f"--root-ca-file={self.pki.ca_cert}",
            "--v=1",
        ], cwd=self.root)
        self._wait_healthz("kube-controller-manager", pid, log, port)
        return Service("kube-controller-manager", pid, port, log)

    def _start_scheduler(self) -> Service:
        binary = str(binaries.ensure(binaries.KUBE_SCHEDULER, build=False))
        kubeconfig = self._component_kubeconfig("kube-scheduler", "system:kube-scheduler")
        port = free_port()
        pid, log = self.stack._spawn("kube-scheduler", [
            binary, f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.root / 'kube-scheduler'}", "--leader-elect=false", "--v=1",
        ], cwd=self.root)
        self._wait_healthz("kube-scheduler", pid, log, port)
        return Service("kube-scheduler", pid, port, log)

    def _start_kubelet(self) -> Service:
        binary = str(binaries.ensure(binaries.KUBELET, build=False))
        kubeconfig = self._component_kubeconfig("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        port, healthz = free_port(), free_port()
        config = self.root / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "containerRuntimeEndpoint": f"unix://{self.runtime.socket}",
            "cgroupDriver": "cgroupfs",  # PID 1 is not systemd here
            "failCgroupV1": False,  # this kind of VM mounts cgroup v1 controllers (hybrid)
            "failSwapOn": False,
            "enforceNodeAllocatable": [],
            "localStorageCapacityIsolation": False,
            "makeIPTablesUtilChains": False,  # leave the host's firewall alone
            "podLogsDir": str(self.root / "pod-logs"),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca_cert)}},
            "authorization": {"mode": "Webhook"},
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            "evictionPressureTransitionPeriod": "5s",
        }))
        pid, log = self.stack._spawn("kubelet", [
            binary, f"--config={config}", f"--kubeconfig={kubeconfig}", f"--root-dir={self.root / 'kubelet'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={node_address()}", "--v=1",
        ], cwd=self.root)

        def ready() -> bool:
            proc = self.kubectl("get", "node", NODE_NAME, "-o",
                                'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)
            return proc.stdout.strip() == "True"

        self.stack._wait("kubelet", pid, log, ready, timeout=180)
        return Service("kubelet", pid, port, log, {"healthz": healthz})

    # -- clean-up ---------------------------------------------------------------

    def _unmount_all(self) -> None:
        """The kubelet's and containerd's mounts below this node's directory, deepest first."""
        root = str(self.root)
        for _ in range(3):
            points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
            ours = sorted({p for p in points if p == root or p.startswith(root + "/")}, key=len, reverse=True)
            if not ours:
                return
            for point in ours:
                if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                    subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)

    def _remove_new_cgroups(self) -> None:
        """The pods' cgroups, after killing what is left in them (a containerd that died took no tasks down)."""
        ours = sorted(set(_kubepods_cgroups()) - self.cgroups_before, key=lambda p: len(p.parts), reverse=True)
        deadline = time.monotonic() + 10
        for path in ours:
            while time.monotonic() < deadline:
                try:
                    pids = (path / "cgroup.procs").read_text().split()
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), 9)
                time.sleep(0.05)
            with contextlib.suppress(OSError):
                path.rmdir()

    def _remove_log_links(self) -> None:
        """The kubelet links every container's log from /var/log/containers, a fixed path."""
        links = Path("/var/log/containers")
        if not links.is_dir():
            return
        for link in links.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(str(self.root)):
                    link.unlink()

    def _save(self) -> None:
        self.state_file.write_text(json.dumps({
            "services": {k: vars(v) for k, v in self.services.items()},
            "tunables": self.tunables,
            "cgroups_before": sorted(str(p) for p in self.cgroups_before),
        }, indent=2))


def _kubepods_cgroups() -> list[Path]:
    """Every cgroup directory named kubepods (and below) in every mounted hierarchy."""
    found: list[Path] = []
    base = Path("/sys/fs/cgroup")
    if not base.is_dir():
        return found
    for hierarchy in [base, *(p for p in base.iterdir() if p.is_dir())]:
        top = hierarchy / "kubepods"
        if top.is_dir():
            found.extend([top, *(p for p in top.rglob("*") if p.is_dir())])
    return found


def _progress(message: str) -> None:
    print(f"[devstack node] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dynabase.devstack.node up|down|load IMAGE --dir DIR`, beside `dynabase devstack up`."""
    from .stack import default_root

    parser = argparse.ArgumentParser(prog="python -m dynabase.devstack.node", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "load"])
    parser.add_argument("image", nargs="?", help="for load: an image in podman's storage, e.g. localhost/dynabase:dev")
    parser.add_argument("--dir", help="the devstack's directory (default /tmp/dynabase-devstack-UID)")
    args = parser.parse_args(argv)
    try:
        node = Node(Devstack(Path(args.dir) if args.dir else default_root()))
        if args.action == "up":
            node.up()
        elif args.action == "down":
            node.down()
        else:
            if not args.image:
                parser.error("load needs an IMAGE")
            node.load_image(args.image)
    except DevstackError as exc:
        print(f"devstack node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
