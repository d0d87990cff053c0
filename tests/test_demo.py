"""`smartcover demo`: starts on embedded parts, its strike becomes a case, Ctrl-C stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from smartcover.seed import LOW_LYING_ROAD, plan_pilot
from tests.servers import free_port

STRUCK = next(c for c in plan_pilot(300) if c.road != LOW_LYING_ROAD)  # the storyline's


def wait_for(condition: object, timeout_s: float) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s"
        time.sleep(0.25)


def test_demo_runs_its_storyline_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out.txt"
    env = {**os.environ, "COLUMNS": "200"}
    with open(out, "wb") as sink:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smartcover",
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--port",
                str(port),
                "--pace",
                "0.1",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        key: list[str] = []

        def announced() -> bool:
            found = re.search(r"admin API key (\S+)", out.read_text(errors="replace"))
            if found:
                key.append(found.group(1))
            return bool(found)

        wait_for(announced, 60)
        headers = {"Authorization": f"Bearer {key[0]}"}
        base = f"http://127.0.0.1:{port}"

        def strike_case() -> bool:
            try:
                answer = httpx.get(
                    f"{base}/api/v1/cases",
                    headers=headers,
                    params={"cover_id": STRUCK.cover_id},
                    timeout=5,
                )
            except httpx.HTTPError:
                return False
            items = answer.json().get("items", []) if answer.status_code == 200 else []
            return any(
                c["cover_id"] == STRUCK.cover_id
                and c["severity"] == "critical"
                and c["unit_code"] == STRUCK.owner_unit
                for c in items
            )

        wait_for(strike_case, 60)
        stopped_at = time.monotonic()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(20) == 0
        assert time.monotonic() - stopped_at < 10
        assert "demo stopped" in out.read_text(errors="replace")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
