"""The pure bookkeeping imports no torch (ARCHITECTURE.md: direction of imports)."""

import subprocess
import sys

PURE = [
    "tokenmill.config",
    "tokenmill.sampling_params",
    "tokenmill.kv.block_pool",
    "tokenmill.kv.manager",
    "tokenmill.engine.request",
    "tokenmill.engine.scheduler",
    "tokenmill.models.arch",
    "tokenmill.cost.tco",
    "tokenmill.cost.energy",
    "tokenmill.bench.metrics",
]


def test_pure_modules_import_no_torch_or_fastapi():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + (
            "bad = [m for m in ('torch', 'fastapi', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n"
        )
    )
    subprocess.run([sys.executable, "-c", code], check=True)
