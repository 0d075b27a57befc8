"""Real `tokenmill serve` processes on loopback ports, started and stopped by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

import httpx
import pytest

from tokenmill.bench.serve import wait_ready

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | None, *extra: str) -> None:
        """`tokenmill serve --model MODEL` served as "tiny"; MODEL None: `extra` has a
        --config FLEET.toml (the engine options below are every instance's defaults)."""
        self.port = free_port()
        if "--usage-db" not in extra and "--no-usage" not in extra:  # keep $HOME clean
            extra = (*extra, "--usage-db", os.path.join(tempfile.mkdtemp(), "usage.sqlite"))
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "serve",
            *(("--model", model, "--served-model-name", "tiny") if model is not None else ()),
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--kv-cache-memory",
            str(8 << 20),
            "--block-size",
            "4",
            "--grace-period",
            "20",
            *extra,
        ]
        self.log = open(os.devnull, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self.url, 120, alive=lambda: self.proc.poll() is None)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = Server(str(tiny_model_dir("llama")), "--api-key", API_KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="session")
def smol():
    """The bundled SmolLM2-135M-Instruct (a real model: real JSON, real answers), with the
    hermes tool parser and auto tool choice; shared by the modules that need it. Without the
    prefix cache, a greedy request repeated alone computes the same bits (a cached prefix
    changes the shapes, and a near tie may flip), so streams can be compared with answers."""
    s = Server(
        "default",
        "--dtype", "auto", "--max-model-len", "1024", "--kv-cache-memory", str(160 << 20),
        "--block-size", "16", "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
        "--no-enable-prefix-caching",
    )  # fmt: skip
    yield s
    assert s.stop() == 0
