"""The first command as a new user meets it: a fresh clone, the system's python3 and the pip
its venv module bundles, `make install`, then `smartcover --help`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIP_LOCK = REPO / "requirements-pip.lock"
# Where Debian and Ubuntu keep their own interpreter, whatever PATH puts first.
DISTRIBUTION_PYTHON = Path("/usr/bin/python3")
INSTALL_TIMEOUT_S = 900


def _interpreters() -> list[str]:
    """The distribution's python3 and the one PATH finds, each once, if they are 3.11+."""
    found: dict[str, str] = {}
    for candidate in (str(DISTRIBUTION_PYTHON), shutil.which("python3") or sys.executable):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [
                candidate,
                "-c",
                "import sys; print(sys.version_info >= (3, 11), sys.base_prefix, sys.version)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        recent, base_prefix, _ = probe.stdout.split(" ", 2)
        if recent == "True":
            found.setdefault(base_prefix, candidate)
    return sorted(found.values())


def _pinned_pip_version() -> str:
    for line in PIP_LOCK.read_text().splitlines():
        if line.startswith("pip=="):
            return line.removeprefix("pip==").split()[0]
    raise AssertionError("requirements-pip.lock pins no pip")


def _fresh_clone(target: Path) -> None:
    """The work tree's files that git would commit: a clone of this change, edits included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the work tree but not yet in the index
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def _clean_environment() -> dict[str, str]:
    """The caller's environment without any sign of the project's own venv."""
    environment = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    venv_bin = str(REPO / ".venv" / "bin")
    environment["PATH"] = os.pathsep.join(
        part for part in environment.get("PATH", "").split(os.pathsep) if part != venv_bin
    )
    return environment


@pytest.mark.slow
@pytest.mark.parametrize("python", _interpreters())
def test_make_install_on_a_fresh_clone_with_the_bundled_pip(python: str, tmp_path: Path) -> None:
    clone = tmp_path / "smartcover"
    _fresh_clone(clone)
    environment = _clean_environment()

    installed = subprocess.run(
        ["make", "install", f"PYTHON={python}"],
        cwd=clone,
        env=environment,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    venv_bin = clone / ".venv" / "bin"
    pip_version = subprocess.run(
        [str(venv_bin / "python"), "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert pip_version.split()[1] == _pinned_pip_version()
    helped = subprocess.run(
        [str(venv_bin / "smartcover"), "--help"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert helped.returncode == 0, helped.stderr
    for subcommand in ("serve", "demo", "sim"):
        assert subcommand in helped.stdout
    checked = subprocess.run(
        [str(venv_bin / "python"), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout
