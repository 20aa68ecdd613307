"""Job records on disk: one JSON file per study, so that nothing is lost when the node stops.

States (``Job.state``)::

    queued ──> running ──> stored ──> delivered
      ^           │          │  ^
      │           v          v  │ (resend)
      │         error      failed
      └─ rerun / restart (running -> queued)

- ``queued``: stable study waiting to be contoured (also a study re-queued after a restart).
- ``running``: its CT is being exported or the app is running.
- ``stored``: the results are in Orthanc; a C-STORE to the destination is due at ``next_delivery``
  (``None`` without a destination: the results stay in Orthanc).
- ``delivered``: the destination accepted every result (C-STORE succeeded).
- ``failed``: every C-STORE attempt failed; ``POST /autocontour/jobs/{id}/resend`` tries again.
- ``error``: the study could not be contoured (no CT series, the app's exit code and message).

A record is written to a temporary file and renamed over the old one (atomic on POSIX), after
every change.  Standard library only (imported inside Orthanc's Python).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QUEUED, RUNNING, STORED, DELIVERED, FAILED, ERROR = "queued", "running", "stored", "delivered", "failed", "error"
STATES = (QUEUED, RUNNING, STORED, DELIVERED, FAILED, ERROR)
TERMINAL = (DELIVERED, FAILED, ERROR)
HISTORY_LIMIT = 200


def _now_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Job:
    """One study's record.  ``study`` is Orthanc's study identifier (a hash of the StudyInstanceUID)."""

    study: str
    state: str = QUEUED
    created: float = 0.0
    updated: float = 0.0
    study_uid: str = ""
    patient_id: str = ""
    attempt: int = 0                       # contouring runs started
    fingerprint: list[str] = field(default_factory=list)  # the CT series contoured: "uid:instances"
    ct_series: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # stored into Orthanc: file, orthanc_id, modality
    delivery_attempts: int = 0
    next_delivery: float | None = None
    error: str | None = None
    app_pid: int | None = None
    recheck: bool = False                  # a STABLE_STUDY arrived after this record was made
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What ``GET /autocontour/jobs`` lists per study."""
        return {
            "study": self.study, "study_uid": self.study_uid, "patient_id": self.patient_id, "state": self.state,
            "updated": _now_iso(self.updated), "attempt": self.attempt, "delivery_attempts": self.delivery_attempts,
            "results": len(self.results), "error": self.error,
        }

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_utc"] = _now_iso(self.created)
        d["updated_utc"] = _now_iso(self.updated)
        d["next_delivery_utc"] = _now_iso(self.next_delivery) if self.next_delivery is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        names = set(cls.__dataclass_fields__)
        job = cls(**{k: v for k, v in d.items() if k in names})
        if job.state not in STATES:
            raise ValueError(f"unknown state {job.state!r}")
        return job


class JobStore:
    """All records, in memory and under ``directory`` (one ``<study>.json`` each); thread-safe."""

    def __init__(self, directory: Path, clock=time.time) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                bad = path.with_suffix(".unreadable")
                os.replace(path, bad)
                logger.error("job record %s is unreadable (%s): moved to %s", path, exc, bad.name)
                continue
            self._jobs[job.study] = job

    def get(self, study: str) -> Job | None:
        with self.lock:
            return self._jobs.get(study)

    def all(self) -> list[Job]:
        """Every record, oldest first."""
        with self.lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created, j.study))

    def create(self, study: str, message: str = "study stable") -> Job:
        with self.lock:
            t = self.clock()
            job = Job(study=study, created=t, updated=t)
            job.history.append({"time": _now_iso(t), "state": QUEUED, "message": message})
            self._jobs[study] = job
            self._write(job)
            return job

    @contextmanager
    def update(self, study: str) -> Iterator[Job]:
        """``with store.update(id) as job: job.x = ...``: changed under the lock, then written."""
        with self.lock:
            job = self._jobs[study]
            yield job
            job.updated = self.clock()
            self._write(job)

    def transition(self, study: str, state: str, message: str = "", **changes: Any) -> Job:
        """Set ``state`` (and any other fields), log it in the record's history and write it."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self.update(study) as job:
            for key, value in changes.items():
                if key not in Job.__dataclass_fields__:
                    raise AttributeError(key)
                setattr(job, key, value)
            job.state = state
            job.history.append({"time": _now_iso(self.clock()), "state": state, "message": message})
            del job.history[:-HISTORY_LIMIT]
        return job

    def _write(self, job: Job) -> None:
        path = self.directory / f"{job.study}.json"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(job.as_dict(), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
