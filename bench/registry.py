"""`python -m bench.registry`: a 100,000-cover census import, and the cache's memory.

For SQLite, and for PostgreSQL when its binaries are installed (a private server):

1. a census CSV of 100,000 covers, each with a sensor, plus deliberately broken rows at
   known places, is imported as is: the report must list exactly the planted problems,
   and nothing may be written (all or nothing);
2. the same file with `skip_invalid`: the 100,000 valid covers, their roads, devices and
   bindings are written; then imported once more, which finds every row unchanged;
3. a fresh process imports the service's modules, loads the registry cache from that
   database and reports its resident memory, and how long a look-up takes;
4. in that process, one cover edited as the API does it: how long until the cache holds
   the edit when it loads what the edit touched, against a whole reload.

Targets (issue 4): import ≤ 30 s, service RSS with 100,000 covers loaded ≤ 200 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.census import CensusReport, RowError, import_census, read_census_file
from core.registry_cache import RegistryCache, RegistryChange
from core.registry_schemas import CoverUpdate, RoadCreate, Unit, UnitKind
from tests.servers import PostgresServer, ServerError

IMPORT_TARGET_S = 30.0
RSS_TARGET_MB = 200.0
HEADER = (
    "cover_id,kind_code,owner_unit,maintainer_unit,road,grid,lon,lat,depth_cm,material,"
    "installed_on,flood_prone,anti_fall,state,device_id,report_interval_s"
)
# Minor class → owner unit, as a district's census spreads them.
_OWNERS = {
    "01": "WATER",
    "02": "DRAIN",
    "03": "DRAIN",
    "05": "POWER",
    "07": "TELECOM",
    "10": "HEAT",
    "11": "GAS",
    "12": "POLICE",
    "14": "TOWN-01",
}
_UNITS = [
    ("WATER", UnitKind.WATER_SUPPLY),
    ("DRAIN", UnitKind.DRAINAGE),
    ("POWER", UnitKind.POWER),
    ("TELECOM", UnitKind.TELECOM),
    ("HEAT", UnitKind.HEATING),
    ("GAS", UnitKind.GAS),
    ("POLICE", UnitKind.PUBLIC_SECURITY),
    ("TOWN-01", UnitKind.TOWNSHIP),
]
_ROADS = 2000
# One planted problem every this many rows; (column, bad value, expected reason).
_BROKEN_EVERY = 4000
_BROKEN = [
    ("cover_id", "41120301010000", "must be 16 digits, got '41120301010000'"),
    ("lon", "east", "'east' is not a number"),
    ("lat", "134.6", "Input should be less than or equal to 90"),
    ("owner_unit", "NOBODY", "unit 'NOBODY' does not exist"),
    ("installed_on", "2020/01/01", "'2020/01/01' is not a date as YYYY-MM-DD"),
]


def _cover_row(n: int) -> list[str]:
    minor = list(_OWNERS)[n % len(_OWNERS)]
    return [
        f"41120301{minor}{n + 1:06d}",
        f"01{minor}",
        "" if minor == "14" else _OWNERS[minor],  # owner unknown: the road's township
        "DRAIN" if n % 7 == 0 else "",
        f"Road {n % _ROADS:04d}",
        f"G{n % 300:03d}",
        f"{112.3 + (n % 1000) * 0.0002:.6f}",
        f"{34.5 + (n // 1000) * 0.0002:.6f}",
        str(150 + n % 200),
        "cast iron" if n % 2 else "composite",
        f"20{10 + n % 14:02d}-0{1 + n % 9}-1{n % 10}",
        "1" if n % 11 == 0 else "0",
        "1" if n % 3 == 0 else "0",
        "in_service",
        f"SC-{n:06d}",
        "3600" if n % 5 else "600",
    ]


def write_census(path: Path, covers: int) -> list[RowError]:
    """Writes `covers` valid rows plus planted broken ones; returns the exact report due."""
    columns = HEADER.split(",")
    expected: list[RowError] = []
    broken = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(HEADER + "\n")
        row_number = 1
        for n in range(covers):
            if n and n % _BROKEN_EVERY == 0:
                column, value, reason = _BROKEN[broken % len(_BROKEN)]
                cells = _cover_row(999_998 - broken)  # numbers no valid row uses
                cells[columns.index(column)] = value
                cells[columns.index("device_id")] = f"BAD-{broken:04d}"
                out.write(",".join(cells) + "\n")
                row_number += 1
                expected.append(RowError(row_number, column, reason))
                broken += 1
            out.write(",".join(_cover_row(n)) + "\n")
            row_number += 1
    return expected


@dataclass
class ImportRun:
    database: str
    rows: int
    rejected_s: float
    report_exact: bool
    nothing_written: bool
    import_s: float
    inserted: int
    bindings: int
    reimport_s: float
    unchanged: int
    cache_rss_mb: float = 0.0
    cache_peak_rss_mb: float = 0.0
    service_modules_rss_mb: float = 0.0
    cache_load_s: float = 0.0
    lookup_ns: float = 0.0
    edit_apply_ms: float = 0.0  # an API edit of one cover reaching the cache
    edit_reload_ms: float = 0.0  # the same by a whole reload, for comparison


async def _timed_import(url: str, path: Path, **options: bool) -> tuple[CensusReport, float]:
    engine = db.create_engine(url)
    try:
        sessions = db.session_factory(engine)
        started = time.perf_counter()
        async with db.transaction(sessions) as session:
            report = await import_census(session=session, table=read_census_file(path), **options)
        return report, time.perf_counter() - started
    finally:
        await engine.dispose()


async def _prepare(url: str) -> None:
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
        async with db.transaction(db.session_factory(engine)) as session:
            for code, kind in _UNITS:
                unit = Unit(code=code, name=f"{code} unit", kind=kind)
                await registry.create_unit(session=session, unit=unit)
            for number in range(_ROADS):
                road = RoadCreate(name=f"Road {number:04d}", township_unit="TOWN-01")
                await registry.create_road(session=session, road=road)
    finally:
        await engine.dispose()


async def _covers(url: str) -> int:
    engine = db.create_engine(url)
    try:
        async with db.transaction(db.session_factory(engine), write=False) as session:
            return await registry.count_covers(session=session)
    finally:
        await engine.dispose()


def run_imports(name: str, url: str, path: Path, expected: list[RowError]) -> ImportRun:
    asyncio.run(_prepare(url))
    rejected, rejected_s = asyncio.run(_timed_import(url, path))
    exact = rejected.errors == expected
    if not exact:
        print(f"  report differs: {len(rejected.errors)} errors, {len(expected)} planted")
        for got, want in zip(rejected.errors, expected, strict=False):
            if got != want:
                print(f"    got {got}\n    want {want}")
                break
    untouched = asyncio.run(_covers(url)) == 0 and not rejected.committed
    imported, import_s = asyncio.run(_timed_import(url, path, skip_invalid=True))
    again, reimport_s = asyncio.run(_timed_import(url, path, skip_invalid=True))
    print(
        f"{name}: {rejected.rows:,} rows; rejected file checked in {rejected_s:.1f} s"
        f" (report {'exact' if exact else 'WRONG'}, {'nothing' if untouched else 'SOMETHING'}"
        f" written); import {import_s:.1f} s ({imported.inserted:,} covers,"
        f" {imported.bindings_made:,} bindings); re-import {reimport_s:.1f} s"
        f" ({again.unchanged:,} unchanged)"
    )
    return ImportRun(
        database=name,
        rows=rejected.rows,
        rejected_s=round(rejected_s, 2),
        report_exact=exact,
        nothing_written=untouched,
        import_s=round(import_s, 2),
        inserted=imported.inserted,
        bindings=imported.bindings_made,
        reimport_s=round(reimport_s, 2),
        unchanged=again.unchanged,
    )


# -- the memory probe (runs in a fresh process) -----------------------------------------


def _rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def _peak_rss_mb() -> float:
    # Not getrusage's ru_maxrss: Linux carries it over from the parent across fork and
    # exec, so a child of the big importing process would report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _edit_a_cover(
    sessions: async_sessionmaker[AsyncSession], depth_cm: float
) -> RegistryChange:
    """One cover edited as the API would: what the write touched, for `cache.apply`."""
    async with db.transaction(sessions) as session:
        [cover] = await registry.list_covers(session=session, limit=1)
        await registry.update_cover(
            session=session, cover_id=cover.cover_id, update=CoverUpdate(depth_cm=depth_cm)
        )
        steps = session.info[registry.VERSION_STEPS]
    return RegistryChange(steps=steps, covers={cover.cover_id})


async def _time_edits(
    cache: RegistryCache, sessions: async_sessionmaker[AsyncSession]
) -> tuple[float, float]:
    """Seconds until an edit is in the cache: loading what it touched, and reloading all."""
    change = await _edit_a_cover(sessions, 150)
    started = time.perf_counter()
    await cache.apply(change)
    applied_s = time.perf_counter() - started
    await _edit_a_cover(sessions, 160)
    started = time.perf_counter()
    await cache.refresh()
    return applied_s, time.perf_counter() - started


async def _probe(url: str) -> dict[str, float]:
    engine = db.create_engine(url)
    sessions = db.session_factory(engine)
    cache = RegistryCache(sessions)
    started = time.perf_counter()
    await cache.refresh()
    load_s = time.perf_counter() - started
    edit_apply_s, edit_reload_s = await _time_edits(cache, sessions)
    await engine.dispose()
    gc.collect()
    ids = [f"SC-{n:06d}" for n in range(0, 100_000, 7)]
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for device_id in ids:
            cache.lookup(device_id)
    lookup_ns = (time.perf_counter() - started) / (rounds * len(ids)) * 1e9
    return {
        "covers": len(cache),
        "devices": cache.device_count,
        "load_s": load_s,
        "lookup_ns": lookup_ns,
        "edit_apply_s": edit_apply_s,
        "edit_reload_s": edit_reload_s,
    }


def probe_main(url: str) -> None:
    # What the service process holds before any data: its own modules.
    try:
        import smartcover.serve  # noqa: F401, PLC0415 -- the service's import footprint
    except ImportError as exc:
        print(
            f"(service modules did not import, measuring the cache alone: {exc})", file=sys.stderr
        )
    modules_mb = _rss_mb()
    figures = asyncio.run(_probe(url))
    figures.update(
        modules_rss_mb=modules_mb,
        rss_mb=_rss_mb(),
        peak_rss_mb=_peak_rss_mb(),
    )
    print(json.dumps(figures))


def measure_cache(run: ImportRun, url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.registry", "--probe", url],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    run.cache_rss_mb = round(figures["rss_mb"], 1)
    run.cache_peak_rss_mb = round(figures["peak_rss_mb"], 1)
    run.service_modules_rss_mb = round(figures["modules_rss_mb"], 1)
    run.cache_load_s = round(figures["load_s"], 2)
    run.lookup_ns = round(figures["lookup_ns"], 1)
    run.edit_apply_ms = round(figures["edit_apply_s"] * 1000, 1)
    run.edit_reload_ms = round(figures["edit_reload_s"] * 1000, 1)
    print(
        f"  cache: {figures['covers']:,} covers, {figures['devices']:,} devices loaded in"
        f" {run.cache_load_s:.1f} s; RSS {run.cache_rss_mb:.0f} MB (peak"
        f" {run.cache_peak_rss_mb:.0f} MB, service modules alone"
        f" {run.service_modules_rss_mb:.0f} MB); look-up {run.lookup_ns:.0f} ns"
    )
    print(
        f"  one cover edited: in the cache after {run.edit_apply_ms:.1f} ms (what it touched)"
        f" vs {run.edit_reload_ms:.0f} ms (a whole reload),"
        f" {run.edit_reload_ms / max(run.edit_apply_ms, 0.001):.0f}x"
    )


# -- main -------------------------------------------------------------------------------


def _postgres(root: Path, runs: list[ImportRun], path: Path, expected: list[RowError]) -> None:
    workdir = root / "pg"
    workdir.mkdir()
    workdir.chmod(0o755)  # as root, the server runs as another user who must reach it
    try:
        server = PostgresServer(workdir / "cluster")
        server.start()
    except ServerError as exc:
        print(f"postgresql: skipped ({str(exc).splitlines()[0]})")
        return
    try:
        server.create_database("bench")
        url = server.url("bench")
        runs.append(run_imports("postgresql", url, path, expected))
        measure_cache(runs[-1], url)
    finally:
        server.close()


def report(runs: list[ImportRun], json_path: Path | None) -> bool:
    ok = True
    print("\nfigures (targets: import ≤ 30 s, service RSS with the registry loaded ≤ 200 MB):")
    for run in runs:
        fine = (
            run.report_exact
            and run.nothing_written
            and run.import_s <= IMPORT_TARGET_S
            and run.cache_peak_rss_mb <= RSS_TARGET_MB
        )
        ok = ok and fine
        print(
            f"  {run.database:<11} import {run.import_s:5.1f} s   re-import {run.reimport_s:5.1f} s"
            f"   rejected-file check {run.rejected_s:5.1f} s   cache RSS {run.cache_rss_mb:4.0f} MB"
            f" (peak {run.cache_peak_rss_mb:.0f})   {'ok' if fine else 'MISSED'}"
        )
    # This process generated the file and ran every import: an upper bound for one import.
    print(f"  importing process peak RSS {_peak_rss_mb():.0f} MB")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(run) for run in runs], indent=2))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--covers", type=int, default=100_000)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_main(args.probe)
        return
    runs: list[ImportRun] = []
    with tempfile.TemporaryDirectory(prefix="smartcover-bench-registry-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        path = root / "census.csv"
        expected = write_census(path, args.covers)
        size_mb = path.stat().st_size / 2**20
        print(
            f"census: {args.covers:,} covers with sensors + {len(expected)} broken rows,"
            f" {size_mb:.1f} MB"
        )
        url = f"sqlite:///{root / 'registry.db'}"
        runs.append(run_imports("sqlite", url, path, expected))
        measure_cache(runs[-1], url)
        if not args.no_postgres:
            _postgres(root, runs, path, expected)
    if not report(runs, args.json):
        sys.exit(1)


if __name__ == "__main__":
    main()
