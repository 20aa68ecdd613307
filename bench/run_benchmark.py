"""End-to-end benchmark: our app vs the SDK's stock operators, plus ONNX Runtime alone.

    python bench/run_benchmark.py [--runs 3] [--warmup 1] [-m models] [--json FILE]
    make bench                      # the same with the defaults, models/ and build/bench/

What it measures (details and caveats: docs/benchmark.md):

* ``ours``: ``app.py -i CT -o OUT -m MODELS`` as a fresh process per run
  (``bash -c "ulimit -s 32768; exec python app.py ..."``): process wall time (start to
  exit), peak RSS (``/usr/bin/time -v``; else ``os.wait4``'s ``ru_maxrss``; plus a sampled
  sum over the process tree), CPU user/sys seconds, and report.json's per-stage seconds.
  By default it runs in a *runtime-only* environment: a venv whose site-packages are
  links to this venv's, minus torch and MONAI core, because MONAI core's
  ``monai/__init__.py`` imports torch and every MONAI sub-package as soon as
  ``monai.deploy`` is imported.  The app's image (requirements.txt) has neither.
* ``stock``: ``bench/stock_sdk_app.py`` (the SDK's DICOM loader, selector, series-to-volume,
  MonaiSegInferenceOperator on each model.ts, DICOM-SEG writer), same measurements, in this
  venv (it needs torch + MONAI core + nibabel).
* ``inference``: each model's ONNX Runtime session on its model-grid crop in a fresh
  process (``Segmenter.predict`` with ``sliding_window`` and the session timed),
  so the "< 5 s for both models" figure is measured apart from I/O and start-up.
* ``agreement``: Dice between our SEG and the stock SEGs of the last run (same structures),
  a check that both pipelines computed the same thing on the same geometry.

Runs of ours and stock are interleaved (ours-stock, stock-ours, ...) so drifting machine
load hits both alike; the table shows medians.  Nothing here changes the app.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path("/work/shared/data/hn-chus-052/CT")
GNU_TIME = Path("/usr/bin/time")
STACK_KB = 32768  # as `make run`: deep recursion in the contour tracer
# excluded from the runtime-only environment: what the app never imports
NOT_RUNTIME = ("torch", "functorch", "torchgen", "nibabel")
PUBLISHED = [
    ("MONAI Deploy spleen segmentation app (SDK docs/examples)", "15-25 s per CT", "NVIDIA GV100 GPU"),
    ("TotalSegmentator --fast (3 mm)", "34 s per CT", "NVIDIA RTX 3090 GPU"),
]


# ----------------------------------------------------------------------------- processes


def _tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and its descendants (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return total


def _parse_gnu_time(path: Path) -> dict:
    keys = {
        "Maximum resident set size (kbytes)": "max_rss_kb",
        "User time (seconds)": "user_s",
        "System time (seconds)": "sys_s",
        "Elapsed (wall clock) time (h:mm:ss or m:ss)": "elapsed",
        "Exit status": "exit_status",
    }
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        for k, name in keys.items():
            if line.startswith(k + ":"):
                out[name] = line.split(":", 1)[1].strip()
    return out


def run_measured(argv: list[str], log: Path, env: dict | None = None, sample_s: float = 0.1) -> dict:
    """Run ``argv`` (through bash with the app's stack limit) as a fresh process and measure it."""
    inner = f"ulimit -s {STACK_KB}; exec " + " ".join(shlex.quote(a) for a in argv)
    use_time = GNU_TIME.is_file() and os.access(GNU_TIME, os.X_OK)
    tfile = log.with_suffix(".time")
    cmd = ([str(GNU_TIME), "-v", "-o", str(tfile)] if use_time else []) + ["bash", "-c", inner]
    peak_tree = 0
    done = threading.Event()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)

        def sample():
            nonlocal peak_tree
            while not done.is_set():
                peak_tree = max(peak_tree, _tree_rss_kb(proc.pid))
                done.wait(sample_s)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "command": inner,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_tree_rss_mb_sampled": round(peak_tree / 1024, 1),
        "log": str(log),
    }
    if use_time and tfile.is_file():
        gt = _parse_gnu_time(tfile)
        res.update(
            peak_rss_mb=round(int(gt["max_rss_kb"]) / 1024, 1),
            cpu_user_s=float(gt["user_s"]),
            cpu_sys_s=float(gt["sys_s"]),
            peak_rss_source="/usr/bin/time -v (Maximum resident set size)",
        )
        if "exit_status" in gt:
            res["exit_code"] = int(gt["exit_status"])
    else:
        # wait4 on the direct child: ru_maxrss (kB) is the largest of it and its waited-for children
        res.update(
            peak_rss_mb=round(rusage.ru_maxrss / 1024, 1),
            cpu_user_s=round(rusage.ru_utime, 2),
            cpu_sys_s=round(rusage.ru_stime, 2),
            peak_rss_source="os.wait4 ru_maxrss",
        )
    return res


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


# ----------------------------------------------------------------------------- environments


def _site_packages(python: str) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.check_output([python, "-c", code], text=True)
    return Path(out.strip())


def _has_monai_core(python: str) -> bool:
    code = "import importlib.util as u, sys; s = u.find_spec('monai'); sys.exit(0 if s and s.origin else 1)"
    return subprocess.run([python, "-c", code]).returncode == 0


def build_runtime_env(source_python: str, where: Path) -> str:
    """A venv whose site-packages links to ``source_python``'s, minus torch and MONAI core.

    ``monai/`` becomes a plain folder holding only a link to the SDK's ``monai/deploy``, so
    ``monai`` is a namespace package as in the app's image.  Same files, same versions.
    """
    src = _site_packages(source_python)
    if where.exists():
        shutil.rmtree(where)
    subprocess.check_call([source_python, "-m", "venv", "--without-pip", str(where)])
    py = str(where / "bin" / "python")
    dst = _site_packages(py)
    for entry in sorted(src.iterdir()):
        name = entry.name
        low = name.lower()
        if low == "monai" or low.startswith("monai-") and not low.startswith("monai_deploy"):
            continue
        if any(low == p or low.startswith(p + "-") or low.startswith(p + ".") for p in NOT_RUNTIME):
            continue
        (dst / name).symlink_to(entry)
    (dst / "monai").mkdir()
    (dst / "monai" / "deploy").symlink_to(src / "monai" / "deploy")
    check = (
        "import importlib.util as u; import monai.deploy.core, onnxruntime, holoscan; "
        "assert u.find_spec('torch') is None, 'torch visible'; "
        "import monai; assert getattr(monai, '__file__', None) is None, 'MONAI core visible'"
    )
    inner = f"ulimit -s {STACK_KB}; exec {shlex.quote(py)} -c {shlex.quote(check)}"
    subprocess.check_call(["bash", "-c", inner], cwd=ROOT)
    return py


def import_probe(python: str, repeats: int = 3) -> dict:
    """Seconds to import the SDK core as the app does (fresh interpreter each time)."""
    code = (
        "import time; t = time.perf_counter(); from monai.deploy.core import Application; "
        "from monai.deploy.conditions import CountCondition; print(time.perf_counter() - t)"
    )
    times = []
    for _ in range(repeats):
        out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            return {"error": out.stderr[-500:]}
        times.append(float(out.stdout.strip().splitlines()[-1]))
    torch_loaded = subprocess.run(
        [python, "-c", "import sys, monai.deploy.core; sys.exit(0 if 'torch' in sys.modules else 1)"],
        cwd=ROOT, capture_output=True,
    ).returncode == 0
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times],
            "imports_torch": torch_loaded}


# ----------------------------------------------------------------------------- helpers run in a child


def child_inference(args: argparse.Namespace) -> dict:
    """ONNX Runtime alone on each model's crop (run in a fresh process by the driver)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as app.py
    import autocontour.inference as inf
    from autocontour.ct_volume import build_volume
    from autocontour.model_config import load_models
    from autocontour.segmenter import ModelGridCache, Segmenter
    from autocontour.series_selection import SelectionRules, scan_folder, select_series

    t = time.perf_counter()
    cands, _ = scan_folder(args.input)
    volume = build_volume(select_series(cands, SelectionRules.from_yaml(), args.input))
    load_s = time.perf_counter() - t
    stats: dict = {}
    original = inf.sliding_window

    def timed_sliding_window(image, patch, predict, n_out, *a, **kw):
        stats["crop_shape_zyx"] = list(image.shape)
        t0 = time.perf_counter()
        out = original(image, patch, predict, n_out, *a, **kw)
        stats["sliding_window_s"] = time.perf_counter() - t0
        return out

    inf.sliding_window = timed_sliding_window
    result = {"volume_shape_kji": list(volume.array.shape), "load_and_convert_s": round(load_s, 3),
              "threads": os.cpu_count(), "models": {}}
    grid_cache = ModelGridCache()  # shared by the models, as in the app
    with tempfile.TemporaryDirectory() as work:
        for model in load_models(args.models):
            t = time.perf_counter()
            segmenter = Segmenter.open(model, args.infer_backend, work, grid_cache)
            backend = segmenter.backend
            session_s = time.perf_counter() - t
            run_predict = backend.predict
            calls = {"n": 0, "windows": 0, "s": 0.0}

            def predict(x, _p=run_predict, _c=calls):
                t1 = time.perf_counter()
                y = _p(x)
                _c["s"] += time.perf_counter() - t1
                _c["n"] += 1
                _c["windows"] += x.shape[0]
                return y

            backend.predict = predict
            reps = []
            for _ in range(args.infer_repeats):
                calls.update(n=0, windows=0, s=0.0)
                t = time.perf_counter()
                segmenter.predict(volume)
                reps.append({"segment_s": time.perf_counter() - t, "sliding_window_s": stats["sliding_window_s"],
                             "ort_run_s": calls["s"], "ort_calls": calls["n"], "windows": calls["windows"]})
            med = {k: round(statistics.median(r[k] for r in reps), 3)
                   for k in ("segment_s", "sliding_window_s", "ort_run_s")}
            result["models"][model.name] = {
                "backend": backend.name,
                "session_create_s": round(session_s, 3),
                "crop_shape_zyx": stats["crop_shape_zyx"],
                "patch_zyx": list(model.patch_zyx),
                "windows": reps[0]["windows"],
                "ort_calls": reps[0]["ort_calls"],
                "median": med,
                "first_ort_run_s": round(reps[0]["ort_run_s"], 3),
                "repeats": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in reps],
                "ort_s_per_window": round(med["ort_run_s"] / max(1, reps[0]["windows"]), 4),
            }
    result["both_models_ort_run_s"] = round(sum(m["median"]["ort_run_s"] for m in result["models"].values()), 3)
    result["both_models_segment_s"] = round(sum(m["median"]["segment_s"] for m in result["models"].values()), 3)
    return result


def child_agreement(args: argparse.Namespace) -> dict:
    """Dice of our SEG vs the stock SEGs, structure by structure, on our volume's grid."""
    import numpy as np
    import pydicom

    from autocontour.ct_volume import build_volume
    from autocontour.readback import read_seg_masks
    from autocontour.series_selection import SelectionRules, scan_folder, select_series
    from autocontour.structures import STRUCTURES

    cands, _ = scan_folder(args.input)
    volume = build_volume(select_series(cands, SelectionRules.from_yaml(), args.input))

    def masks_in(folder: Path) -> dict:
        out = {}
        for f in sorted(Path(folder).glob("*.dcm")):
            ds = pydicom.dcmread(f)
            if ds.Modality == "SEG":
                out.update(read_seg_masks(ds, volume))
        return out

    ours, stock = masks_in(args.ours_output), masks_in(args.stock_output)
    # the stock chain writes nested levels as rings of one label map (innermost wins): put
    # each level back together with the levels inside it (the table's ``contains``, in table
    # order: PTV_Mid gets PTV_High, then PTV_Low gets the whole PTV_Mid) before comparing
    for outer in STRUCTURES:
        for inner in outer.contains:
            if inner in stock and outer.name in stock:
                stock[outer.name] = stock[outer.name] | stock[inner]
    voxel_cc = volume.voxel_volume_cc
    res = {}
    for name in ours:
        a = ours[name]
        b = stock.get(name)
        if b is None:
            res[name] = {"dice": None, "note": "not in the stock output"}
            continue
        inter, sa, sb = int(np.logical_and(a, b).sum()), int(a.sum()), int(b.sum())
        res[name] = {
            "dice": round(2 * inter / (sa + sb), 4) if sa + sb else None,
            "ours_cc": round(sa * voxel_cc, 2),
            "stock_cc": round(sb * voxel_cc, 2),
        }
    return res


def _child(mode: str, python: str, extra: list[str], out_json: Path, log: Path) -> dict:
    cmd = ["bash", "-c", f"ulimit -s {STACK_KB}; exec " + " ".join(
        shlex.quote(a) for a in [python, str(Path(__file__).resolve()), mode, "--child-out", str(out_json), *extra])]
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out_json.is_file():
        return {"error": f"exit {rc}; log {log}:\n{_tail(log, 25)}"}
    return json.loads(out_json.read_text())


# ----------------------------------------------------------------------------- the driver


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _stage_rows(ours_runs: list[dict], stock_runs: list[dict], model_names: list[str]) -> list[tuple]:
    """(label, ours median, stock median) per comparable stage."""

    def med(runs, *keys):
        vals = []
        for r in runs:
            s = r.get("stages") or {}
            if any(k in s for k in keys):
                vals.append(sum(s.get(k, 0.0) for k in keys))
        return _median(vals)

    rows = [
        ("start-up: SDK/framework imports + graph", med(ours_runs, "startup_sdk"),
         med(stock_runs, "startup_imports", "startup_graph")),
        ("start-up: models loaded", med(ours_runs, "startup_models"), med(stock_runs, "startup_models")),
        ("load (ours: headers; stock: whole files)", med(ours_runs, "load"), med(stock_runs, "load")),
        ("select series", med(ours_runs, "select"), med(stock_runs, "select")),
        ("convert to volume", med(ours_runs, "convert"), med(stock_runs, "convert")),
    ]
    for m in model_names:
        key = f"inference_{m}"
        rows.append((f"inference {m} (incl. pre/post)", med(ours_runs, key), med(stock_runs, key)))
    rows += [
        ("External (beside the models)", med(ours_runs, "external"), None),
    ]
    for m in model_names:
        rows.append((f"post-processing {m} (in its branch)", med(ours_runs, f"postprocess_{m}"), None))
    rows += [
        ("post-processing: merge", med(ours_runs, "postprocess"), None),
        ("write DICOM-SEG", med(ours_runs, "write_seg"), med(stock_runs, *[f"write_seg_{m}" for m in model_names])),
        ("write RTSTRUCT", med(ours_runs, "write_rtstruct"), None),
        ("QA sheet (PNG + Secondary Capture)", med(ours_runs, "write_qa"), None),
        ("in-graph total (as the app reports it)", med(ours_runs, "total_in_graph"), med(stock_runs, "total_in_graph")),
    ]
    return rows


def _fmt(v, unit="s"):
    if v is None:
        return "-"
    return f"{v:.1f} {unit}" if unit else f"{v:.1f}"


def print_report(res: dict) -> None:
    ours, stock = res["runs"].get("ours", []), res["runs"].get("stock", [])
    names = res["model_names"]
    print()
    print("=" * 78)
    print(f"Benchmark {res['created']}  host {res['host']['node']}  cpus {res['host']['cpus']}  "
          f"load avg at start {res['host']['loadavg_start']}")
    print(f"input {res['input']}   models {res['models']}   runs {res['runs_requested']} (+{res['warmup']} warm-up)")
    if res["host"]["loadavg_start"][0] > 0.5 * res["host"]["cpus"]:
        print("WARNING: the machine was busy when the benchmark started; these timings are inflated.")
    print("-" * 78)
    w = 44
    print(f"{'median of runs':<{w}} {'ours':>14} {'stock SDK':>14}")

    def row(label, a, b, unit="s"):
        print(f"{label:<{w}} {_fmt(a, unit):>14} {_fmt(b, unit):>14}")

    ow = _median([r["wall_s"] for r in ours]) if ours else None
    sw = _median([r["wall_s"] for r in stock]) if stock else None
    row("process wall time (start to exit)", ow, sw)
    def both(fn):
        return (_median([fn(r) for r in ours]) if ours else None, _median([fn(r) for r in stock]) if stock else None)

    row("peak RSS, MB (/usr/bin/time -v)", *both(lambda r: r.get("peak_rss_mb")), "")
    row("peak RSS of process tree, MB (sampled)", *both(lambda r: r.get("peak_tree_rss_mb_sampled")), "")
    row("CPU time user+sys", *both(lambda r: r.get("cpu_user_s", 0) + r.get("cpu_sys_s", 0)))
    print("-" * 78)
    for label, a, b in _stage_rows(ours, stock, names):
        row(label, a, b)
    print("-" * 78)
    if ow and sw:
        print(f"ratio stock / ours (process wall time): {sw / ow:.2f}x")
    if ours:
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in ours)
        print(f"ours: all wall times {walls} s; python {res['ours_python']}")
    if stock:
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in stock)
        print(f"stock: all wall times {walls} s; python {res['stock_python']}")
        wins = [r.get("stock_windows") for r in stock if r.get("stock_windows")]
        if wins:
            fwd = {m: _median([r.get("stages", {}).get(f"torch_forward_{m}") for r in stock]) for m in names}
            print("stock: TorchScript forward passes only: " + ", ".join(
                f"{m} {fwd[m]} s for {wins[-1].get(m)} windows" for m in names))
    inf = res.get("inference")
    if inf and "error" not in inf:
        print("-" * 78)
        print(f"ONNX Runtime alone ({inf['threads']} threads; median of {res['infer_repeats']}; "
              f"volume {inf['volume_shape_kji']}):")
        for name, m in inf["models"].items():
            med = m["median"]
            print(f"  {name:<12} {m['backend']:<5} crop {m['crop_shape_zyx']} patch {m['patch_zyx']} "
                  f"windows {m['windows']}: session.run {med['ort_run_s']:.2f} s "
                  f"({m['ort_s_per_window']:.3f} s/window), "
                  f"sliding window {med['sliding_window_s']:.2f} s, whole segment() {med['segment_s']:.2f} s, "
                  f"session create {m['session_create_s']:.2f} s")
        target = "meets" if inf["both_models_ort_run_s"] < 5 else "misses"
        print(f"  both models: session.run {inf['both_models_ort_run_s']:.2f} s ({target} the < 5 s target), "
              f"segment() {inf['both_models_segment_s']:.2f} s")
    elif inf:
        print("inference-only measurement failed: " + inf["error"])
    probes = res.get("import_probe")
    if probes:
        print("-" * 78)
        for k, v in probes.items():
            if "error" in v:
                print(f"import of monai.deploy.core ({k}): failed {v['error'][:200]}")
            else:
                print(f"import of monai.deploy.core ({k}): {v['median_s']:.2f} s, pulls in torch: {v['imports_torch']}")
    agr = res.get("agreement")
    if agr and "error" not in agr:
        print("-" * 78)
        print("agreement with the stock chain (last run), Dice (ours cc / stock cc):")
        for k, v in agr.items():
            d = "-" if v.get("dice") is None else f"{v['dice']:.3f}"
            print(f"  {k:<14} {d:>6}  ({v.get('ours_cc', '-')} / {v.get('stock_cc', '-')})")
    elif agr:
        print("agreement check failed: " + agr["error"][:500])
    print("-" * 78)
    print("stock chain output: DICOM-SEG only (one per model); no RTSTRUCT, no report, no post-processing.")
    print("published anchors: " + "; ".join(f"{a}: {b} on {c}" for a, b, c in PUBLISHED))
    print(f"JSON: {res['json']}")
    print("=" * 78)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, default=DEFAULT_INPUT,
                    help="CT folder (default: hn-chus-052, 132 x 512 x 512)")
    ap.add_argument("-m", "--models", type=Path, default=ROOT / "models")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each app (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each app first (page cache, .pyc)")
    ap.add_argument("--json", type=Path, help="result file (default build/bench/benchmark-<UTC time>.json)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench", help="outputs, logs, runtime env")
    ap.add_argument("--backend", default="auto", help="our app's --backend (default auto)")
    ap.add_argument("--infer-backend", default="cpu", help="backend of the inference-only measurement (default cpu)")
    ap.add_argument("--infer-repeats", type=int, default=3)
    ap.add_argument("--python", dest="ours_python", help="interpreter for our app (default: runtime-only env, see doc)")
    ap.add_argument("--same-venv", action="store_true",
                    help="run our app in this venv even if torch/MONAI core are in it")
    ap.add_argument("--stock-python", default=sys.executable,
                    help="interpreter with torch + MONAI core for the stock app")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["ours", "stock", "inference", "agreement", "imports"],
                    help="leave a part out (repeatable)")
    # internal: the helper modes run in a child process
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "_inference", "_agreement"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ours-output", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stock-output", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mode != "bench":
        sys.path.insert(0, str(ROOT))
        out = child_inference(args) if args.mode == "_inference" else child_agreement(args)
        args.child_out.write_text(json.dumps(out, indent=1))
        return 0

    args.input, args.models = args.input.resolve(), args.models.resolve()
    if not args.input.is_dir():
        sys.exit(f"input {args.input} not found")
    if not list(args.models.glob("*/model.yaml")):
        sys.exit(f"no */model.yaml under {args.models} (pass -m)")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = (args.json or work / f"benchmark-{stamp}.json").resolve()
    logs = work / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)

    venv_python = str(Path(sys.executable))
    if args.ours_python:
        ours_python = args.ours_python
    elif not args.same_venv and _has_monai_core(venv_python):
        print("torch/MONAI core are importable here: building the runtime-only environment for our app ...", flush=True)
        ours_python = build_runtime_env(venv_python, work / "runtime-venv")
    else:
        ours_python = venv_python

    import yaml

    model_names = [yaml.safe_load(p.read_text())["name"] for p in sorted(args.models.glob("*/model.yaml"))]
    res: dict = {
        "created": stamp,
        "input": str(args.input),
        "models": str(args.models),
        "model_names": model_names,
        "model_versions": {p.parent.name: yaml.safe_load(p.read_text()).get("version")
                           for p in sorted(args.models.glob("*/model.yaml"))},
        "runs_requested": args.runs,
        "warmup": args.warmup,
        "infer_repeats": args.infer_repeats,
        "ours_python": ours_python,
        "stock_python": args.stock_python,
        "backend": args.backend,
        "host": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "json": str(json_path),
        "runs": {"ours": [], "stock": []},
        "warmup_runs": {"ours": [], "stock": []},
    }

    def ours_cmd(out: Path) -> list[str]:
        return [ours_python, "app.py", "-i", str(args.input), "-o", str(out), "-m", str(args.models),
                "--backend", args.backend]

    def stock_cmd(out: Path, timings: Path) -> list[str]:
        return [args.stock_python, "bench/stock_sdk_app.py", "-i", str(args.input), "-o", str(out),
                "-m", str(args.models), "--timings", str(timings)]

    last_out = {}

    def one(kind: str, label: str) -> dict:
        out = work / "out" / kind
        if out.exists():
            shutil.rmtree(out)
        log = logs / f"{kind}-{label}.log"
        if kind == "ours":
            r = run_measured(ours_cmd(out), log)
            rep = out / "report.json"
            if rep.is_file():
                report = json.loads(rep.read_text())
                r["stages"] = report.get("seconds", {})
                r["backends"] = {m["name"]: m.get("backend") for m in report.get("models", [])}
        else:
            timings = logs / f"stock-{label}.timings.json"
            r = run_measured(stock_cmd(out, timings), log)
            if timings.is_file():
                t = json.loads(timings.read_text())
                r["stages"] = t.get("seconds", {})
                r["stock_info"] = t.get("info", {})
                r["stock_windows"] = t.get("info", {}).get("windows")
        r["outputs"] = sorted(p.name for p in out.glob("*")) if out.exists() else []
        status = "ok" if r["exit_code"] == 0 else f"FAILED (exit {r['exit_code']})"
        print(f"  {kind:<5} {label:<9} {status}: wall {r['wall_s']:.1f} s, peak RSS {r.get('peak_rss_mb')} MB",
              flush=True)
        if r["exit_code"] != 0:
            print(_tail(log), flush=True)
        last_out[kind] = out
        return r

    kinds = [k for k in ("ours", "stock") if k not in args.skip]
    print(f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus; logs in {logs}", flush=True)
    for i in range(args.warmup):
        for k in kinds:
            res["warmup_runs"][k].append(one(k, f"warmup{i + 1}"))
    for i in range(args.runs):
        order = kinds if i % 2 == 0 else kinds[::-1]
        for k in order:
            res["runs"][k].append(one(k, f"run{i + 1}"))

    if "inference" not in args.skip:
        print("  inference-only (ONNX Runtime on the model-grid crops) ...", flush=True)
        res["inference"] = _child("_inference", ours_python,
                                  ["-i", str(args.input), "-m", str(args.models), "--infer-backend", args.infer_backend,
                                   "--infer-repeats", str(args.infer_repeats)],
                                  logs / "inference.json", logs / "inference.log")
    if "agreement" not in args.skip and "ours" in last_out and "stock" in last_out:
        res["agreement"] = _child("_agreement", ours_python,
                                  ["-i", str(args.input), "--ours-output", str(last_out["ours"]),
                                   "--stock-output", str(last_out["stock"])],
                                  logs / "agreement.json", logs / "agreement.log")
    if "imports" not in args.skip:
        res["import_probe"] = {"ours_python": import_probe(ours_python)}
        if args.stock_python != ours_python:
            res["import_probe"]["stock_python"] = import_probe(args.stock_python)
    res["host"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["summary"] = {
        "ours_wall_s_median": _median([r["wall_s"] for r in res["runs"]["ours"]]),
        "stock_wall_s_median": _median([r["wall_s"] for r in res["runs"]["stock"]]),
        "stages": [{"stage": a, "ours_s": b, "stock_s": c}
                   for a, b, c in _stage_rows(res["runs"]["ours"], res["runs"]["stock"], model_names)],
    }
    s = res["summary"]
    if s["ours_wall_s_median"] and s["stock_wall_s_median"]:
        s["ratio_stock_over_ours"] = round(s["stock_wall_s_median"] / s["ours_wall_s_median"], 2)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1))
    print_report(res)
    failed = [r for k in res["runs"] for r in res["runs"][k] if r["exit_code"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
