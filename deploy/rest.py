"""The node's REST routes, served by Orthanc (same port, same password) under /autocontour.

    GET  /autocontour/jobs                 every study's state (oldest first), the destination
    GET  /autocontour/jobs/{id}            one record with its history; {id}: Orthanc's study id
                                           or the StudyInstanceUID
    POST /autocontour/jobs/{id}/resend     C-STORE the results again (a ``failed`` job, typically)
    POST /autocontour/jobs/{id}/rerun      contour a finished study again

``handle`` maps a request to (HTTP status, JSON-able answer); the Orthanc glue only copies it
out.  Standard library only (imported inside Orthanc's Python).
"""

from __future__ import annotations

from typing import Any

from deploy.pipeline import Conflict, Node

ROUTE = r"/autocontour/jobs(/.*)?"  # registered with orthanc.RegisterRestCallback


def handle(node: Node, method: str, tail: str | None) -> tuple[int, dict[str, Any]]:
    """``tail``: what follows /autocontour/jobs ('' or None, '/{id}', '/{id}/resend', '/{id}/rerun').
    A 405 answer names the allowed method under "allow"."""
    parts = [p for p in (tail or "").split("/") if p]
    if not parts:
        if method != "GET":
            return 405, {"error": f"{method} not allowed on /autocontour/jobs - use GET", "allow": "GET"}
        jobs = node.store.all()
        return 200, {
            "destination": node.policy.address or None,
            "busy": node.busy,
            "counts": {s: sum(j.state == s for j in jobs) for s in sorted({j.state for j in jobs})},
            "jobs": [j.summary() for j in jobs],
        }
    key = parts[0]
    if len(parts) == 1:
        if method != "GET":
            return 405, {"error": f"{method} not allowed on /autocontour/jobs/{key} - use GET", "allow": "GET"}
        job = node.find(key)
        if job is None:
            return 404, {"error": f"no job for study {key}"}
        return 200, job.as_dict()
    if len(parts) == 2 and parts[1] in ("resend", "rerun"):
        if method != "POST":
            return 405, {"error": f"{method} not allowed on /autocontour/jobs/{key}/{parts[1]} - use POST",
                         "allow": "POST"}
        try:
            job = node.resend(key) if parts[1] == "resend" else node.rerun(key)
        except KeyError:
            return 404, {"error": f"no job for study {key}"}
        except Conflict as exc:
            return 409, {"error": str(exc)}
        return 200, job.summary()
    return 404, {"error": f"unknown route /autocontour/jobs{tail} - see docs/deployment.md"}
