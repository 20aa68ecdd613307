"""Head-and-neck auto-contouring MAP: DICOM CT in, DICOM-SEG + RTSTRUCT + report.json out.

    python app.py -i INPUT -o OUTPUT [-m MODELS] [-w WORKDIR] [--backend auto|tensorrt|cuda|cpu] [--no-qa]

Paths default to HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH /
HOLOSCAN_WORKDIR, then to ``input``, ``output``, this repo's ``models/`` and OUTPUT's
staging folder.  Exit codes: see ``autocontour.errors`` (0 = contours written).

Graph::

    SeriesSelector -> CTVolume -+-> Segmentation[hn_oar]    -+-> Postprocess -+-> DicomSegWriter  -+-> Report
                                +-> Segmentation[hn_target] -+                +-> RtstructWriter  -+
                                +-> External                -+                +-> QA (PNG + SC)   -+  (not with --no-qa)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# No network, nothing written outside OUTPUT and the work directory: ONNX Runtime (>= 1.2x on
# Linux) otherwise writes a device id under ~/.cache and a session file under TMPDIR and looks
# up its telemetry host at run time.  Set before ONNX Runtime creates its environment.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from autocontour import APP_NAME, __version__  # noqa: E402
from autocontour.backends import GPU_BACKENDS  # noqa: E402
from autocontour.errors import AutoContourError, InputError  # noqa: E402
from autocontour.gpu import GpuMonitor  # noqa: E402
from autocontour.model_config import load_models  # noqa: E402
from autocontour.output import discard, prepare_staging  # noqa: E402
from autocontour.qa import QA_SERIES_DESCRIPTION  # noqa: E402
from autocontour.run_record import ModelUsed, RunRecord  # noqa: E402
from autocontour.segmenter import Segmenter, open_segmenters  # noqa: E402
from autocontour.series_selection import DEFAULT_RULES_PATH, SelectionRules  # noqa: E402

logger = logging.getLogger(APP_NAME)

REPO_MODELS = Path(__file__).resolve().parent / "models"
SERIES_DESCRIPTION = "AUTO proposal - review before use"  # <= 64 chars (LO)
# The event-based scheduler ends the run when no operator is ready and none is running.
# With no grace period it can decide that in the instant between an operator's output and
# its receivers becoming ready, and stop a run half-way (seen on a loaded 2-core machine:
# 1 run in 12 stopped after CTVolume).  The run's real end waits this long once.
DEADLOCK_GRACE_MS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The MONAI Deploy app flags (-i/-o/-m/-w), defaulting to the HOLOSCAN_* variables."""
    env = os.environ
    ap = argparse.ArgumentParser(prog="app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, default=Path(env.get("HOLOSCAN_INPUT_PATH", "input")))
    ap.add_argument("-o", "--output", type=Path, default=Path(env.get("HOLOSCAN_OUTPUT_PATH", "output")))
    ap.add_argument("-m", "--model", type=Path, default=Path(env.get("HOLOSCAN_MODEL_PATH", REPO_MODELS)))
    ap.add_argument("-w", "--workdir", type=Path, default=Path(env["HOLOSCAN_WORKDIR"]) if env.get("HOLOSCAN_WORKDIR") else None)
    ap.add_argument("--backend", default=env.get("AUTOCONTOUR_BACKEND", "auto"), help="auto, tensorrt, cuda or cpu")
    ap.add_argument("--workers", type=int, default=int(env.get("AUTOCONTOUR_WORKERS", "2")),
                    help="graph worker threads (1: one operator at a time; default 2)")
    ap.add_argument("--no-qa", action="store_true",
                    help="skip the QA pictures (OUTPUT/qa/*.png and the Secondary Capture series)")
    ap.add_argument("--rules", type=Path, default=DEFAULT_RULES_PATH, help="series selection rules (YAML)")
    ap.add_argument("-l", "--log-level", default=env.get("AUTOCONTOUR_LOG_LEVEL", "INFO"))
    return ap.parse_args(argv)


def build_app(args: argparse.Namespace, record: RunRecord, segmenters: list[Segmenter], rules: SelectionRules):
    """The operator graph as a MONAI Deploy ``Application`` (imports the SDK lazily)."""
    from monai.deploy.core import Application
    from monai.deploy.conditions import CountCondition

    from operators import (
        CTVolumeOperator,
        DicomSegWriterOperator,
        ExternalOperator,
        MergeStructuresOperator,
        PostprocessOperator,
        QaOperator,
        ReportOperator,
        RtstructWriterOperator,
        SegmentationOperator,
        SeriesSelectorOperator,
    )

    algorithm_version = f"{__version__} (" + ", ".join(f"{s.model.name} {s.model.version}" for s in segmenters) + ")"

    class AutoContourApp(Application):
        def compose(self):
            # the graph's root runs exactly once: one input folder, one series, one result
            select = SeriesSelectorOperator(self, CountCondition(self, 1), input_folder=args.input, rules=rules,
                                            record=record, name="select")
            volume = CTVolumeOperator(self, record=record, name="volume")
            post = MergeStructuresOperator(self, branches=[s.name for s in segmenters], record=record, name="postprocess")
            writer_kw = dict(record=record, algorithm_name=APP_NAME, algorithm_version=algorithm_version,
                             series_description=SERIES_DESCRIPTION)
            seg = DicomSegWriterOperator(self, name="seg_writer", **writer_kw)
            rts = RtstructWriterOperator(self, name="rtstruct_writer", **writer_kw)
            qa = None if args.no_qa else QaOperator(self, name="qa", **{**writer_kw, "series_description": QA_SERIES_DESCRIPTION})
            report = ReportOperator(self, record=record, with_qa=qa is not None, name="report")

            self.add_flow(select, volume, {(select.OUT_SERIES, volume.IN_SERIES)})
            self.add_flow(volume, post, {(volume.OUT_VOLUME, post.IN_VOLUME)})
            # the External needs the CT alone: it runs beside the models
            external = ExternalOperator(self, record=record, name="external")
            self.add_flow(volume, external, {(volume.OUT_VOLUME, external.IN_VOLUME)})
            self.add_flow(external, post, {(external.OUT_EXTERNAL, post.IN_EXTERNAL)})
            for segmenter in segmenters:
                # each model's structures are post-processed as soon as it is done, beside the
                # models still running; the merge then joins them
                branch = SegmentationOperator(self, segmenter=segmenter, record=record, name=f"seg_{segmenter.name}")
                branch_post = PostprocessOperator(self, branch=segmenter.name, record=record,
                                                  name=f"postprocess_{segmenter.name}")
                self.add_flow(volume, branch, {(volume.OUT_VOLUME, branch.IN_VOLUME)})
                self.add_flow(volume, branch_post, {(volume.OUT_VOLUME, branch_post.IN_VOLUME)})
                self.add_flow(external, branch_post, {(external.OUT_EXTERNAL, branch_post.IN_EXTERNAL)})
                self.add_flow(branch, branch_post, {(branch.OUT_MASKS, branch_post.IN_MASKS)})
                self.add_flow(branch_post, post, {(branch_post.OUT_STRUCTURES, post.in_structures(segmenter.name))})
            for writer in (seg, rts) + ((qa,) if qa is not None else ()):
                self.add_flow(volume, writer, {(volume.OUT_VOLUME, writer.IN_VOLUME)})
                self.add_flow(post, writer, {(post.OUT_STRUCTURES, writer.IN_STRUCTURES)})
            self.add_flow(post, report, {(post.OUT_STRUCTURES, report.IN_STRUCTURES)})
            self.add_flow(seg, report, {(seg.OUT_DONE, report.IN_SEG)})
            self.add_flow(rts, report, {(rts.OUT_DONE, report.IN_RTSTRUCT)})
            if qa is not None:
                self.add_flow(qa, report, {(qa.OUT_DONE, report.IN_QA)})

    app = AutoContourApp()
    if args.workers > 1:
        # the two model branches, and the two writers, run side by side: ONNX Runtime and
        # numpy release the GIL, so the second core works while the first runs Python
        from holoscan.schedulers import EventBasedScheduler

        app.scheduler(EventBasedScheduler(app, name="scheduler", worker_thread_number=args.workers,
                                          stop_on_deadlock=True, stop_on_deadlock_timeout=DEADLOCK_GRACE_MS))
    return app


def run(argv: list[str] | None = None) -> int:
    """Run the app once; returns the process exit code."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    staging = None
    record = None
    try:
        if not args.input.is_dir():
            raise InputError(f"input folder {args.input} does not exist - pass -i with a folder of DICOM files")
        rules = SelectionRules.from_yaml(args.rules)
        models = load_models(args.model)
        staging = prepare_staging(args.output)
        record = RunRecord(args.input, args.output, staging)
        record.started = t0
        record.graph_workers = args.workers
        workdir = args.workdir or staging
        # CuPy (imported by MONAI) creates its kernel cache folder on import: keep it in the work dir
        os.environ.setdefault("CUPY_CACHE_DIR", str(Path(workdir).resolve() / "cupy-kernel-cache"))
        with record.stage("startup_models"):
            segmenters = open_segmenters(models, args.backend, workdir, concurrent=args.workers)
        if any(s.backend.name in GPU_BACKENDS for s in segmenters):
            # GPU memory and utilisation through the run, for report.json
            record.gpu_monitor = GpuMonitor.start()
        if args.workdir is None and any(s.backend.name == "tensorrt" for s in segmenters):
            logger.warning(
                "TensorRT engines are built in the staging folder and discarded after this run; "
                "pass -w DIR (or HOLOSCAN_WORKDIR) to keep them, so that later runs skip the engine build"
            )
        record.models = [
            ModelUsed(s.model.name, s.model.version, s.model.onnx_sha256, s.backend.name, list(s.model.labels))
            for s in segmenters
        ]
        with record.stage("startup_sdk"):
            app = build_app(args, record, segmenters, rules)
        app.run()
        if not record.committed:
            raise AutoContourError(
                "the operator graph stopped before the report operator ran (a scheduler failure, not the input); "
                "no output written - run again"
            )
    except AutoContourError as exc:
        discard(staging)
        logger.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    except Exception:  # an unexpected failure: full traceback, no partial output
        discard(staging)
        logger.exception("internal error; no output written")
        return AutoContourError.exit_code
    finally:
        if record is not None and record.gpu_monitor is not None:
            record.gpu_monitor.stop()
    logger.info("done in %.1f s", time.perf_counter() - t0)
    return 0


def main() -> None:
    """The command line: run once, then leave without the interpreter's teardown.

    By the time ``run`` returns every output is committed into OUTPUT (or discarded) and
    every file closed; what is left is the interpreter's and Holoscan's teardown, about
    0.3 s of destructors and freeing on hn-chus-052 (docs/benchmark.md). The logs and the
    standard streams are flushed, then the process ends with ``run``'s exit code.
    """
    rc = run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
