"""A real Milvus standalone server from the ``milvus`` pip package, for the test suite and the benchmarks.

What it follows: the ``milvus`` package 2.3.5 (milvus-io's "Milvus Server" wheel: the standalone binary that a
cluster's nodes also run, with etcd embedded and local storage; ``MilvusServer.start`` writes ``milvus.yaml``
from its template, then runs ``bin/milvus run standalone`` with ``DEPLOY_MODE=STANDALONE`` and ``METRICS_PORT``,
and waits for ``/healthz``), and Milvus's "Configure Milvus" and "Authenticate User Access" pages. It does what
``MilvusServer.start`` does, with five changes a test suite needs:

* every port is chosen free, all at once so no two coincide: the proxy's (the one clients use) and its internal
  port, the coordinators' and nodes' gRPC ports, embedded etcd's client and peer ports (the package leaves those
  at 2379/2380: two servers, or a server beside an etcd, collide), and the metrics/health web port;
* every component advertises 127.0.0.1 to the others (by default each takes the machine's first non-loopback
  address), so all of the server's traffic stays on loopback;
* authorization is on (user ``root``, password ``Milvus``, Milvus's default), so bad credentials are refused;
* the server process gets ``PR_SET_PDEATHSIG`` (SIGKILL when the process that started it dies), so a killed
  test run leaves no server behind; ``stop()`` sends SIGTERM, then SIGKILL after ``grace`` seconds;
* a start that fails raises :class:`ServerStartError` with the tail of the server's logs.

The binary is unpacked once into ``$MEMKIT_CACHE/milvus-server-<version>`` (under a file lock), not into each
base directory. ``python -m memkit.testing.milvus_server DIR`` runs one until SIGTERM/SIGINT and prints its URI.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from memkit.resources import cache_dir

__all__ = ["MilvusServerProcess", "ServerStartError", "free_ports", "ROOT_TOKEN"]

ROOT_TOKEN = "root:Milvus"  # Milvus's default root user and password, valid once authorization is on
PORT_KEYS = ("proxy_port", "proxy_internal_port", "root_coord_port", "query_coord_port", "query_node_port",
             "index_coord_port", "index_node_port", "data_coord_port", "data_node_port", "etcd_port")
# Embedded etcd reads its own listen URLs from etcd.config.path, a key the package's template does not have.
ETCD_KEY = "    embed: true"
ETCD_YAML = """name: memkit-test
data-dir: {data}
listen-client-urls: http://127.0.0.1:{client}
advertise-client-urls: http://127.0.0.1:{client}
listen-peer-urls: http://127.0.0.1:{peer}
initial-advertise-peer-urls: http://127.0.0.1:{peer}
initial-cluster: memkit-test=http://127.0.0.1:{peer}
"""
IP_KEY = "  ip:"  # each component's advertised address; empty = the machine's first non-loopback address
# Seconds an etcd session lease lives (Milvus's default 30): a restarted server serves strong reads only once the
# previous run's sessions have expired, so restarts take this long at least.
SESSION_TTL = 10
# Query coordinator polling (ms; defaults 1000 and 500): loading a new collection takes ~3 s with the defaults,
# well under 1 s with these. Only how often the coordinator looks, not what a client sees.
FAST_CHECKS = {"queryCoord.checkInterval": 200, "queryCoord.distPullInterval": 100}
PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """The Milvus server did not become healthy; the message holds the tail of its logs."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _binary_dir() -> Path:
    """The unpacked server binary and its libraries (once per package version, under a file lock)."""
    import milvus

    root = cache_dir() / f"milvus-server-{milvus.__version__}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(str(root))  # type: ignore[attr-defined]  # md5-checked: unpacks only what changed
    return root / "bin"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class MilvusServerProcess:
    """One Milvus standalone server in ``base_dir`` (data, logs and config live there; reuse it to restart).

    ``start()`` waits for it to be healthy (or raises :class:`ServerStartError`), ``stop()`` ends it, ``uri``
    and ``token`` are what a client passes. Ports are chosen at the first start and kept for restarts.
    """

    def __init__(self, *, base_dir: str | os.PathLike[str], authorization: bool = True,
                 start_timeout: float = 180.0) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.authorization = authorization
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return ROOT_TOKEN if self.authorization else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def _configure(self) -> None:
        from milvus import MilvusServerConfig

        if not self.ports:
            chosen = free_ports(len(PORT_KEYS) + 2)
            self.ports = dict(zip((*PORT_KEYS, "etcd_peer_port", "web_port"), chosen))
        etc = self.base_dir / "configs"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "embed-etcd.yaml").write_text(ETCD_YAML.format(
            data=self.base_dir / "data" / "etcd.data", client=self.ports["etcd_port"], peer=self.ports["etcd_peer_port"]))
        template = Path(sys.modules["milvus"].__file__ or "").parent / "data" / "config.yaml.template"
        text = template.read_text(encoding="utf-8")
        if text.count(ETCD_KEY) != 1 or text.count(IP_KEY) != 7:
            raise ServerStartError(f"the milvus package's config template changed ({template}); memkit cannot set "
                                   "embedded etcd's ports in it")
        text = text.replace(ETCD_KEY, f"{ETCD_KEY}\n  config:\n    path: {etc / 'embed-etcd.yaml'}")
        text = text.replace(IP_KEY, f"{IP_KEY} 127.0.0.1")  # components talk over loopback, not the first NIC
        (etc / "milvus.yaml.template").write_text(text, encoding="utf-8")
        config = MilvusServerConfig(template=str(etc / "milvus.yaml.template"), data_dir=str(self.base_dir))
        config.glog_conf_file = str(template.parent / "glog.conf")  # set only for the package's own template
        # Not config.resolve(): it test-binds each port without SO_REUSEADDR, which fails for a minute after a
        # stop (TIME_WAIT) although the server itself can bind it again.
        config.resolve_storage()
        for key in PORT_KEYS:
            config.set(key, self.ports[key])
        config.set("authorization_enabled", self.authorization)
        config.set("common.session.ttl", SESSION_TTL)
        for key, value in FAST_CHECKS.items():
            config.set(key, value)
        config.write_config()  # configs/milvus.yaml

    def start(self) -> None:
        """Start the server (its ports, data and logs as before when ``base_dir`` was used already)."""
        import milvus  # noqa: F401 - a missing package fails here, before any file is written

        if self.running:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._configure()
        except (RuntimeError, OSError) as exc:
            raise ServerStartError(f"could not configure a Milvus server in {self.base_dir}: {exc}") from exc
        binary = _binary_dir()
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.ports["web_port"]),
               "MILVUS_RUN_DIR": str(self.base_dir / "run"),
               "LD_LIBRARY_PATH": f"{binary}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        logs = self.base_dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "milvus-stdout.log", "ab") as out, open(logs / "milvus-stderr.log", "ab") as err:
            self.proc = subprocess.Popen([str(binary / "milvus"), "run", "standalone"], cwd=self.base_dir, env=env,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop(grace=5)
            raise

    def _wait_healthy(self) -> None:
        url = f"http://127.0.0.1:{self.ports['web_port']}/healthz"
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            if not self.running:
                code = self.proc.returncode if self.proc is not None else None
                raise ServerStartError(f"the Milvus server in {self.base_dir} exited with code {code} while "
                                       f"starting; the tail of its logs:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if b"OK" in resp.read():
                        return
            time.sleep(0.2)
        raise ServerStartError(f"the Milvus server in {self.base_dir} was not healthy after {self.start_timeout:.0f}s; "
                               f"the tail of its logs:\n{self.log_tail()}")

    def stop(self, *, grace: float = 30.0, kill: bool = False) -> None:
        """End the server: SIGTERM (a clean shutdown), SIGKILL after ``grace`` s; ``kill=True``: SIGKILL at once."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stdout, stderr and etcd logs."""
        out = []
        for name in ("milvus-stderr.log", "milvus-stdout.log", "etcd.log"):
            p = self.base_dir / "logs" / name
            if p.is_file():
                text = p.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
                out.append(f"--- {p} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out) or f"(no logs in {self.base_dir / 'logs'})"

    def __enter__(self) -> MilvusServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memkit.testing.milvus_server",
                                     description="Run a Milvus standalone server (the milvus package) until SIGTERM.")
    parser.add_argument("base_dir", help="data, logs and config of the server (reuse it to restart the same server)")
    parser.add_argument("--no-auth", action="store_true", help="turn authorization off (any token is accepted)")
    args = parser.parse_args(argv)
    server = MilvusServerProcess(base_dir=args.base_dir, authorization=not args.no_auth)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    try:
        server.start()
    except ServerStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"milvus server ready: uri {server.uri} token {server.token or '(none)'} pid {server.proc.pid if server.proc else '?'}",
          flush=True)
    try:
        while not stop and server.running:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
