"""No Docker engine runs here: check the compose file's shape and that what it references exists."""
import re
import shutil
from pathlib import Path

import pytest
import redis
import yaml

from inferq.embedded_redis import free_port
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = re.compile(r"\$\{(?P<name>[A-Z_]+):\?(?P<message>[^}]+)\}")


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def required_vars(text: str) -> set[str]:
    """Variables compose refuses to start without (``${NAME:?message}``), each with a message."""
    found = set()
    for m in REQUIRED.finditer(text):
        assert m.group("message").strip() and "\n" not in m.group("message"), m.group(0)
        found.add(m.group("name"))
    return found


def test_services_and_healthchecks():
    services = compose()["services"]
    # No standalone rq-dashboard: the API serves it at /rq, behind its tokens.
    assert set(services) == {"redis", "api", "worker"}
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in services["redis"]["command"]
    assert any("/health" in part for part in services["api"]["healthcheck"]["test"])
    command = services["api"]["command"]
    assert "gevent" in command and "api.wsgi:app" in command
    assert command[command.index("--config") + 1] == "python:api.gunicorn_conf"


def test_the_api_is_not_published_without_tokens_nor_on_every_interface():
    api = compose()["services"]["api"]
    assert required_vars(api["environment"]["INFERQ_API_TOKENS"]) == {"INFERQ_API_TOKENS"}
    assert api["environment"]["INFERQ_API_TOKENS"].startswith("${INFERQ_API_TOKENS:?")
    # host:container, the host address defaulting to loopback.
    assert api["ports"] == ["${INFERQ_API_BIND:-127.0.0.1}:8000:8000"]


def test_redis_needs_a_password_that_every_service_uses():
    services = compose()["services"]
    redis = services["redis"]
    command = redis["command"]
    assert required_vars(command[command.index("--requirepass") + 1]) == {"REDIS_PASSWORD"}
    assert "ports" not in redis  # reachable from the compose network only
    assert required_vars(redis["environment"]["REDISCLI_AUTH"]) == {"REDIS_PASSWORD"}  # for the healthcheck
    for name in ("api", "worker"):
        url = services[name]["environment"]["REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("}@redis:6379/0"), name
        assert required_vars(url) == {"REDIS_PASSWORD"}
        # The URL holds the password: never on a command line, where `ps` shows it.
        assert not any("redis://" in str(part) for part in services[name]["command"]), name


def test_worker_reserves_a_gpu_and_can_scale():
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # --scale worker=N needs no fixed container name and no published port.
    assert "container_name" not in worker and "ports" not in worker
    assert all(v.endswith(":ro") for v in worker["volumes"])
    assert worker["command"][0] == "--model"


def test_worker_command_parses_with_the_real_cli_and_batches():
    """The image's entrypoint is `inferq worker`: its command must be options that CLI accepts, and it
    decodes INFERQ_PARALLEL jobs together (default 8 on a GPU)."""
    from inferq.cli import worker

    filled = [re.sub(r"\$\{[A-Z_]+:-(?P<default>[^}]*)\}", r"\g<default>", part)
              for part in compose()["services"]["worker"]["command"]]
    ctx = worker.make_context("worker", filled)
    assert ctx.params["parallel"] == 8 and ctx.params["device"] == "cuda:0"
    assert "${INFERQ_PARALLEL:-8}" in compose()["services"]["worker"]["command"]


def test_referenced_files_exist_and_images_install_the_package():
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), name
            text = dockerfile.read_text()
            for line in text.splitlines():
                if line.startswith("COPY "):
                    for src in line.split()[1:-1]:
                        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"
            assert "pip" in text and "install" in text


def test_every_gunicorn_launch_uses_the_shared_config():
    """worker_connections and the open-files limit live in api/gunicorn_conf.py: a launch without it
    would leave a flood of streams able to starve /health."""
    launches = 0
    for path in ["Dockerfile", "docker-compose.yml", "inferq/cli.py", "inferq/stack.py", "bench/harness.py",
                 *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py"))]:
        for line in (ROOT / path).read_text().splitlines():
            if re.search(r"""["']-m["'],\s*["']gunicorn["']|\[\s*["']gunicorn["']""", line):
                launches += 1
                assert "api.gunicorn_conf" in line, f"{path}: {line.strip()}"
    assert launches >= 6  # Dockerfile, compose, cli, stack, bench and tests/conftest.py's GUNICORN


# --- docker-compose.sentinel.yml: Redis with a replica and sentinels, on top of the file above ---------------

def sentinel_override():
    return yaml.safe_load((ROOT / "docker-compose.sentinel.yml").read_text())


def test_the_sentinel_variant_adds_a_replica_and_sentinels_and_points_every_client_at_them():
    from queue_schema.lifecycle.connection import parse_sentinel

    services = sentinel_override()["services"]
    assert set(services) == {"redis", "redis-replica", "sentinel", "api", "worker"}
    assert set(services) - {"redis-replica", "sentinel"} <= set(compose()["services"])  # an override
    for name in ("redis", "redis-replica"):
        command = services[name]["command"]
        assert "--appendonly" in command, name
        # Same password on every data node, and each uses it for its master: any one may be promoted.
        for flag in ("--requirepass", "--masterauth"):
            assert required_vars(command[command.index(flag) + 1]) == {"REDIS_PASSWORD"}, (name, flag)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    for name in ("redis-replica", "sentinel"):
        assert "ports" not in services[name], name  # reachable from the compose network only
        assert "redis-cli" in services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        url = services[name]["environment"]["REDIS_URL"]
        assert required_vars(url) == {"REDIS_PASSWORD", "SENTINEL_PASSWORD"}, name
        assert services[name]["depends_on"]["sentinel"]["condition"] == "service_healthy", name
        # What inferq (and rq-dashboard) will read once compose has filled in the passwords.
        target = parse_sentinel(REQUIRED.sub("pw", url))
        assert target.hosts == [("sentinel", 26379)] and target.service == "inferq", name
        assert target.client_options["password"] == "pw" and target.sentinel_options["password"] == "pw"


def test_the_sentinel_config_is_written_at_start_with_its_passwords_off_the_command_line(tmp_path):
    import os
    import subprocess

    sentinel = sentinel_override()["services"]["sentinel"]
    assert sentinel["entrypoint"] == ["sh", "-c"]
    script = sentinel["command"][0].replace("$$", "$")  # compose's escape for a variable the shell expands
    assert "${" not in sentinel["command"][0]  # a value compose filled in would be on the command line
    head, sep, tail = script.partition(" && exec ")
    assert sep and tail == "redis-server /tmp/sentinel.conf --sentinel"
    conf = tmp_path / "sentinel.conf"
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": "data-pw", "SENTINEL_PASSWORD": "sentinel-pw"}
    subprocess.run(["sh", "-c", head.replace("/tmp/sentinel.conf", str(conf))], env=env, check=True, timeout=10)
    lines = conf.read_text().splitlines()
    assert "requirepass sentinel-pw" in lines and "sentinel auth-pass inferq data-pw" in lines
    assert "sentinel monitor inferq redis 6379 2" in lines and "sentinel resolve-hostnames yes" in lines
    assert conf.stat().st_mode & 0o077 == 0  # only the sentinel can read it
    assert set(sentinel["environment"]) == {"REDIS_PASSWORD", "SENTINEL_PASSWORD", "REDISCLI_AUTH"}
    # A real redis-server (Redis 7, as in the image) starts as a sentinel from it: here on a free
    # port, watching a master on loopback, since no compose network resolves "redis".
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("no redis-server on PATH")
    port = free_port()
    conf.write_text(conf.read_text().replace("port 26379", f"port {port}\nbind 127.0.0.1")
                    .replace("inferq redis 6379", f"inferq 127.0.0.1 {free_port()}"))
    proc = subprocess.Popen([redis_server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="sentinel-pw", socket_timeout=2)
        wait_until(lambda: _pings(client, proc), timeout=10, what="the sentinel")
        assert client.sentinel_master("inferq")["quorum"] == 2
    finally:
        proc.kill()
        proc.wait(10)


def _pings(client, proc) -> bool:
    assert proc.poll() is None, "the sentinel did not start from the generated config"
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_gunicorns_master_imports_nothing_gevent_would_find_unpatched():
    """gunicorn's master imports api.gunicorn_conf before its gevent workers patch the standard library;
    Flask or redis (and their ssl) imported there stay unpatched, and gevent warns on every start."""
    import subprocess
    import sys

    probe = ("import sys, api.gunicorn_conf; "
             "print(sorted(m for m in ('flask', 'redis', 'ssl', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
