"""QA output of one run: the QA sheet as PNG files and as a DICOM Secondary Capture series.

``write_qa`` renders the pages (``autocontour.qa_render``), writes ``qa/qa_sheet.png``
(``qa_sheet_2.png``... when there are several pages) and one Secondary Capture image
per page (``<CT SeriesInstanceUID>_QA_<page>.dcm``, ``autocontour.secondary_capture``)
into the staging folder, and says what it wrote for report.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from autocontour.errors import OutputError
from autocontour.postprocess import StructureResult
from autocontour.qa_render import render_pages
from autocontour.dicom_elements import write_dataset
from autocontour.run_record import QaOutput, SecondaryCaptureSeries
from autocontour.secondary_capture import build_secondary_capture
from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["QA_DIR", "QA_SERIES_DESCRIPTION", "write_qa", "sheet_header"]

QA_DIR = "qa"
QA_SERIES_DESCRIPTION = "AUTO contours QA sheet - review before use"  # <= 64 characters (LO)
PNG_COMPRESS_LEVEL = 3  # zlib level: ~2x faster than the default 6, files ~10 % larger


def sheet_header(volume: Volume, algorithm_name: str, algorithm_version: str) -> str:
    """Second title line of the QA sheet: application, patient ID, CT series and date."""
    ct = volume.datasets[0] if volume.datasets else None

    def get(keyword: str) -> str:
        return str(getattr(ct, keyword, "") or "").strip() if ct is not None else ""

    series = " ".join(p for p in (get("SeriesNumber"), get("SeriesDescription")) if p)
    return (f"{algorithm_name} {algorithm_version}  |  patient ID {get('PatientID') or '-'}  |  "
            f"CT series {series or volume.series_instance_uid}  {get('StudyDate')}")


def write_qa(
    volume: Volume,
    results: Mapping[str, StructureResult],
    staging: Path,
    *,
    series_instance_uid: str,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = QA_SERIES_DESCRIPTION,
) -> tuple[dict[str, Path], QaOutput]:
    """Render and write the QA pages into ``staging``.

    Returns:
        ``{name in OUTPUT: staged path}`` (PNG names carry the ``qa/`` folder) and what
        was written, for report.json: PNG names, the Secondary Capture series UID and files.

    Raises:
        OutputError: a file cannot be written.
    """
    header = sheet_header(volume, algorithm_name, algorithm_version)
    pages = render_pages(volume, results, header=header)
    qa_dir = Path(staging) / QA_DIR
    try:
        qa_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {qa_dir}: {exc} - check that the output folder is writable") from None
    staged: dict[str, Path] = {}
    pngs, dicoms = [], []
    for number, page in enumerate(pages, start=1):
        name = "qa_sheet.png" if number == 1 else f"qa_sheet_{number}.png"
        path = qa_dir / name
        try:
            Image.fromarray(page.image).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc} - check that the output folder is writable") from None
        staged[f"{QA_DIR}/{name}"] = path
        pngs.append(f"{QA_DIR}/{name}")
        ds = build_secondary_capture(
            volume, page.image, series_instance_uid=series_instance_uid, instance_number=number,
            series_description=series_description, algorithm_name=algorithm_name,
            algorithm_version=algorithm_version,
        )
        dcm_name = f"{volume.series_instance_uid}_QA_{number}.dcm"
        staged[dcm_name] = write_dataset(ds, Path(staging) / dcm_name)
        dicoms.append(dcm_name)
    logger.info("QA: %d page(s): %s", len(pages), ", ".join(pngs + dicoms))
    return staged, QaOutput(pngs, SecondaryCaptureSeries(series_instance_uid, dicoms))
