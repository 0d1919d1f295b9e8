"""No Docker engine runs here: check the compose file's shape and that what it references exists."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_healthchecks():
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "dashboard"}
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in services["redis"]["command"]
    assert any("/health" in part for part in services["api"]["healthcheck"]["test"])
    assert "gevent" in services["api"]["command"] and "api.wsgi:app" in services["api"]["command"]
    assert "rq-dashboard" in services["dashboard"]["command"] and "--json" in services["dashboard"]["command"]


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
