"""QA pictures: outlines in the table's colours, display orientation, the Secondary Capture series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from autocontour.ct_volume import build_volume
from autocontour.postprocess import postprocess
from autocontour.qa import QA_SERIES_DESCRIPTION, write_qa
from autocontour.qa_render import QA_BANNER, render_pages
from autocontour.secondary_capture import SECONDARY_CAPTURE_IMAGE_STORAGE, build_secondary_capture
from autocontour.dicom_elements import write_dataset
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from autocontour.structures import structure
from autocontour.volume import Volume
from conftest import ROOT, SHARED_DATA

CHUS_CT = SHARED_DATA / "hn-chus-052" / "CT"


def hfs_case() -> tuple[Volume, dict[str, np.ndarray]]:
    """A head-sized ellipse on an HFS grid (1 mm pixels, 3 mm slices) with three boxes:
    Parotid_L on the patient's left (+x), Parotid_R on the right, Bone_Mandible anterior."""
    nk, nj, ni = 30, 200, 200
    j, i = np.mgrid[0:nj, 0:ni]
    head = (((j - 100) / 80.0) ** 2 + ((i - 100) / 70.0) ** 2) <= 1.0
    arr = np.full((nk, nj, ni), -1000.0, np.float32)
    arr[:, head] = 40.0
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, 3.0)
    affine[:3, 1] = (0.0, 1.0, 0.0)
    affine[:3, 2] = (1.0, 0.0, 0.0)
    affine[:3, 3] = (-100.0, -100.0, 0.0)
    masks = {n: np.zeros(arr.shape, bool) for n in ("Parotid_L", "Parotid_R", "Bone_Mandible")}
    masks["Parotid_L"][10:20, 90:120, 140:160] = True  # high i = +x = patient left on HFS
    masks["Parotid_R"][10:20, 90:120, 40:60] = True
    masks["Bone_Mandible"][10:20, 40:60, 85:115] = True  # low j = anterior
    return Volume(arr, affine), masks


def flipped(vol: Volume, masks: dict[str, np.ndarray], axes: tuple[int, ...]) -> tuple[Volume, dict[str, np.ndarray]]:
    """The same patient on a grid whose ``axes`` run the other way (HFP: rows and columns; FFS: slices)."""
    affine = vol.affine.copy()
    for a in axes:
        affine[:3, 3] += affine[:3, a] * (vol.array.shape[a] - 1)
        affine[:3, a] *= -1
    return (Volume(np.flip(vol.array, axes).copy(), affine),
            {n: np.flip(m, axes).copy() for n, m in masks.items()})


def colour_pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(rgb, np.uint8), axis=-1)


def axial_cut(page, name: str) -> np.ndarray:
    (cut,) = [c for c in page.cuts if c.kind == "axial" and c.title.startswith(name + ":")]
    return cut.image


def test_outline_pixels_carry_the_structure_colour_and_sit_on_the_box_edge():
    vol, masks = hfs_case()
    results = postprocess(vol, masks)
    (page,) = render_pages(vol, results, header="test")
    img = axial_cut(page, "Parotid_L")
    px = colour_pixels(img, structure("Parotid_L").rgb)
    assert px.sum() > 40
    # the box is 20 mm (x) by 30 mm (y): its outline is a rectangle with that aspect, and
    # its inside shows the CT (grey), not the colour
    rows, cols = np.nonzero(px)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert h / w == pytest.approx(30 / 20, rel=0.1)
    inner = img[rows.min() + 4 : rows.max() - 3, cols.min() + 4 : cols.max() - 3]
    assert not colour_pixels(inner, structure("Parotid_L").rgb).any()
    assert (inner[..., 0] == inner[..., 1]).all() and (inner[..., 1] == inner[..., 2]).all()
    # every pixel on the rectangle's edge carries the colour
    assert px[rows.min(), cols.min() : cols.max() + 1].all() and px[rows.max(), cols.min() : cols.max() + 1].all()
    assert px[rows.min() : rows.max() + 1, cols.min()].all() and px[rows.min() : rows.max() + 1, cols.max()].all()
    # the External is drawn in its own colour
    assert colour_pixels(img, structure("External").rgb).sum() > 100


@pytest.mark.parametrize("axes", [(), (1, 2), (0,), (0, 1, 2)], ids=["HFS", "HFP", "FFS", "FFP"])
def test_axial_cuts_show_patient_left_on_the_right_and_anterior_up(axes):
    vol, masks = flipped(*hfs_case(), axes) if axes else hfs_case()
    (page,) = render_pages(vol, postprocess(vol, masks), header="test")
    img = axial_cut(page, "Parotid_L")
    w = img.shape[1]
    left = np.nonzero(colour_pixels(img, structure("Parotid_L").rgb))[1]
    right = np.nonzero(colour_pixels(img, structure("Parotid_R").rgb))[1]
    assert left.min() > w / 2 > right.max()  # patient left on the image right
    front = np.nonzero(colour_pixels(axial_cut(page, "Bone_Mandible"), structure("Bone_Mandible").rgb))[0]
    back = np.nonzero(colour_pixels(axial_cut(page, "Bone_Mandible"), structure("External").rgb))[0]
    assert front.mean() < img.shape[0] / 2 and back.max() > front.max()  # anterior up


def test_every_orientation_gives_the_same_picture():
    base_vol, base_masks = hfs_case()
    (ref,) = render_pages(base_vol, postprocess(base_vol, base_masks), header="test")
    for axes in [(1, 2), (0,), (0, 1, 2)]:
        vol, masks = flipped(base_vol, base_masks, axes)
        (page,) = render_pages(vol, postprocess(vol, masks), header="test")
        assert [c.title for c in page.cuts] == [c.title for c in ref.cuts]
        for a, b in zip(page.cuts, ref.cuts):
            assert np.array_equal(a.image, b.image), (axes, a.title)


def test_sheet_says_review_and_lists_every_structure(tmp_path):
    vol, masks = hfs_case()
    masks["Larynx"] = np.zeros(vol.array.shape, bool)  # empty: listed with its flag, no axial cut
    results = postprocess(vol, masks)
    pages = render_pages(vol, results, header="test")
    assert len(pages) == 1
    titles = [c.title for c in pages[0].cuts]
    assert titles[0].startswith("coronal") and titles[1].startswith("sagittal")
    assert [t.split(":")[0] for t in titles[2:]] == ["Parotid_L", "Parotid_R", "Bone_Mandible"]
    assert QA_BANNER == "automatic proposal - review before use"
    # the banner is drawn in its colour in the header band
    assert colour_pixels(pages[0].image[:45, :600], (255, 80, 80)).sum() > 200


def test_more_cuts_than_a_page_holds_go_onto_more_pages(monkeypatch):
    import autocontour.qa_render as qa_render

    vol, masks = hfs_case()
    results = postprocess(vol, masks)
    monkeypatch.setattr(qa_render, "MAX_ROWS", 1)  # 4 cuts a page: 2 + 3 cuts need 2 pages
    pages = qa_render.render_pages(vol, results, header="test")
    assert [len(p.cuts) for p in pages] == [4, 1]
    assert pages[1].cuts[0].title.startswith("Bone_Mandible")
    for page in pages:  # banner and legend on every page
        assert colour_pixels(page.image[:45, :600], (255, 80, 80)).sum() > 200
        legend = page.image[:, qa_render.COLUMNS * qa_render.PANEL :]
        assert colour_pixels(legend, structure("Bone_Mandible").rgb).sum() > 100  # its swatch


def test_secondary_capture_of_a_page_round_trips(tmp_path):
    vol, masks = hfs_case()
    # a CT header for the volume: the sample's first slice, renumbered
    ds0 = pydicom.dcmread(ROOT / "sample" / "ct" / "CT0000.dcm", stop_before_pixels=True)
    vol.datasets = [ds0] * vol.array.shape[0]
    vol.sop_instance_uids = tuple(generate_uid() for _ in range(vol.array.shape[0]))
    vol.series_instance_uid = str(ds0.SeriesInstanceUID)
    vol.study_instance_uid = str(ds0.StudyInstanceUID)
    (page,) = render_pages(vol, postprocess(vol, masks), header="test")
    ds = build_secondary_capture(vol, page.image, series_instance_uid=generate_uid(), instance_number=1,
                                 series_description=QA_SERIES_DESCRIPTION, algorithm_name="hn-autocontour",
                                 algorithm_version="test", source_slices=[15])
    path = write_dataset(ds, tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert np.array_equal(back.pixel_array, page.image)
    assert [r.ReferencedSOPInstanceUID for r in back.SourceImageSequence] == [vol.sop_instance_uids[15]]
    assert back.StudyInstanceUID == vol.study_instance_uid
    with pytest.raises(ValueError):
        build_secondary_capture(vol, page.image[..., 0], series_instance_uid=generate_uid(), instance_number=1,
                                series_description="x", algorithm_name="a", algorithm_version="b")


@pytest.mark.slow
def test_chus_qa_series_passes_dciodvfy_and_references_the_study(tmp_path):
    if not CHUS_CT.is_dir():
        pytest.skip(f"{CHUS_CT} not present")
    from test_conformance import check_dciodvfy

    vol = build_volume(select_series(scan_folder(CHUS_CT)[0], SelectionRules()))
    results = postprocess(vol, {})  # the External alone: enough for the sheet and fast
    series_uid = generate_uid()
    staged, written = write_qa(vol, results, tmp_path, series_instance_uid=series_uid,
                               algorithm_name="hn-autocontour", algorithm_version="test")
    assert written.png == ["qa/qa_sheet.png"] and (tmp_path / "qa" / "qa_sheet.png").exists()
    assert written.secondary_capture.series_instance_uid == series_uid
    (name,) = written.secondary_capture.files
    assert set(staged) == {"qa/qa_sheet.png", name}
    check_dciodvfy(staged[name], sorted(CHUS_CT.iterdir())[0], "SCImage")
    sc = pydicom.dcmread(staged[name])
    assert sc.StudyInstanceUID == vol.study_instance_uid and sc.SeriesInstanceUID == series_uid
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_instance_uid
    for refs in (sc.SourceImageSequence, sc.ReferencedSeriesSequence[0].ReferencedInstanceSequence):
        assert [r.ReferencedSOPInstanceUID for r in refs] == list(vol.sop_instance_uids)
        assert {r.ReferencedSOPClassUID for r in refs} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(tmp_path / "qa" / "qa_sheet.png").convert("RGB")))
