"""schemathesis against the OpenAPI document of `magasin run topology.yaml` (embedded default):
no 5xx, and every response matches the schema. Seeded, so a failure replays."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.process import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
SEED = "20261124"

pytestmark = pytest.mark.integration


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    assert schemathesis.exists() or shutil.which("schemathesis"), "schemathesis is not installed"
    port = free_port()
    log = tmp_path / "magasin.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "run", "topology.yaml"],
            cwd=ROOT,
            env=clean_env(MAGASIN_HTTP_PORT=str(port), MAGASIN_LOG_LEVEL="WARNING"),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        result = subprocess.run(
            [
                str(schemathesis),
                "run",
                f"{url}/schema/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance,status_code_conformance",
                "--max-examples",
                "15",
                "--seed",
                SEED,
                "--no-color",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # it keeps its reports in ./.schemathesis
            timeout=240,
            check=False,
        )
    finally:
        process.kill()
        process.wait(timeout=10)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "generated" in result.stdout
    assert " 0 passed" not in result.stdout
