"""Retraining jobs: the SQLite job store (WAL).

Policy: one training job at a time. A second request while one is ``queued``, ``running`` or
``publishing`` is refused (HTTP 409 naming the active job), never queued; a partial unique index
makes that hold even across processes sharing the database. The trainer's progress lines are
parsed by :mod:`service.core.progress`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from service.core.progress import ProgressEvent

SCHEMA_VERSION = 1


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    publishing = "publishing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"


ACTIVE_STATES = (JobState.queued, JobState.running, JobState.publishing)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled, JobState.interrupted)
_ACTIVE_SQL = "('queued', 'running', 'publishing')"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{{}}',
    request TEXT NOT NULL DEFAULT '{{}}',
    runner TEXT NOT NULL,
    runner_ref TEXT,
    work_dir TEXT NOT NULL,
    adapter TEXT,
    promoted INTEGER NOT NULL DEFAULT 0,
    gate TEXT,
    error TEXT,
    exit_code INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job ON jobs((state IN {_ACTIVE_SQL})) WHERE state IN {_ACTIVE_SQL};
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""


class JobConflict(Exception):
    """Another job is active; ``active_id`` names it."""

    def __init__(self, active_id: str):
        self.active_id = active_id
        super().__init__(f"job {active_id} is already active; one training job runs at a time")


class JobNotFound(Exception):
    pass


@dataclass
class Job:
    """One row of the job store."""

    id: str
    state: JobState
    stage: str | None
    progress: float
    metrics: dict[str, Any]
    request: dict[str, Any]
    runner: str
    runner_ref: str | None
    work_dir: str
    adapter: str | None
    promoted: bool
    gate: dict[str, Any] | None
    error: str | None
    exit_code: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @property
    def log_path(self) -> Path:
        return Path(self.work_dir) / "train.log"

    @property
    def output_dir(self) -> Path:
        return Path(self.work_dir) / "output"

    @property
    def config_path(self) -> Path:
        return Path(self.work_dir) / "config.yaml"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["metrics"] = json.loads(data["metrics"] or "{}")
        data["request"] = json.loads(data["request"] or "{}")
        data["gate"] = json.loads(data["gate"]) if data["gate"] else None
        data["promoted"] = bool(data["promoted"])
        return cls(**data)


_JSON_COLUMNS = {"metrics", "request", "gate"}
_COLUMNS = {"state", "stage", "progress", "metrics", "request", "runner_ref", "adapter", "promoted", "gate",
            "error", "exit_code", "started_at", "finished_at"}


class JobStore:
    """Jobs in ``jobs.sqlite`` (WAL); a short-lived connection per call, so any thread may use it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            yield conn
        finally:
            conn.close()

    @property
    def journal_mode(self) -> str:
        with self._connect() as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]

    def create(self, *, request: dict[str, Any], runner: str, work_root: Path) -> Job:
        """Insert a ``queued`` job, or raise :class:`JobConflict` if one is active."""
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        now = time.time()
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                active = conn.execute(f"SELECT id FROM jobs WHERE state IN {_ACTIVE_SQL} LIMIT 1").fetchone()
                if active:
                    raise JobConflict(active["id"])
                conn.execute(
                    "INSERT INTO jobs (id, state, request, runner, work_dir, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, JobState.queued.value, json.dumps(request), runner,
                     str(Path(work_root) / job_id), now, now))
                conn.execute("COMMIT")
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                active = self.active()
                raise JobConflict(active.id if active else "unknown") from None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_row(row)

    def list(self, limit: int = 50, state: JobState | None = None) -> list[Job]:
        """Newest first."""
        sql, args = "SELECT * FROM jobs", []
        if state is not None:
            sql, args = sql + " WHERE state = ?", [JobState(state).value]
        with self._connect() as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC, rowid DESC LIMIT ?", [*args, limit]).fetchall()
        return [Job.from_row(r) for r in rows]

    def active(self) -> Job | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT * FROM jobs WHERE state IN {_ACTIVE_SQL} LIMIT 1").fetchone()
        return Job.from_row(row) if row else None

    def update(self, job_id: str, *, only_if: tuple[JobState, ...] | None = None, **fields: Any) -> bool:
        """Set columns; with ``only_if``, only while the job is in one of those states. True if written."""
        unknown = set(fields) - _COLUMNS
        if unknown:
            raise ValueError(f"unknown job columns {sorted(unknown)}")
        values = []
        for key, value in fields.items():
            if key in _JSON_COLUMNS and value is not None:
                value = json.dumps(value)
            elif isinstance(value, JobState):
                value = value.value
            elif isinstance(value, bool):
                value = int(value)
            values.append(value)
        sets = ", ".join(f"{k} = ?" for k in fields) + (", " if fields else "") + "updated_at = ?"
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args = [*values, time.time(), job_id]
        if only_if:
            sql += f" AND state IN ({', '.join('?' for _ in only_if)})"
            args += [JobState(s).value for s in only_if]
        with self._connect() as conn:
            return conn.execute(sql, args).rowcount == 1

    def record_progress(self, job_id: str, event: ProgressEvent) -> None:
        """Apply one progress event (stage, progress, merged metrics) to an active job."""
        job = self.get(job_id)
        fields: dict[str, Any] = {}
        if event.stage is not None:
            fields["stage"] = event.stage
        if event.progress is not None:
            fields["progress"] = event.progress
        if event.metrics:
            fields["metrics"] = {**job.metrics, **event.metrics}
        if fields:
            self.update(job_id, only_if=ACTIVE_STATES, **fields)

    def active_jobs(self) -> list[Job]:
        with self._connect() as conn:
            rows = conn.execute(f"SELECT * FROM jobs WHERE state IN {_ACTIVE_SQL}").fetchall()
        return [Job.from_row(r) for r in rows]

    def interrupt(self, job: Job) -> bool:
        """Mark one job a previous process left active ``interrupted``."""
        return self.update(job.id, only_if=ACTIVE_STATES, state=JobState.interrupted, finished_at=time.time(),
                           error=f"the gateway stopped while the job was {job.state.value}")

    def interrupt_active(self) -> list[Job]:
        """On start-up: every job a previous process left active becomes ``interrupted``."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT * FROM jobs WHERE state IN {_ACTIVE_SQL}").fetchall()
        jobs = [Job.from_row(r) for r in rows]
        now = time.time()
        for job in jobs:
            self.update(job.id, only_if=ACTIVE_STATES, state=JobState.interrupted, finished_at=now,
                        error=f"the gateway stopped while the job was {job.state.value}")
        return jobs

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zeros included)."""
        counts = {s.value: 0 for s in JobState}
        with self._connect() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                counts[row["state"]] = row["n"]
        return counts

    def last_success_time(self) -> float | None:
        with self._connect() as conn:
            row = conn.execute("SELECT MAX(finished_at) FROM jobs WHERE state = 'succeeded'").fetchone()
        return row[0]


def tail_lines(path: Path, lines: int = 50, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines of a (log) file, reading at most ``max_bytes`` from its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # first line is probably cut
    return text[-lines:] if lines > 0 else []
