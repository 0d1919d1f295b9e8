"""No Docker engine runs here: check the compose file's shape and that what it references exists."""
import re
from pathlib import Path

import yaml

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
