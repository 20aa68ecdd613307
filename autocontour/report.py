"""The machine-readable report: what was contoured, from what, how, and how long it took."""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import asdict

from autocontour import APP_NAME, __version__
from autocontour.gpu import gpu_snapshot
from autocontour.postprocess import StructureResult
from autocontour.run_record import RunRecord
from autocontour.structures import EXTERNAL, structure

__all__ = ["build_report", "REPORT_SCHEMA_VERSION"]

REPORT_SCHEMA_VERSION = 1


def build_report(record: RunRecord, results: dict[str, StructureResult]) -> dict:
    structures = []
    for name, r in results.items():
        d = structure(name)
        structures.append(
            {
                "name": name,
                "rt_roi_interpreted_type": d.rt_roi_interpreted_type,
                "volume_cc": round(r.volume_cc, 3),
                "centroid_lps_mm": r.centroid_lps,
                "components_removed": r.components_removed,
                "removed_cc": round(r.removed_cc, 3),
                "holes_filled_cc": round(r.holes_filled_cc, 3),
                "outside_external_clipped_cc": round(r.clipped_cc, 3),
                "added_from_contained_cc": round(r.added_from_contained_cc, 3),
                "removed_components": r.removals,
                **({"objects_left_out_cc": round(r.excluded_cc, 1)} if name == EXTERNAL else {}),
                "flags": r.flags,
            }
        )
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "application": {"name": APP_NAME, "version": __version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "UNAPPROVED automatic proposal: review every structure before clinical use",
        "input": {
            "path": str(record.input_path),
            **(asdict(record.series) if record.series is not None else {}),
            **(asdict(record.volume) if record.volume is not None else {}),
        },
        "models": [asdict(m) for m in record.models],
        "outputs": {
            k: asdict(f)
            for k, f in (("seg", record.seg), ("rtstruct", record.rtstruct), ("qa", record.qa))
            if f is not None
        },
        "structures": structures,
        "flags": [f"{s['name']}: {f}" for s in structures for f in s["flags"]],
        # wall seconds per stage; with graph_workers > 1 the model branches (and the two
        # writers) run side by side, so their stages overlap and do not add up to the total
        "seconds": record.seconds,
        "host": {
            "python": platform.python_version(), "machine": platform.machine(),
            "graph_workers": record.graph_workers,
            # sampled through the run when a model ran on the GPU, else one snapshot (None without a GPU)
            "gpu": record.gpu_monitor.summary() if record.gpu_monitor is not None else gpu_snapshot(),
        },
    }
