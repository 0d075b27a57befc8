"""Property-based requests generated from the server's own OpenAPI schema: never a 5xx.

Runs schemathesis' CLI against the live server (its pytest plugin does not load under pytest 9).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import API_KEY


def test_no_server_errors(server, tmp_path):
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    cmd = [
        st,
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "--request-timeout",
        "120",
        "--seed",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout and " passed" in run.stdout
