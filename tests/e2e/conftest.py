"""End-to-end fixtures: a real llama.cpp server (tiny generated model) and nim-sim (for the APIs
llama.cpp does not serve) behind a real nimgate binary, driven by the official OpenAI Python SDK. Ports are ephemeral, everything is loopback,
and every process is stopped at the end of the session (nimgate must exit 0 on SIGTERM)."""

import hashlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent

MODEL = "tiny-random-llama"  # the llama.cpp server's --alias
ALIAS = "e2e/tiny"  # a nimgate route rewritten to MODEL upstream
KEY_ALL = "sk-e2e-all"
KEY_ALIAS_ONLY = "sk-e2e-alias-only"
KEY_METERED = "sk-e2e-metered"  # tokens_per_minute: 600
KEY_ONE_PER_MINUTE = "sk-e2e-one-per-minute"  # requests_per_minute: 1
SIM_MODEL = "sim/llama"  # served by nim-sim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: pathlib.Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {seconds}s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def llama_server(workdir):
    model = workdir / "tiny.gguf"
    subprocess.run([sys.executable, HERE / "real_backend" / "make_tiny_gguf.py", model], check=True)
    port = free_port()
    log = workdir / "llama-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, HERE / "real_backend" / "serve.py", "--model", model, "--host", "127.0.0.1",
             "--port", str(port), "--threads", "1", "--parallel", "2", "--alias", MODEL],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, log, 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def nim_sim(workdir):
    binary = os.environ.get("NIM_SIM_BIN") or str(ROOT / "target" / "debug" / "nim-sim")
    port = free_port()
    log = workdir / "nim-sim.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--model", SIM_MODEL, "--tokens", "8"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/health/ready", proc, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def gateway(llama_server, nim_sim, workdir):
    binary = os.environ.get("NIMGATE_BIN") or str(ROOT / "target" / "debug" / "nimgate")
    port = free_port()
    digest = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
    config = workdir / "nimgate.yaml"
    config.write_text(f"""
server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{free_port()}
  drain_timeout: 5s
backends:
  - name: llama-cpp
    url: {llama_server}
    timeouts: {{ first_byte: 60s }}
  - name: nim-sim
    url: {nim_sim}
routes:
  - model: {SIM_MODEL}
    backends: [nim-sim]
  - model: {MODEL}
    backends: [llama-cpp]
  - model: {ALIAS}
    backends: [llama-cpp]
    upstream_model: {MODEL}
keys:
  - name: e2e-all
    key_sha256: {digest(KEY_ALL)}
    models: ["*"]
  - name: e2e-alias-only
    key_sha256: {digest(KEY_ALIAS_ONLY)}
    models: ["e2e/*"]
  - name: e2e-metered
    key_sha256: {digest(KEY_METERED)}
    models: ["*"]
    limits: {{ tokens_per_minute: 600 }}
  - name: e2e-one-per-minute
    key_sha256: {digest(KEY_ONE_PER_MINUTE)}
    models: ["*"]
    limits: {{ requests_per_minute: 1 }}
""")
    log = workdir / "nimgate.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([binary, "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "NIMGATE_LOG": "info"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, log, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    assert code == 0, f"nimgate exited with {code} on SIGTERM:\n{log.read_text()}"


def sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return sdk(gateway, KEY_ALL)
