"""schemathesis against the OpenAPI document of `magasin run topology.yaml` (embedded default):
no 5xx, and every response matches the schema. Seeded, so a failure replays."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import magasin_running

ROOT = Path(__file__).resolve().parents[2]
SEED = "20261124"

pytestmark = pytest.mark.integration


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    assert schemathesis.exists() or shutil.which("schemathesis"), "schemathesis is not installed"
    with magasin_running({"MAGASIN_LOG_LEVEL": "WARNING"}, tmp_path / "magasin.log") as url:
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
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "generated" in result.stdout
    assert " 0 passed" not in result.stdout
