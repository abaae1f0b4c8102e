"""The results store: every `deploykit bench` run kept in one embedded SQLite file.

One row per run (when, the command, git revision of deploykit, profile, versions, timing settings,
status, a unique id) and one per measured configuration, with its key figures as columns for
querying and the whole record (raw samples included) as JSON, so a later report re-derives any
statistic; configurations that failed are kept too, with their error.

A run is written in one transaction, after it ends: a store never holds half a run. A run the
user interrupts is still written, with what it measured and status "interrupted"; a run killed
outright is simply absent. WAL journaling lets a report read while another bench writes.

Nothing measured is lost to the store itself: a busy store is waited for (SQLite's busy timeout,
then retries); one that stays locked, or cannot be written, gets the run as a JSON file beside it
(`spill`), which `deploykit report --import FILE` puts back (a run's unique id makes importing it
twice a no-op). Another store's runs come in the same way (`read_store_runs`: `report --import
OTHER.sqlite`), so runs measured on other machines sit beside this one's, each keeping its unique id
and saying where it was imported from. A store is checked (`PRAGMA quick_check`) when opened, and a damaged one is
refused in one line and never written into. Older schema versions are migrated forward.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from deploykit.bench.records import BenchRecord, FailedConfiguration
from deploykit.core.errors import ArtifactError, StoreError, UsageError
from deploykit.core.fsutil import check_output_file, read_text, write_text_atomic
from deploykit.core.validate import RecordError, check

SCHEMA_VERSION = 2
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
#: schema version -> the statements that bring a store of that version to the next one
MIGRATIONS = {
    1: """
ALTER TABLE runs ADD COLUMN uid TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS runs_uid ON runs(uid);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    runtime TEXT NOT NULL,
    error TEXT NOT NULL,
    record TEXT NOT NULL
);
""",
}
#: SQLite's own wait for a lock, per attempt, and the attempts before the run goes to a JSON file
BUSY_TIMEOUT_S = 15.0
ATTEMPTS = 4
#: what a file of runs that could not be stored says it is, and the version of its layout (files
#: written before it had one are version 1)
SPILL_FORMAT = "deploykit.runs"
SPILL_VERSION = 1
#: the first bytes of every SQLite database file
SQLITE_HEADER = b"SQLite format 3\x00"


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
    failures: tuple[FailedConfiguration, ...] = ()
    #: unique id, kept when a run is imported elsewhere (None for runs stored before it existed)
    uid: str | None = None


@dataclass(frozen=True)
class NewRun:
    """A run to store: its records, its failures and its conditions."""

    records: Sequence[BenchRecord]
    started_utc: str
    status: str
    command: str
    profile: str
    conditions: dict[str, Any]
    failures: Sequence[FailedConfiguration] = ()
    #: the deploykit revision that measured it (`git_revision()`), kept as is when imported
    git_revision: str | None = None
    finished_utc: str | None = None
    uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"started_utc": self.started_utc, "finished_utc": self.finished_utc or now_utc(),
                "status": self.status, "command": self.command, "profile": self.profile,
                "git_revision": self.git_revision, "conditions": self.conditions, "uid": self.uid,
                "records": [r.to_dict() for r in self.records], "failures": [f.to_dict() for f in self.failures]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "run") -> "NewRun":
        """The run `to_dict` wrote, every field and record checked (a runs file may have been edited)."""
        if not isinstance(data, dict):
            raise RecordError(f"{where} must be an object, got {type(data).__name__}")
        missing = [name for name in (*_RUN_FIELDS, "records") if name not in data and name not in _OPTIONAL_RUN_FIELDS]
        if missing:
            raise RecordError(f"{where}.{missing[0]} is missing")
        values = {name: check(data[name], kind, f"{where}.{name}") for name, kind in _RUN_FIELDS.items() if name in data}
        if values["status"] not in STATUSES:
            raise RecordError(f"{where}.status must be one of {', '.join(STATUSES)}, got {values['status']!r}")
        records = check(data["records"], list, f"{where}.records")
        failures = check(data.get("failures", []), list, f"{where}.failures")
        return cls(records=[BenchRecord.from_dict(r, f"{where}.records[{i}]") for i, r in enumerate(records)],
                   failures=[FailedConfiguration.from_dict(f, f"{where}.failures[{i}]") for i, f in enumerate(failures)],
                   **values)


#: a run's own fields (beside its records and failures) and their types, as read back
_RUN_FIELDS = {"started_utc": str, "status": str, "command": str, "profile": str, "conditions": dict[str, Any],
               "git_revision": str | None, "finished_utc": str | None, "uid": str | None}
_OPTIONAL_RUN_FIELDS = ("git_revision", "finished_utc", "uid")
STATUSES = ("complete", "interrupted", "failed")


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


def _is_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


class ResultStore:
    def __init__(self, path: str | Path, busy_timeout_s: float = BUSY_TIMEOUT_S, attempts: int = ATTEMPTS,
                 sleep: Callable[[float], None] = time.sleep):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.attempts = attempts
        self._sleep = sleep

    def _connect(self, create: bool) -> sqlite3.Connection:
        """An open, checked connection at the current schema (created or migrated when `create`)."""
        if self.path.exists() and not self.path.is_file():
            raise UsageError(f"results store {str(self.path)!r} is not a regular file")
        if not create and not self.path.is_file():
            raise UsageError(f"no results store at {str(self.path)!r} (run `deploykit bench` first, or give --store)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_output_file(self.path)  # not a device, FIFO or directory; its directory is writable
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s)
            db.execute("PRAGMA foreign_keys = ON")
            self._check(db)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and create and not db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                db.execute("PRAGMA journal_mode = WAL")
                with db:
                    db.executescript(SCHEMA + MIGRATIONS[1])
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version in MIGRATIONS and create:
                self._migrate(db, version)
            elif version != SCHEMA_VERSION and version not in MIGRATIONS:
                raise ArtifactError(f"{str(self.path)!r} is not a deploykit results store "
                                    f"(schema version {version}, this deploykit reads 1..{SCHEMA_VERSION})")
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if _is_busy(exc):
                raise
            raise ArtifactError(f"cannot open results store {str(self.path)!r}: {exc}") from None
        except BaseException:
            if db is not None:
                db.close()
            raise
        return db

    def _check(self, db: sqlite3.Connection) -> None:
        """Refuse a damaged store before reading or writing anything in it."""
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise ArtifactError(f"results store {str(self.path)!r} is damaged (SQLite quick_check: {problems[0]}); "
                                "deploykit will not write into it: give another --store, and recover this one "
                                "with `sqlite3 FILE .recover`")

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        with db:
            while version < SCHEMA_VERSION:
                db.executescript(MIGRATIONS[version])
                version += 1
                db.execute(f"PRAGMA user_version = {version}")

    def _version(self, db: sqlite3.Connection) -> int:
        return db.execute("PRAGMA user_version").fetchone()[0]

    def _retrying(self, work: Callable[[], Any]) -> Any:
        """`work()`, tried again while the store is locked by someone else, `attempts` times."""
        for attempt in range(1, self.attempts + 1):
            try:
                return work()
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise ArtifactError(f"cannot write results store {str(self.path)!r}: {exc}") from None
                if attempt == self.attempts:
                    raise StoreError(f"results store {str(self.path)!r} stayed locked by another process "
                                     f"({self.attempts} attempts of {self.busy_timeout_s:g} s)") from None
                self._sleep(min(self.busy_timeout_s, 2.0 ** attempt))

    def check_writable(self) -> str | None:
        """Check the store now (open it, or the folder it will be created in), so that a bad path or a
        damaged store fails before a long run rather than after it; nothing is written yet. A store
        that is only busy now is fine: returns a note."""
        if not self.path.exists():
            folder = next(p for p in self.path.absolute().parents if p.exists())
            if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                raise UsageError(f"cannot create results store {str(self.path)!r}: {str(folder)!r} is not a writable "
                                 "directory")
            return None
        try:
            self._connect(create=False).close()
        except sqlite3.Error:
            return (f"the results store {str(self.path)!r} is locked by another process now; the run is written "
                    "when it ends (or to a JSON file beside it)")
        return None

    def save(self, run: NewRun) -> int:
        """Write one run with its records and failures in one transaction; returns the run's id. A run
        whose uid the store already holds is not written again: its id is returned."""
        return self.save_many([run])[0][0]

    def save_many(self, runs: Sequence[NewRun]) -> list[tuple[int, bool]]:
        """Write `runs` in one transaction: for each, (its id, whether it was added); a run whose uid the
        store already holds (or that came earlier in `runs`) is not written again. One pass whatever
        the number of runs: importing a store of thousands is one transaction, not one per run."""
        uids = [run.uid or str(uuid.uuid4()) for run in runs]

        def write() -> list[tuple[int, bool]]:
            with closing(self._connect(create=True)) as db, db:
                known = dict(db.execute("SELECT uid, id FROM runs WHERE uid IS NOT NULL").fetchall())
                out = []
                for run, uid in zip(runs, uids):
                    if uid in known:
                        out.append((known[uid], False))
                        continue
                    known[uid] = self._insert(db, run, uid)
                    out.append((known[uid], True))
                return out

        return self._retrying(write)

    @staticmethod
    def _insert(db: sqlite3.Connection, run: NewRun, uid: str) -> int:
        """Insert one run, its records and its failures (inside the caller's transaction); its id."""
        if run.status not in STATUSES:
            raise UsageError(f"a run's status must be one of {', '.join(STATUSES)}, got {run.status!r}")
        run_id = db.execute(
            "INSERT INTO runs (started_utc, finished_utc, status, command, git_revision, profile, conditions, "
            "uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run.started_utc, run.finished_utc or now_utc(), run.status, run.command, run.git_revision,
             run.profile, json.dumps(run.conditions), uid),
        ).lastrowid
        db.executemany(
            "INSERT INTO records (run_id, model, prune, sparsity, form, runtime, stage, device, batch_size, "
            "threads, p50_ms, iqr_ms, samples, disk_bytes, peak_rss_bytes, nonzero_parameters, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run_id, r.model, r.prune, r.sparsity, r.form, r.runtime, r.stage, r.device, r.batch_size,
              r.threads, r.measurement.median_ms, r.measurement.iqr_ms, len(r.measurement.samples_ns),
              # the raw record: statistics are derived when read (a bootstrap interval per record would make
              # importing thousands of runs take minutes), as `BenchRecord.from_dict` ignores them anyway
              r.disk_bytes, r.peak_rss_bytes, r.nonzero_parameters, json.dumps(asdict(r)))
             for r in run.records],
        )
        db.executemany("INSERT INTO failures (run_id, model, runtime, error, record) VALUES (?, ?, ?, ?, ?)",
                       [(run_id, f.model, f.runtime, f.error, json.dumps(f.to_dict())) for f in run.failures])
        return run_id

    def save_run(self, records: Sequence[BenchRecord], *, started_utc: str, status: str, command: str,
                 profile: str, conditions: dict[str, Any], failures: Sequence[FailedConfiguration] = ()) -> int:
        """Write one run and its records in one transaction; returns the run's id."""
        return self.save(NewRun(records, started_utc, status, command, profile, conditions, failures,
                                git_revision=git_revision()))

    def spill(self, run: NewRun) -> Path:
        """Write `run` as JSON beside the store (the store could not take it); returns the file.
        `deploykit report --import FILE` puts it into a store."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        uid = run.uid or str(uuid.uuid4())
        text = json.dumps({"format": SPILL_FORMAT, "version": SPILL_VERSION, "runs": [{**run.to_dict(), "uid": uid}]},
                          indent=1) + "\n"
        for directory in (self.path.parent, Path.cwd()):
            path = directory / f"{self.path.name}.unsaved-{stamp}-{os.getpid()}.json"
            try:
                write_text_atomic(path, text)
                return path
            except (OSError, UsageError, StoreError):
                continue
        raise StoreError(f"the run could not be stored in {str(self.path)!r} nor written beside it")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection to read from; what SQLite says of a store that is not ours (another schema,
        tables missing) or that stays locked becomes one line naming the store."""
        try:
            with closing(self._connect(create=False)) as db:
                yield db
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise StoreError(f"results store {str(self.path)!r} is locked by another process: {exc}") from None
            raise ArtifactError(f"cannot read results store {str(self.path)!r} (not a deploykit store of this "
                                f"schema, or damaged): {exc}") from None

    def _summaries(self, db: sqlite3.Connection) -> list[Run]:
        uid = ", uid" if self._version(db) >= 2 else ", NULL"
        rows = db.execute("SELECT id, started_utc, finished_utc, status, command, git_revision, profile, "
                          f"conditions{uid} FROM runs ORDER BY id").fetchall()
        out = []
        for row in rows:
            try:
                values = {name: check(value, kind, f"run {row[0]} {name}") for (name, kind), value in
                          zip(_SUMMARY_FIELDS.items(), (*row[:7], json.loads(row[7]), row[8]))}
            except (ValueError, TypeError, RecursionError) as exc:
                raise ArtifactError(f"results store {str(self.path)!r}: {exc}") from None
            out.append(Run(**values))
        return out

    def runs(self) -> list[Run]:
        """Every run, oldest first, without records."""
        with self._reading() as db:
            return self._summaries(db)

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
                raise UsageError(f"no run on profile {name!r} in this store (profiles in it: "
                                 f"{', '.join(sorted({r.profile for r in runs})) or 'none'}): bench on that machine "
                                 "and bring its runs here with `deploykit report --import ITS.sqlite`, or bench "
                                 "there through the fleet (docs/fleet.md)")
            chosen = matching[-1]
        else:
            by_id = {str(r.id): r for r in runs}
            if selector not in by_id:
                raise UsageError(f"no run {selector!r} in the store; runs: {', '.join(by_id)} (or 'last', 'profile:NAME')")
            chosen = by_id[selector]
        return self.with_records(chosen)

    def with_records(self, chosen: Run) -> Run:
        """`chosen` (one of `runs()`) with its records and failures."""
        with self._reading() as db:
            rows = db.execute("SELECT record FROM records WHERE run_id = ? ORDER BY id", (chosen.id,)).fetchall()
            failed = (db.execute("SELECT record FROM failures WHERE run_id = ? ORDER BY id", (chosen.id,)).fetchall()
                      if self._version(db) >= 2 else [])
        return self._filled(chosen, [row[0] for row in rows], [row[0] for row in failed])

    def all_runs(self) -> list[Run]:
        """Every run with its records and failures, read in one pass (what importing a store needs)."""
        records: dict[int, list[str]] = {}
        failures: dict[int, list[str]] = {}
        with self._reading() as db:
            summaries = self._summaries(db)
            for run_id, text in db.execute("SELECT run_id, record FROM records ORDER BY id"):
                records.setdefault(run_id, []).append(text)
            if self._version(db) >= 2:
                for run_id, text in db.execute("SELECT run_id, record FROM failures ORDER BY id"):
                    failures.setdefault(run_id, []).append(text)
        return [self._filled(run, records.get(run.id, []), failures.get(run.id, [])) for run in summaries]

    def _filled(self, chosen: Run, records: Sequence[str], failures: Sequence[str]) -> Run:
        """`chosen` with the records and failures stored as JSON texts, each checked."""
        try:
            kept = tuple(BenchRecord.from_dict(json.loads(text), f"record {i}") for i, text in enumerate(records))
            failed = tuple(FailedConfiguration.from_dict(json.loads(text), f"failure {i}")
                           for i, text in enumerate(failures))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise ArtifactError(f"results store {str(self.path)!r}: run {chosen.id} holds a malformed record "
                                f"({exc})") from None
        return Run(**{**chosen.__dict__, "records": kept, "failures": failed})


#: the columns a run's summary is read from, and their types
_SUMMARY_FIELDS = {"id": int, "started_utc": str, "finished_utc": str, "status": str, "command": str,
                   "git_revision": str | None, "profile": str, "conditions": dict[str, Any], "uid": str | None}


def read_spilled_runs(path: str | Path) -> list[NewRun]:
    """The runs in a JSON file `ResultStore.spill` wrote, every run and record checked before any is used."""
    text = read_text(path, "runs file", UsageError)
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != SPILL_FORMAT:
            raise ValueError(f"not a {SPILL_FORMAT} file")
        version = data.get("version", 1)
        if version != SPILL_VERSION:
            raise ValueError(f"layout version {version!r}; this deploykit reads version {SPILL_VERSION}")
        runs = check(data.get("runs"), list, "runs")
        return [NewRun.from_dict(run, f"runs[{i}]") for i, run in enumerate(runs)]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise UsageError(f"cannot import {str(path)!r}: {exc}") from None


def is_store_file(path: str | Path) -> bool:
    """Whether `path` is an SQLite file (a results store to import), by its header (a regular file:
    reading a FIFO would block)."""
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _content_uid(run: Run) -> str:
    """A unique id for a run stored before runs had one: the digest of what it holds, so that
    importing the same run twice still adds it once."""
    body = json.dumps([run.started_utc, run.finished_utc, run.command, run.profile, run.conditions,
                       [r.to_dict() for r in run.records]], sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def read_store_runs(path: str | Path, into: str | Path) -> list[NewRun]:
    """Every run of the results store at `path`, as runs to save into the store at `into`: the same
    records and failures, its unique id kept, and `conditions["imported_from"]` naming the store and
    the run's id there (the first import's, for a run that travelled through several stores). The
    store is read in one pass and checked as any other (damaged ones are refused, every record is
    validated before any run is used)."""
    if Path(path).resolve() == Path(into).resolve():
        raise UsageError(f"cannot import {str(path)!r}: it is the results store itself")
    out = []
    for run in ResultStore(path).all_runs():
        origin = {"store": str(Path(path).resolve()), "run": run.id}
        out.append(NewRun(run.records, run.started_utc, run.status, run.command, run.profile,
                          {"imported_from": origin, **run.conditions}, run.failures, git_revision=run.git_revision,
                          finished_utc=run.finished_utc, uid=run.uid or _content_uid(run)))
    return out
