"""Stand-ins for Orthanc's REST API and for the app, so the worker's logic runs without Orthanc."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from deploy.pipeline import ApiError
from deploy.runner import AppRunner, RunResult

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOP_CLASSES = {"RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3", "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
               "OT": "1.2.840.10008.5.1.4.1.1.7", "CT": CT_STORAGE, "MR": "1.2.840.10008.5.1.4.1.1.4",
               "RTDOSE": "1.2.840.10008.5.1.4.1.1.481.2"}


def orthanc_id(uid: str) -> str:
    """Orthanc-like identifier: a hash of the UID, in 5 dash-separated groups."""
    h = hashlib.sha1(uid.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def dicom_bytes(modality: str, study_uid: str, series_uid: str, sop_uid: str | None = None) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
    ds.PatientID = "P1"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class FakeOrthanc:
    """The REST calls ``deploy.pipeline`` makes, on an in-memory index of real DICOM bytes."""

    def __init__(self) -> None:
        self.instances: dict[str, bytes] = {}
        self.index: dict[str, dict[str, Any]] = {}   # study id -> {uid, series: {id: {...}}}
        self.destination_up = True
        self.delivered: list[list[str]] = []          # one entry per successful C-STORE call
        self.store_calls = 0
        self.lock = threading.Lock()

    def add(self, data: bytes) -> dict[str, Any]:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        study, series, inst = (orthanc_id(ds.StudyInstanceUID), orthanc_id(ds.SeriesInstanceUID),
                               orthanc_id(ds.SOPInstanceUID))
        with self.lock:
            status = "AlreadyStored" if inst in self.instances else "Success"
            self.instances[inst] = data
            st = self.index.setdefault(study, {"uid": ds.StudyInstanceUID, "series": {}})
            se = st["series"].setdefault(series, {"uid": ds.SeriesInstanceUID, "modality": ds.Modality,
                                                  "instances": []})
            if inst not in se["instances"]:
                se["instances"].append(inst)
        return {"ID": inst, "ParentSeries": series, "ParentStudy": study, "Status": status}

    def add_series(self, modality: str, study_uid: str, n: int) -> str:
        series_uid = generate_uid()
        for _ in range(n):
            self.add(dicom_bytes(modality, study_uid, series_uid))
        return orthanc_id(study_uid)

    # --- OrthancApi ---
    def get_json(self, uri: str) -> Any:
        parts = uri.strip("/").split("/")
        with self.lock:
            if parts == ["studies"]:
                return list(self.index)
            if parts[0] == "studies" and parts[1] in self.index:
                st = self.index[parts[1]]
                if len(parts) == 2:
                    return {"ID": parts[1], "MainDicomTags": {"StudyInstanceUID": st["uid"]},
                            "PatientMainDicomTags": {"PatientID": "P1"}, "Series": list(st["series"])}
                return [{"ID": sid, "MainDicomTags": {"Modality": s["modality"], "SeriesInstanceUID": s["uid"]},
                         "Instances": list(s["instances"])} for sid, s in st["series"].items()]
            if parts[0] == "series":
                for st in self.index.values():
                    if parts[1] in st["series"]:
                        s = st["series"][parts[1]]
                        return {"ID": parts[1], "MainDicomTags": {"Modality": s["modality"]}}
        raise ApiError(f"{uri}: Orthanc error 17 (Unknown resource)")

    def get_bytes(self, uri: str) -> bytes:
        parts = uri.strip("/").split("/")
        if parts[0] == "instances" and parts[1] in self.instances:
            return self.instances[parts[1]]
        raise ApiError(f"{uri}: Orthanc error 17 (Unknown resource)")

    def post_json(self, uri: str, body: Any) -> Any:
        assert uri == "/modalities/destination/store", uri
        assert body["Synchronous"] is True
        self.store_calls += 1
        if not self.destination_up:
            raise ApiError(f"{uri}: Orthanc error 9 (Error in the network protocol)")
        missing = [i for i in body["Resources"] if i not in self.instances]
        if missing:
            raise ApiError(f"{uri}: Orthanc error 17 (Unknown resource)")
        self.delivered.append(list(body["Resources"]))
        return {}

    def post_dicom(self, data: bytes) -> dict[str, Any]:
        return self.add(data)


class FakeApp(AppRunner):
    """Writes what the app writes (an RTSTRUCT, a SEG, report.json) plus a QA series in a sub-folder
    and a DICOM file inside a hidden staging folder (which must be ignored); records its runs."""

    name = "fake"

    def __init__(self, returncode: int = 0, message: str = "", write: bool = True, seconds: float = 0.0) -> None:
        super().__init__(timeout_s=60)
        self.returncode, self.message, self.write, self.seconds = returncode, message, write, seconds
        self.runs: list[tuple[Path, float, float, int]] = []   # input folder, start, end, files in it

    def run(self, input_dir: Path, output_dir: Path, log: Path, stop, on_start=None) -> RunResult:
        t0 = time.monotonic()
        if on_start:
            on_start(99999999)
        files = sorted(input_dir.glob("*.dcm"))
        time.sleep(self.seconds)
        if self.returncode == 0 and self.write:
            ct = pydicom.dcmread(files[0], stop_before_pixels=True)
            output_dir.mkdir(parents=True, exist_ok=True)
            for modality in ("RTSTRUCT", "SEG"):
                (output_dir / f"{ct.SeriesInstanceUID}_{modality}.dcm").write_bytes(
                    dicom_bytes(modality, ct.StudyInstanceUID, generate_uid()))
            (output_dir / "qa").mkdir()
            (output_dir / "qa" / "sc1.dcm").write_bytes(dicom_bytes("OT", ct.StudyInstanceUID, generate_uid()))
            (output_dir / "report.json").write_text("{}")
            (output_dir / ".autocontour-staging-x").mkdir()
            (output_dir / ".autocontour-staging-x" / "left.dcm").write_bytes(
                dicom_bytes("SEG", ct.StudyInstanceUID, generate_uid()))
        log.write_text(f"ERROR hn-autocontour: {self.message}\n" if self.message else "ok\n")
        self.runs.append((input_dir, t0, time.monotonic(), len(files)))
        return RunResult(self.returncode, time.monotonic() - t0, log, self.message)
