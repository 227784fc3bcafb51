"""The Dagster tooling loads the code location: `dagster definitions validate` and the web UI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

MODULE = "pipelines.definitions"
STARTUP_TIMEOUT_S = 120.0


def _dagster_env(tmp_path: Path) -> dict[str, str]:
    """An instance folder of its own, so nothing is written into the repository or ~/."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_dagster_definitions_validate_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", MODULE],
        cwd=tmp_path,
        env=_dagster_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_the_web_ui_lists_the_assets_and_checks(tmp_path: Path) -> None:
    port = _free_port()
    log = (tmp_path / "webserver.log").open("w")
    command = [sys.executable, "-m", "dagster_webserver", "-m", MODULE]
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=_dagster_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its code server joins the group, so cleanup reaches both
    )
    query = (
        "{ assetNodes { assetKey { path } "
        "assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }"
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        nodes: list[dict] = []
        while time.monotonic() < deadline and not nodes:
            if server.poll() is not None:
                pytest.fail(f"the web server exited: {(tmp_path / 'webserver.log').read_text()}")
            try:
                nodes = _graphql(port, query).get("data", {}).get("assetNodes") or []
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert nodes, f"no answer within {STARTUP_TIMEOUT_S:.0f} s"
        checks = {
            "/".join(n["assetKey"]["path"]): {
                c["name"]: c["blocking"] for c in n["assetChecksOrError"]["checks"]
            }
            for n in nodes
        }
        assert set(checks) == {
            "dataset",
            "noise_probe",
            "audit_model",
            "example_scores",
            "flags",
            "corrected_labels",
            "retrained_model",
            "audit_reports",
            "mislabel_export",
            "distributed_model",
        }
        assert checks["dataset"] == {"dataset_is_valid": True}
        assert checks["flags"] == {"flag_rate_is_plausible": False}
        assert checks["audit_reports"] == {"retrain_not_worse": True}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
