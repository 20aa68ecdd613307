"""Time (and optionally cProfile) each pure stage of the pipeline in one process.

    python bench/profile_stages.py [-i CT] [-m models] [--repeats 3] [--profile STAGE]

The same functions the operators call (``scan_folder``/``select_series``, ``build_volume``,
``Segmenter.predict`` per model, ``external_structure``, ``postprocess``,
``build_seg``, ``build_rtstruct``, ``write_dataset``, ``write_qa``), without Holoscan, each
repeated ``--repeats`` times on the same input;
the table shows the fastest run of each (the machine's noise only adds time), in wall
and in CPU seconds (all threads of the process; steadier on a busy machine).  The first
run of a stage includes its one-off costs (imports, first-touch of new memory), so the table
shows it too.  This is the tool for finding where the time goes; the end-to-end figures
are ``bench/run_benchmark.py``'s.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_INPUT = Path("/work/shared/data/hn-chus-052/CT")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("-m", "--models", type=Path, default=ROOT / "models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", help="cProfile this stage's last run and print the top entries")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    from autocontour.ct_volume import build_volume
    from pydicom.uid import generate_uid

    from autocontour.dicom_seg import build_seg
    from autocontour.model_config import load_models
    from autocontour.postprocess import external_structure, postprocess
    from autocontour.segmenter import open_segmenters
    from autocontour.dicom_elements import write_dataset
    from autocontour.rtstruct import build_rtstruct
    from autocontour.qa import write_qa
    from autocontour.series_selection import SelectionRules, scan_folder, select_series
    from autocontour.structures import STRUCTURES

    print(f"imports {time.perf_counter() - t0:.3f} s")
    segmenters = open_segmenters(load_models(args.models), "cpu")
    rules = SelectionRules.from_yaml(ROOT / "config" / "series_selection.yaml")
    out = Path(tempfile.mkdtemp(prefix="profile-stages-"))
    kw = dict(algorithm_name="profile", algorithm_version="0", series_description="profile")
    state: dict = {}

    def select():
        state["series"] = select_series(scan_folder(args.input)[0], rules, args.input)

    def convert():
        state["volume"] = build_volume(state["series"])

    def infer(segmenter):
        def run():
            segmenter.grid_cache.clear()  # the shared model-grid image is part of the cost
            state.setdefault("masks", {}).update(segmenter.predict(state["volume"]))
        return run

    def external():
        state["external"] = external_structure(state["volume"])

    def post():
        masks = state["masks"]
        state["results"] = postprocess(state["volume"], {s.name: masks[s.name] for s in STRUCTURES if s.name in masks},
                                       external=state["external"])

    def seg():
        state["seg"] = build_seg(state["volume"], {n: r.mask for n, r in state["results"].items()}, **kw)

    def rts():
        state["rts"] = build_rtstruct(state["volume"], {n: r.mask for n, r in state["results"].items()}, **kw)

    def qa():
        qa_dir = Path(tempfile.mkdtemp(prefix="profile-qa-", dir=out))
        write_qa(state["volume"], state["results"], qa_dir, series_instance_uid=generate_uid(),
                 algorithm_name="profile", algorithm_version="0")

    stages = [("select", select), ("convert", convert)]
    stages += [(f"inference_{s.name}", infer(s)) for s in segmenters]
    stages += [
        ("external", external),
        ("postprocess", post),
        ("build_seg", seg), ("write_seg", lambda: write_dataset(state["seg"], out / "seg.dcm")),
        ("build_rtstruct", rts), ("write_rtstruct", lambda: write_dataset(state["rts"], out / "rts.dcm")),
        ("qa (render, PNG, SC)", qa),
    ]
    rows = []
    for name, fn in stages:
        times = []
        for r in range(args.repeats):
            prof = cProfile.Profile() if (args.profile == name and r == args.repeats - 1) else None
            t, c = time.perf_counter(), time.process_time()
            if prof:
                prof.enable()
            fn()
            dt = (time.perf_counter() - t, time.process_time() - c)
            if prof:
                prof.disable()
            times.append(dt)
            if name == "convert":
                select()  # build_volume consumes the series' pixel data: a fresh one, untimed
            if prof:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        rows.append((name, times[0][0], min(t[0] for t in times), min(t[1] for t in times)))
    print(f"{'stage':<26}{'first s':>9}{'best s':>9}{'best CPU s':>12}")
    for name, first, best, cpu in rows:
        print(f"{name:<26}{first:>9.3f}{best:>9.3f}{cpu:>12.3f}")
    print(f"{'sum':<26}{sum(r[1] for r in rows):>9.3f}{sum(r[2] for r in rows):>9.3f}{sum(r[3] for r in rows):>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
