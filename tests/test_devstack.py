"""`imgdedup dev up/status/down`: real processes, idempotent, nothing left behind."""

import os
import subprocess
import sys
from types import SimpleNamespace

import redis
from confluent_kafka.admin import AdminClient

from imgdedup import devstack


def cli(state_dir, *args, env_extra=None):
    env = {**os.environ, "IMGDEDUP_DEV_KAFKA_PORT": str(env_extra["kafka"]),
           "IMGDEDUP_DEV_REDIS_PORT": str(env_extra["redis"]), "IMGDEDUP_PARTITIONS": "2"}
    return subprocess.run([sys.executable, "-m", "imgdedup", "dev", *args, "--state-dir", str(state_dir)],
                          env=env, capture_output=True, text=True, check=False, timeout=120)


def test_up_status_down(tmp_path):
    ports = {"kafka": devstack.free_port(), "redis": devstack.free_port()}
    up = cli(tmp_path, "up", env_extra=ports)
    assert up.returncode == 0, up.stderr
    lines = dict(line.split("=", 1) for line in up.stdout.split())
    assert lines["IMGDEDUP_KAFKA_BOOTSTRAP"] == f"127.0.0.1:{ports['kafka']}"
    info = devstack.status(tmp_path)
    pids = list(info["pids"].values())
    try:
        assert redis.Redis.from_url(lines["IMGDEDUP_REDIS_URL"]).ping()
        topics = AdminClient({"bootstrap.servers": lines["IMGDEDUP_KAFKA_BOOTSTRAP"]}).list_topics(timeout=10).topics
        assert {"images", "image-verdicts", "images-dlq"} <= set(topics)
        assert len(topics["images"].partitions) == 2

        again = cli(tmp_path, "up", env_extra=ports)  # idempotent: reports, starts nothing new
        assert again.returncode == 0 and "already running" in again.stderr
        assert list(devstack.status(tmp_path)["pids"].values()) == pids

        status = cli(tmp_path, "status", env_extra=ports)
        assert status.returncode == 0 and "kafka: running" in status.stdout and "redis: running" in status.stdout
    finally:
        down = cli(tmp_path, "down", env_extra=ports)
    assert down.returncode == 0 and "kafka" in down.stdout
    assert not any(devstack._alive(pid) for pid in pids)
    assert cli(tmp_path, "status", env_extra=ports).returncode == 1


def test_redis_index_survives_a_restart(tmp_path):
    ports = {"kafka": devstack.free_port(), "redis": devstack.free_port()}
    assert cli(tmp_path, "up", env_extra=ports).returncode == 0
    try:
        redis.Redis(port=ports["redis"]).set("kept", "1")
    finally:
        cli(tmp_path, "down", env_extra=ports)
    assert cli(tmp_path, "up", env_extra=ports).returncode == 0
    try:
        assert redis.Redis(port=ports["redis"]).get("kept") == b"1"  # append-only file in the state dir
    finally:
        cli(tmp_path, "down", env_extra=ports)


def test_taken_port_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"kafka": busy.getsockname()[1], "redis": devstack.free_port()}
        out = cli(tmp_path, "up", env_extra=ports)
    assert out.returncode != 0 and "is taken" in out.stderr
    assert devstack.status(tmp_path) is None


def test_sigterm_stops_the_servers_a_command_started(tmp_path):
    """What `imgdedup bench` and `eval` do: their servers are stopped in ``finally``, which SIGTERM
    must reach."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from imgdedup import devstack\n"
        "devstack.stop_servers_on_sigterm()\n"
        "server = devstack.start_redis(devstack.free_port(), Path(sys.argv[1]), persist=False)\n"
        "try:\n"
        "    print(server.process.pid, flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        "    server.stop()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    redis_pid = int(proc.stdout.readline())
    assert devstack._alive(redis_pid)
    proc.terminate()
    assert proc.wait(30) == 128 + 15
    assert not devstack._alive(redis_pid)


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may give a just-released port out again; two servers told the same port race for it."""
    kernel_picks = iter([50001, 50001, 50002, 50001, 50003])

    class Socket:
        def __init__(self, *args):
            self.port = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(kernel_picks)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(devstack, "_handed_out", set())
    monkeypatch.setattr(devstack, "socket", SimpleNamespace(socket=Socket, AF_INET=2, SOCK_STREAM=1))
    assert [devstack.free_port() for _ in range(3)] == [50001, 50002, 50003]
