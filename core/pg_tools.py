"""PostgreSQL's client programs (pg_dump, pg_restore): found, version-checked, run safely."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

logger = logging.getLogger(__name__)

# Debian and Ubuntu install each major version's programs here, besides PATH.
PG_LIB_DIR = Path("/usr/lib/postgresql")
_VERSION = re.compile(r"\(PostgreSQL\) (\d+)")
# How much of a failing program's stderr an error quotes: the reason, not a flood.
_STDERR_TAIL_CHARS = 2000


class PgToolError(Exception):
    """A client program is missing, too old for the server, or failed."""


@dataclass(frozen=True, slots=True)
class LibpqTarget:
    """Where a client program connects: a URL without the password, and the password."""

    url: str
    password: str | None

    @classmethod
    def of(cls, database_url: str) -> LibpqTarget:
        url = make_url(database_url)
        # libpq knows neither SQLAlchemy's driver suffix nor the `postgres` alias.
        # (`URL.set(password=None)` would leave the password in: None means "unchanged".)
        plain = URL.create(
            "postgresql",
            username=url.username,
            host=url.host,
            port=url.port,
            database=url.database,
            query=url.query,
        )
        return cls(plain.render_as_string(hide_password=False), url.password)


@dataclass(frozen=True, slots=True)
class PgTool:
    path: Path
    major: int


def _candidates(name: str) -> list[Path]:
    """PATH first, then the distribution's versioned directories, newest first."""
    found: list[Path] = []
    on_path = shutil.which(name)
    if on_path is not None:
        found.append(Path(on_path))

    def major_of(path: Path) -> int:
        version = path.parents[1].name
        return int(version) if version.isdigit() else 0

    found.extend(sorted(PG_LIB_DIR.glob(f"*/bin/{name}"), key=major_of, reverse=True))
    return found


async def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate()
    code = await process.wait()
    return code, out.decode(errors="replace"), err.decode(errors="replace")


async def _major(path: Path) -> int | None:
    try:
        code, out, _ = await _run([str(path), "--version"])
    except OSError:
        return None
    match = _VERSION.search(out)
    return int(match.group(1)) if code == 0 and match else None


async def find_tool(name: str, *, server_major: int) -> PgTool:
    """The first `name` whose major version is at least the server's.

    An older pg_dump refuses a newer server, and an older pg_restore may not read what a
    newer pg_dump wrote: both are errors here, with what to install instead.
    """
    seen: list[PgTool] = []
    for path in _candidates(name):
        major = await _major(path)
        if major is None:
            continue
        if major >= server_major:
            return PgTool(path, major)
        seen.append(PgTool(path, major))
    install = f"install postgresql-client-{server_major} (Debian, Ubuntu: apt-get install"
    install += f" postgresql-client-{server_major}; or the PGDG packages)"
    if not seen:
        raise PgToolError(f"{name} not found on PATH or under {PG_LIB_DIR}/*/bin: {install}")
    newest = max(seen, key=lambda tool: tool.major)
    raise PgToolError(
        f"{name} {newest.major} ({newest.path}) is older than the server"
        f" (PostgreSQL {server_major}): {install}"
    )


def _passfile_line(password: str) -> str:
    # .pgpass escapes `\` and `:`; the wildcards match whatever the one program connects to.
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextlib.contextmanager
def libpq_environment(password: str | None) -> Iterator[dict[str, str]]:
    """The environment for a client program, the password in a private temporary passfile.

    Never on the command line (`ps` shows it to every user) and never in a log; the file
    lives in a directory only we can read, for as long as the program runs.
    """
    env = dict(os.environ)
    if password is None:
        yield env  # the user's own PGPASSWORD or ~/.pgpass, if any, apply
        return
    env.pop("PGPASSWORD", None)  # it would win over the passfile
    with tempfile.TemporaryDirectory(prefix="smartcover-pgpass-") as directory:
        passfile = Path(directory) / "pgpass"
        descriptor = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(_passfile_line(password))
        env["PGPASSFILE"] = str(passfile)
        yield env


async def run_tool(tool: PgTool, args: list[str], *, password: str | None) -> str:
    """Runs the program with `args`; returns its stdout, raises PgToolError on failure."""
    argv = [str(tool.path), *args]
    with libpq_environment(password) as env:
        logger.debug("running %s", tool.path.name)
        try:
            code, out, err = await _run(argv, env)
        except OSError as exc:
            raise PgToolError(f"{tool.path} could not be started: {exc}") from None
    if code != 0:
        raise PgToolError(f"{tool.path.name} failed ({code}): {err[-_STDERR_TAIL_CHARS:].strip()}")
    return out
