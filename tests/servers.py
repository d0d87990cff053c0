"""Private Mosquitto, InfluxDB and PostgreSQL servers for tests, each in its own directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# The broker tuning shared with deployments (persistence, queue limits), see DESIGN §8.
MOSQUITTO_CONF_D = Path(__file__).resolve().parents[1] / "mosquitto" / "conf.d"
# A test user for PostgreSQL when we run as root; the distribution's `postgres` user wins.
PG_TEST_USER = "smartcover-test"

# How much of a server's log a start-up error quotes: enough for the reason, not a flood.
_LOG_TAIL_BYTES = 4096
# Poll interval while waiting for a server to accept connections.
_POLL_S = 0.05


class ServerError(RuntimeError):
    """A test server could not be prepared, started or used."""


def free_port() -> int:
    """Return a loopback TCP port that nobody listens on right now."""
    # Racy by nature (someone may take it before the server binds), as in pytest-postgresql;
    # the servers keep the port they were given across restarts, so it is raced only once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    """Return whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    """Return the end of a log file, or a note that there is none."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"


class ManagedServer:
    """One server process in a work directory, on ports fixed for its lifetime.

    Subclasses say how to prepare the directory, which command to run and how to tell
    that the server is ready. stop(), kill() and close() are idempotent and always reap
    the process, so a failing test leaves no orphan behind.
    """

    name = "server"
    start_timeout_s = 10.0
    stop_timeout_s = 15.0
    # The signal asking for a clean shutdown that keeps the server's data.
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir.resolve()
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False

    # -- what subclasses provide -------------------------------------------------------

    def _prepare(self) -> None:
        """Create the work directory's files; runs once, before the first start."""
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        return port_accepts(self.port, self.host)

    # -- life cycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the server and wait until it serves; raise ServerError with its log if not."""
        if self.running:
            raise ServerError(f"{self.name} on port {self.port} is already running")
        if not self._prepared:
            self._prepare()
            self._prepared = True
        self._reap()
        # Readiness is judged by the port answering, so another server already on it
        # would pass for ours (a fixed port given by a test, or lost the free_port() race).
        if port_accepts(self.port, self.host):
            raise ServerError(f"cannot start {self.name}: port {self.port} is already in use")
        command = self._command()
        log.debug("starting %s: %s", self.name, " ".join(command))
        # Appending keeps the log of earlier runs, which is what explains a failed restart.
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own session: Ctrl-C in the terminal does not reach it, and kill()
                # can take down the whole process group (PostgreSQL's backends too).
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        log.info("%s ready on %s:%d (pid %d)", self.name, self.host, self.port, self._proc.pid)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not self._is_ready():
            code = self._proc.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} while starting on port {self.port};"
                    f" log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} did not serve on port {self.port} within"
                    f" {self.start_timeout_s:g} s; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """Shut the server down cleanly (it saves its data); SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            log.debug("stopping %s (pid %d) with %s", self.name, proc.pid, self.stop_signal.name)
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored %s for %g s; killing it",
                    self.name,
                    proc.pid,
                    self.stop_signal.name,
                    self.stop_timeout_s,
                )
                self._killpg(proc)
        self._reap()

    def kill(self) -> None:
        """Kill the server and its process group at once, as a crash or `kill -9` would."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            log.debug("killing %s (pid %d)", self.name, proc.pid)
            self._killpg(proc)
        self._reap()

    def restart(self) -> None:
        """Stop cleanly and start again on the same port, so clients can reconnect."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server if it runs; safe to call any number of times."""
        try:
            self.stop()
        finally:
            # Even if the clean stop raised, nothing may outlive the test session.
            self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _killpg(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        proc.wait()
        # Children the leader left behind (PostgreSQL backends after a crash) share its
        # process group; the group id cannot be reused while any of them lives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._proc = None


def _conf_value(value: Path) -> str:
    # Mosquitto splits option lines on spaces and has no quoting.
    text = str(value)
    if re.search(r"\s", text):
        raise ServerError(f"mosquitto cannot use a path with white space: {text!r}")
    return text


class MosquittoServer(ManagedServer):
    """A private Mosquitto broker with the project's conf.d tuning and its own persistence."""

    name = "mosquitto"
    start_timeout_s = 10.0

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
    ) -> None:
        super().__init__(workdir, port=port)
        self.password_file = password_file
        self.acl_file = acl_file
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"

    @property
    def url(self) -> str:
        """The broker as SMARTCOVER_MQTT_URL spells it."""
        return f"mqtt://{self.host}:{self.port}"

    def _prepare(self) -> None:
        super()._prepare()
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")

    def config_text(self) -> str:
        """The main configuration file: listener, paths and authentication."""
        lines = [
            "# Written by tests/servers.py for one test broker.",
            f"listener {self.port} {self.host}",
            # The trailing slash matters: mosquitto appends the file name to it verbatim.
            f"persistence_location {_conf_value(self.data_dir)}/",
            f"log_dest file {_conf_value(self.log_path)}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to the `mosquitto` user, which could neither write the
            # persistence file nor reach a private temporary directory; `root` keeps it.
            lines.append("user root")
        if self.password_file is None:
            lines.append("allow_anonymous true")
        else:
            lines += ["allow_anonymous false", f"password_file {_conf_value(self.password_file)}"]
            if self.acl_file is not None:
                lines.append(f"acl_file {_conf_value(self.acl_file)}")
        # Last, so the shared tuning reads as it does in the deployment's configuration.
        lines.append(f"include_dir {_conf_value(MOSQUITTO_CONF_D)}")
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        return [_find_binary("mosquitto", "/usr/sbin/mosquitto"), "-c", str(self.config_path)]


def _toml_str(value: object) -> str:
    # A JSON string is a valid TOML basic string for every path we write.
    return json.dumps(str(value))


def _influx_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class InfluxServer(ManagedServer):
    """A private InfluxDB 1.x `influxd` with its data, WAL and meta store in one directory."""

    name = "influxd"
    start_timeout_s = 30.0
    stop_timeout_s = 15.0
    # Timeout of one HTTP request from the helpers below.
    http_timeout_s = 10.0

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        # The backup/restore RPC service binds 8088 unless told otherwise.
        self.rpc_port = free_port()
        self.config_path = self.workdir / "influxdb.conf"

    @property
    def url(self) -> str:
        """The server's base URL, as SMARTCOVER_INFLUX_URL spells it."""
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        super()._prepare()
        self.config_path.write_text(self.config_text(), encoding="utf-8")

    def config_text(self) -> str:
        """The influxd configuration: everything local, nothing but the HTTP API running."""
        w = self.workdir
        # Unknown keys are ignored: upstream 1.x reads reporting-disabled, while Debian's
        # influxd 1.6 was patched to read reporting-enabled (off by default) instead.
        return f"""# Written by tests/servers.py for one test server.
reporting-disabled = true
reporting-enabled = false
bind-address = {_toml_str(f"{self.host}:{self.rpc_port}")}

[meta]
  dir = {_toml_str(w / "meta")}
  logging-enabled = false

[data]
  dir = {_toml_str(w / "data")}
  wal-dir = {_toml_str(w / "wal")}
  query-log-enabled = false

[http]
  enabled = true
  bind-address = {_toml_str(f"{self.host}:{self.port}")}
  auth-enabled = false
  log-enabled = false

[logging]
  level = "warn"

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false
"""

    def _command(self) -> list[str]:
        return [_find_binary("influxd", "/usr/bin/influxd"), "-config", str(self.config_path)]

    def _is_ready(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/ping", timeout=1.0)
        except httpx.TransportError:
            return False
        return response.status_code == 204

    # -- helpers for tests -----------------------------------------------------------

    def query(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run a read-only InfluxQL query (GET /query, times in epoch ms); return result 0."""
        return self._query("GET", q, db)

    def execute(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run a statement that changes something (POST /query); return result 0."""
        return self._query("POST", q, db)

    def _query(self, method: str, q: str, db: str | None) -> dict[str, Any]:
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        response = httpx.request(
            method, f"{self.url}/query", params=params, timeout=self.http_timeout_s
        )
        if response.status_code != 200:
            raise ServerError(f"influxd answered {response.status_code} to {q!r}: {response.text}")
        body: dict[str, Any] = response.json()
        if "error" in body:
            raise ServerError(f"influxd refused {q!r}: {body['error']}")
        result: dict[str, Any] = body["results"][0]
        if "error" in result:
            raise ServerError(f"influxd refused {q!r}: {result['error']}")
        return result

    def create_database(self, name: str) -> None:
        """Create a database (a no-op when it exists)."""
        self.execute(f"CREATE DATABASE {_influx_ident(name)}")

    def drop_database(self, name: str) -> None:
        """Drop a database and all its data (a no-op when it does not exist)."""
        self.execute(f"DROP DATABASE {_influx_ident(name)}")

    def count(self, db: str, measurement: str = "cover_reading") -> int:
        """Return how many points the measurement holds (0 when it is empty or absent)."""
        # count(*) counts each field separately; every point of a measurement carries its
        # required fields (cover_reading: tilt_deg, displacement_mm, seq), so the largest
        # per-field count is the number of points.
        from_ = _influx_ident(measurement)
        result = self.query(f"SELECT count(*) FROM {from_}", db)  # noqa: S608 (quoted identifier)
        counts = [
            value
            for series in result.get("series", [])
            for row in series["values"]
            for value in row[1:]
            if isinstance(value, int)
        ]
        return max(counts, default=0)

    def points(self, db: str, measurement: str = "cover_reading") -> list[dict[str, Any]]:
        """Return every point, oldest first, as {column: value} with tags and `time` in ms."""
        from_ = _influx_ident(measurement)
        result = self.query(f"SELECT * FROM {from_}", db)  # noqa: S608 (quoted identifier)
        return [
            dict(zip(series["columns"], row, strict=True))
            for series in result.get("series", [])
            for row in series["values"]
        ]


class PostgresServer(ManagedServer):
    """A private PostgreSQL cluster made by initdb, trusting local connections as `postgres`."""

    name = "postgres"
    start_timeout_s = 30.0
    # SIGINT is PostgreSQL's fast shutdown: it ends open sessions and checkpoints. The
    # default SIGTERM (smart shutdown) waits for every client, and a test may leak one.
    stop_signal = signal.SIGINT

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        self.bindir = find_postgres_bindir()
        self.data_dir = self.workdir / "data"
        # PostgreSQL refuses to run as root, so as root it runs as an unprivileged user.
        self.run_as = _postgres_run_user() if os.geteuid() == 0 else None

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for one database of this server."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def _as_user(self, command: list[str]) -> list[str]:
        if self.run_as is None:
            return command
        # setpriv execs in place (runuser would fork and sit between us and postgres, and
        # turn our shutdown signal into its own SIGTERM-then-SIGKILL).
        return [
            _find_binary("setpriv", "/usr/bin/setpriv"),
            f"--reuid={self.run_as.pw_uid}",
            f"--regid={self.run_as.pw_gid}",
            "--init-groups",
            "--",
            *command,
        ]

    def _prepare(self) -> None:
        super()._prepare()
        if self.run_as is not None:
            os.chown(self.workdir, self.run_as.pw_uid, self.run_as.pw_gid)
            _check_reachable(self.workdir, self.run_as)
        if (self.data_dir / "PG_VERSION").exists():
            return
        command = self._as_user(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                # The C locale exists everywhere; the environment's may not be installed.
                "--locale=C",
            ]
        )
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServerError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def _command(self) -> list[str]:
        return self._as_user(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.workdir),
                "-c",
                f"listen_addresses={self.host}",
                # Durability of a throw-away cluster is not worth the disk flushes.
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ]
        )

    def _is_ready(self) -> bool:
        # The port accepts connections while the server still recovers; pg_isready asks.
        if not port_accepts(self.port, self.host):
            return False
        pg_isready = self.bindir / "pg_isready"
        if not pg_isready.exists():
            return True
        done = subprocess.run(
            [str(pg_isready), "-q", *self._conninfo(), "-d", "postgres", "-t", "1"],
            check=False,
        )
        return done.returncode == 0

    def _conninfo(self) -> list[str]:
        # Explicit, so the caller's PGHOST/PGPORT/PGUSER (or being root) change nothing.
        return ["-h", self.host, "-p", str(self.port), "-U", "postgres"]

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql and return its unaligned, tuples-only output."""
        done = self._client("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql, "-d", dbname)
        return done.stdout

    def create_database(self, name: str) -> None:
        """Create a database owned by `postgres`."""
        self._client("createdb", "--maintenance-db=postgres", name)

    def _client(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *self._conninfo(), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServerError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")
        return done


def _find_binary(name: str, fallback: str) -> str:
    # Debian puts mosquitto in /usr/sbin, which is not on every user's PATH.
    found = shutil.which(name) or (fallback if Path(fallback).exists() else None)
    if found is None:
        raise ServerError(f"{name} is not installed (run `make servers`)")
    return found


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.parent.name))


def find_postgres_bindir() -> Path:
    """Return the directory of initdb and postgres: PATH first, else the newest install."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        # Follow the symlink so postgres, pg_isready and psql come from the same version.
        return Path(on_path).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key)
    if not installed:
        raise ServerError("PostgreSQL is not installed (run `make servers`)")
    return installed[-1].parent


def _postgres_run_user() -> pwd.struct_passwd:
    for user in ("postgres", PG_TEST_USER):
        try:
            return pwd.getpwnam(user)
        except KeyError:
            continue
    log.info("creating system user %s to run PostgreSQL", PG_TEST_USER)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_TEST_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(PG_TEST_USER)


def _may_traverse(st: os.stat_result, user: pwd.struct_passwd) -> bool:
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    # pytest's temporary directories are private to root (0o700): the server's user could
    # not even reach its own data directory, and initdb's error would not say why.
    for parent in path.parents:
        if not _may_traverse(parent.stat(), user):
            raise ServerError(
                f"{user.pw_name} cannot reach {path}: {parent} is not traversable;"
                " put the work directory under one with mode 0o755"
            )
