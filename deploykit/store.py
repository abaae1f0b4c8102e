"""The results store: every `deploykit bench` run kept in one embedded SQLite file.

One row per run (when, the command, git revision of deploykit, profile, versions, timing settings,
status) and one per measured configuration, with its key figures as columns for querying and the
whole record (raw samples included) as JSON, so a later report re-derives any statistic.

A run is written in one transaction, after it ends: a store never holds half a run. A run the
user interrupts is still written, with what it measured and status "interrupted"; a run killed
outright is simply absent. WAL journaling lets a report read while another bench writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ArtifactError, UsageError
from .records import BenchRecord

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_utc TEXT NOT NULL,
    finished_utc TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'interrupted', 'failed')),
    command TEXT NOT NULL,
    git_revision TEXT,
    profile TEXT NOT NULL,
    conditions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    prune TEXT NOT NULL,
    sparsity REAL NOT NULL,
    form TEXT NOT NULL,
    runtime TEXT NOT NULL,
    stage TEXT NOT NULL,
    device TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    threads INTEGER NOT NULL,
    p50_ms REAL NOT NULL,
    iqr_ms REAL NOT NULL,
    samples INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    peak_rss_bytes INTEGER NOT NULL,
    nonzero_parameters INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_run ON records(run_id);
"""


def default_store_path() -> Path:
    """$DEPLOYKIT_STORE, else ~/.local/share/deploykit/results.sqlite."""
    return Path(os.environ.get("DEPLOYKIT_STORE") or Path.home() / ".local" / "share" / "deploykit" / "results.sqlite")


@dataclass(frozen=True)
class Run:
    id: int
    started_utc: str
    finished_utc: str
    status: str
    command: str
    git_revision: str | None
    profile: str
    conditions: dict[str, Any]
    records: tuple[BenchRecord, ...] = ()


def git_revision() -> str | None:
    """The revision of the deploykit checkout this runs from ("+dirty" with local changes), if any."""
    source = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
                                  capture_output=True, text=True, timeout=10)
        if revision.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return revision.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise UsageError(f"no results store at {str(self.path)!r} (run `deploykit bench` first, or give --store)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and create:
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise ArtifactError(f"{str(self.path)!r} is not a deploykit results store "
                                    f"(schema version {version}, expected {SCHEMA_VERSION})")
        except sqlite3.DatabaseError as exc:
            raise ArtifactError(f"cannot open results store {str(self.path)!r}: {exc}") from None
        return db

    def check_writable(self) -> None:
        """Create (or open) the store now, so a bad path fails before a long run rather than after it."""
        self._connect(create=True).close()

    def save_run(self, records: Sequence[BenchRecord], *, started_utc: str, status: str, command: str,
                 profile: str, conditions: dict[str, Any]) -> int:
        """Write one run and its records in one transaction; returns the run's id."""
        with closing(self._connect(create=True)) as db, db:
            run_id = db.execute(
                "INSERT INTO runs (started_utc, finished_utc, status, command, git_revision, profile, conditions) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (started_utc, now_utc(), status, command, git_revision(), profile, json.dumps(conditions)),
            ).lastrowid
            db.executemany(
                "INSERT INTO records (run_id, model, prune, sparsity, form, runtime, stage, device, batch_size, "
                "threads, p50_ms, iqr_ms, samples, disk_bytes, peak_rss_bytes, nonzero_parameters, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, r.model, r.prune, r.sparsity, r.form, r.runtime, r.stage, r.device, r.batch_size, r.threads,
                  r.measurement.median_ms, r.measurement.iqr_ms, len(r.measurement.samples_ns), r.disk_bytes,
                  r.peak_rss_bytes, r.nonzero_parameters, json.dumps(r.to_dict())) for r in records],
            )
        return run_id

    def runs(self) -> list[Run]:
        """Every run, oldest first, without records."""
        with closing(self._connect(create=False)) as db:
            rows = db.execute("SELECT id, started_utc, finished_utc, status, command, git_revision, profile, "
                              "conditions FROM runs ORDER BY id").fetchall()
        return [Run(*row[:7], json.loads(row[7])) for row in rows]

    def run(self, selector: str) -> Run:
        """A run with its records: by id, "last", or "profile:NAME" (that profile's last run)."""
        runs = self.runs()
        if not runs:
            raise UsageError(f"the results store {str(self.path)!r} holds no runs")
        if selector == "last":
            chosen = runs[-1]
        elif selector.startswith("profile:"):
            name = selector.partition(":")[2]
            matching = [r for r in runs if r.profile == name]
            if not matching:
                raise UsageError(f"no run on profile {name!r}; profiles in the store: "
                                 f"{', '.join(sorted({r.profile for r in runs}))}")
            chosen = matching[-1]
        else:
            by_id = {str(r.id): r for r in runs}
            if selector not in by_id:
                raise UsageError(f"no run {selector!r} in the store; runs: {', '.join(by_id)} (or 'last', 'profile:NAME')")
            chosen = by_id[selector]
        with closing(self._connect(create=False)) as db:
            rows = db.execute("SELECT record FROM records WHERE run_id = ? ORDER BY id", (chosen.id,)).fetchall()
        records = tuple(BenchRecord.from_dict(json.loads(row[0])) for row in rows)
        return Run(**{**chosen.__dict__, "records": records})
