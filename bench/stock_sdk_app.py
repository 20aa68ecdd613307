"""The same models and input through the MONAI Deploy SDK's stock operators (benchmark baseline).

    python bench/stock_sdk_app.py -i CT_FOLDER -o OUTPUT -m MODELS [--timings FILE.json]

Graph (every operator is the SDK's own class)::

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (rule: Modality CT)
      -> DICOMSeriesToVolumeOperator -+-> MonaiSegInferenceOperator[hn_oar]    -> DICOMSegmentationWriterOperator
                                      +-> MonaiSegInferenceOperator[hn_target] -> DICOMSegmentationWriterOperator
    (the selector's series list also feeds both writers)

Needs PyTorch and MONAI core next to the SDK (MonaiSegInferenceOperator runs TorchScript
through MONAI transforms and ``sliding_window_inference``); the app in ``app.py`` needs
neither.  This file is a benchmark baseline, not a product: it writes one DICOM-SEG per
model and nothing else (no RTSTRUCT, no report, no post-processing).

What had to be adapted, and nothing more (see docs/benchmark.md):

* Model repository.  Our ``models/<name>/`` folders hold model.onnx + model.ts +
  model.yaml; the SDK's ``NamedModel`` accepts a folder only if each model sub-folder
  holds exactly ONE file, otherwise ``AppContext.models`` becomes a bare ``Model`` of the
  folder and ``MonaiSegInferenceOperator`` fails with ``ItemNotExistsError: A model with
  'hn_oar' does not exist``.  So a one-file-per-folder repository of symbolic links to
  each ``model.ts`` is staged and given to ``AppContext``.
* Pre/post transforms.  ``MonaiSegInferenceOperator`` is used the documented way: a
  subclass overriding ``pre_process`` / ``post_process`` (the base class raises
  NotImplementedError).  The transforms are written from each model.yaml (see
  ``pre_process``).
* Timing only: each operator class is subclassed to time its ``compute`` (behaviour
  unchanged), and the TorchScript predictor is loaded in ``compose`` (the SDK would load it
  lazily on the first window, inside the inference stage) so start-up and inference are
  separated as they are in our app's report.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from autocontour.structures import structure  # noqa: E402  (no numpy, no DICOM)

# autocontour.inference's body crop (not imported: it would load scipy before the timers start)
BODY_HU = -400.0
BODY_MARGIN_MM = 16.0

SECONDS: dict[str, float] = {}
INFO: dict = {}

# The SDK examples' selection rule minus ImageType PRIMARY/ORIGINAL (the benchmark CT is
# DERIVED\SECONDARY, as many planning CTs are).
RULES = json.dumps({"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]})


def _add(name: str, seconds: float) -> None:
    SECONDS[name] = round(SECONDS.get(name, 0.0) + seconds, 3)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, required=True, help="folder of DICOM files")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("-m", "--models", type=Path, default=ROOT / "models",
                    help="our models folder (*/model.yaml + model.ts)")
    ap.add_argument("--timings", type=Path, help="write per-stage seconds as JSON here")
    ap.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (ours uses 2)")
    ap.add_argument("-l", "--log-level", default="INFO")
    return ap.parse_args(argv)


def read_models(models_dir: Path) -> list[dict]:
    """name, labels, kind, spacing, window, patch and the TorchScript path of each model.yaml."""
    out = []
    for meta in sorted(models_dir.glob("*/model.yaml")):
        cfg = yaml.safe_load(meta.read_text())
        ts = cfg["files"].get("torchscript")
        if not ts:
            raise SystemExit(f"{meta}: no files.torchscript entry - the stock chain runs TorchScript only")
        out.append({
            "name": str(cfg["name"]),
            "ts_path": meta.parent / ts["path"],
            "kind": str(cfg["output"]["kind"]),
            "labels": [str(v) for v in cfg["output"]["labels"]],
            "spacing_zyx": [float(v) for v in cfg["input"]["spacing_zyx_mm"]],
            "window_hu": [float(v) for v in cfg["input"]["window_hu"]],
            "patch_zyx": [int(v) for v in cfg["input"]["patch_zyx"]],
        })
    if not out:
        raise SystemExit(f"no */model.yaml under {models_dir}")
    return out


def stage_named_model_repository(models: list[dict], where: Path) -> Path:
    """<where>/<name>/model.ts -> our model.ts: the one-file-per-folder layout NamedModel accepts."""
    for m in models:
        d = where / m["name"]
        d.mkdir(parents=True, exist_ok=True)
        link = d / "model.ts"
        if not link.exists():
            link.symlink_to(Path(m["ts_path"]).resolve())
    return where


def build_app(args: argparse.Namespace, models: list[dict], repo: Path):
    t = time.perf_counter()
    import torch
    from pydicom.sr.coding import Code as PdCode

    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import AppContext, Application
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
    from monai.deploy.operators.monai_seg_inference_operator import MonaiSegInferenceOperator
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Invertd,
        Lambdad,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    _add("startup_imports", time.perf_counter() - t)
    INFO["torch"] = torch.__version__
    INFO["torch_threads"] = torch.get_num_threads()
    INFO["device"] = "cuda" if torch.cuda.is_available() else "cpu"

    def timed(cls):
        """``cls`` with its compute() timed into SECONDS[<operator name>]; nothing else changes."""

        class Timed(cls):
            def compute(self, op_input, op_output, context):
                t0 = time.perf_counter()
                try:
                    return super().compute(op_input, op_output, context)
                finally:
                    _add(self.name, time.perf_counter() - t0)
                    SECONDS["total_in_graph"] = round(time.perf_counter() - T_PROCESS, 3)

        Timed.__name__ = Timed.__qualname__ = cls.__name__
        return Timed

    class ModelSegInference(MonaiSegInferenceOperator):
        """MonaiSegInferenceOperator with MONAI transforms written from one model.yaml.

        Pre: load the SDK Image -> channel first -> orientation SPL (array axes towards
        superior, posterior, patient left = the canonical (z, y, x) frame the models were
        trained in) -> spacing (z, y, x) mm, bilinear -> clip to the HU window and scale to
        0..1 -> crop to the body (> BODY_HU) with the same 16 mm margin as ours.
        Post: softmax+argmax (exclusive labels) or sigmoid+0.5 (independent labels), then
        invert every pre transform with nearest-neighbour interpolation of the labels.
        """

        def __init__(self, fragment, *a, model: dict, **kw):
            self.model = model
            super().__init__(fragment, *a, **kw)
            self._model = CountingPredictor(self._model, model["name"])

        def pre_process(self, img_reader, *args, **kwargs):
            m, key = self.model, self._input_dataset_key
            lo, hi = m["window_hu"]
            body = (BODY_HU - lo) / (hi - lo)
            margin = [int(math.ceil(BODY_MARGIN_MM / s)) for s in m["spacing_zyx"]]
            return Compose([
                LoadImaged(keys=key, reader=img_reader),
                EnsureChannelFirstd(keys=key),
                Orientationd(keys=key, axcodes="SPL"),
                Spacingd(keys=key, pixdim=m["spacing_zyx"], mode="bilinear"),
                ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
                CropForegroundd(keys=key, source_key=key, select_fn=lambda x: x > body, margin=margin,
                                allow_smaller=True),
            ])

        def post_process(self, pre_transforms, *args, **kwargs):
            key = self._pred_dataset_key
            if self.model["kind"] == "softmax":
                act = [Activationsd(keys=key, softmax=True), AsDiscreted(keys=key, argmax=True)]
            else:
                # the stock SEG writer takes one label map: independent labels are numbered 1..N
                # where > 0.5; nested ones (PTV_High in PTV_Mid in PTV_Low, labels listed
                # innermost first) share it with the innermost level winning, so its SEG holds the
                # levels as rings (what a stock-SDK user would write; the same writing work)
                act = [Activationsd(keys=key, sigmoid=True), AsDiscreted(keys=key, threshold=0.5)]
                if len(self.model["labels"]) > 1:
                    act.append(Lambdad(keys=key, func=_innermost_label_map))
            return Compose([
                *act,
                Invertd(keys=key, transform=pre_transforms, orig_keys=self._input_dataset_key, nearest_interp=True),
            ])

    def _innermost_label_map(x):
        """(C, ...) 0/1 channels -> (1, ...) label map, channel c as c + 1, the lowest c winning."""
        out = torch.zeros_like(x[:1])
        for c in reversed(range(x.shape[0])):
            out[0][x[c] > 0] = c + 1
        return out

    class CountingPredictor:
        """Times the network's forward passes and counts windows (timing only)."""

        def __init__(self, model, name: str):
            self.model, self.name = model, name

        def __call__(self, x, *a, **kw):
            t0 = time.perf_counter()
            y = self.model(x, *a, **kw)
            _add(f"torch_forward_{self.name}", time.perf_counter() - t0)
            windows = INFO.setdefault("windows", {})
            windows[self.name] = windows.get(self.name, 0) + int(x.shape[0])
            return y

    def pd_code(c):
        return PdCode(c.value, c.scheme, c.meaning)

    class StockApp(Application):
        def compose(self):
            t0 = time.perf_counter()
            app_context = AppContext({"input": str(args.input), "output": str(args.output), "model": str(repo)})
            out = Path(app_context.output_path)
            loader = timed(DICOMDataLoaderOperator)(
                self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="load"
            )
            selector = timed(DICOMSeriesSelectorOperator)(self, rules=RULES, name="select")
            to_volume = timed(DICOMSeriesToVolumeOperator)(self, name="convert")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            for m in models:
                t_model = time.perf_counter()
                _ = app_context.models.get(m["name"]).predictor  # load now, not inside the first window
                _add("startup_models", time.perf_counter() - t_model)
                infer = timed(ModelSegInference)(
                    self, model=m, roi_size=tuple(m["patch_zyx"]), pre_transforms=None, post_transforms=None,
                    app_context=app_context, model_name=m["name"], overlap=0.25, sw_batch_size=args.sw_batch_size,
                    mode="gaussian", name=f"inference_{m['name']}",
                )
                descriptions = [
                    SegmentDescription(
                        segment_label=label,
                        segmented_property_category=pd_code(structure(label).category),
                        segmented_property_type=pd_code(structure(label).type),
                        algorithm_name="stock SDK chain (benchmark)",
                        algorithm_version=m["name"],
                    )
                    for label in m["labels"]
                ]
                writer = timed(DICOMSegmentationWriterOperator)(
                    self, segment_descriptions=descriptions, output_folder=out,
                    custom_tags={"SeriesDescription": f"stock SDK {m['name']} (benchmark)"},
                    name=f"write_seg_{m['name']}",
                )
                self.add_flow(to_volume, infer, {("image", "image")})
                self.add_flow(infer, writer, {("seg_image", "seg_image")})
                self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
            # the graph without the model loads (those are startup_models)
            _add("startup_graph", time.perf_counter() - t0 - SECONDS.get("startup_models", 0.0))

    return StockApp()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = read_models(args.models)
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stock-models-") as tmp:
        repo = stage_named_model_repository(models, Path(tmp))
        app = build_app(args, models, repo)
        app.run()
    SECONDS["total_process_python"] = round(time.perf_counter() - T_PROCESS, 3)
    INFO["outputs"] = sorted(p.name for p in args.output.glob("*.dcm"))
    if args.timings:
        args.timings.parent.mkdir(parents=True, exist_ok=True)
        args.timings.write_text(json.dumps({"seconds": SECONDS, "info": INFO}, indent=1))
    logging.getLogger("stock_sdk_app").info("stages: %s", json.dumps(SECONDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
