"""llama.cpp's own server, built from the llama.cpp that the installed llama-cpp-python vendors.

The peer baseline must be the same engine: the binary is built (once, into
bench/out/llama.cpp) from the sdist of the llama-cpp-python version this
environment runs, or taken from ``INFERQ_LLAMA_SERVER``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from bench.harness import OUT
from inferq.embedded_redis import free_port


def binary() -> Path:
    if os.environ.get("INFERQ_LLAMA_SERVER"):
        return Path(os.environ["INFERQ_LLAMA_SERVER"])
    import llama_cpp

    version = llama_cpp.__version__
    built = OUT / f"llama.cpp-{version}" / "build" / "bin" / "llama-server"
    if built.exists():
        return built
    src = OUT / f"llama.cpp-{version}"
    if not (src / "CMakeLists.txt").exists():
        print(f"building llama-server from llama-cpp-python {version}'s sdist (several minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(OUT)], check=True)
        with tarfile.open(OUT / f"llama_cpp_python-{version}.tar.gz") as tar:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    "-DGGML_NATIVE=ON"], cwd=src, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", f"-j{os.cpu_count() or 2}"],
                   cwd=src, check=True, stdout=subprocess.DEVNULL)
    return built


@contextmanager
def llama_server(path, threads: int, slots: int, n_ctx_per_slot: int = 2048):
    """``llama-server -np slots -kvu`` on a free loopback port; yields its base URL."""
    port = free_port()
    log = (OUT / "llama-server.log").open("wb")
    proc = subprocess.Popen([str(binary()), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
                             "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-kvu",
                             "-c", str(n_ctx_per_slot * slots)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {log.name}")
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("llama-server did not come up")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
