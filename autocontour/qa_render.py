"""QA pictures for the reviewing clinician: the contours on the CT, one sheet to scan.

Each page (an RGB numpy array, saved as PNG and as a DICOM Secondary Capture) holds

* a header: "automatic proposal - review before use", the application, the patient ID
  and the CT series;
* one coronal and one sagittal cut through the centre of the contoured structures, then
  one axial cut through each structure's centre (centroid), every structure's outline
  drawn in its structure-table colour on every cut it crosses;
* a legend: colour, name, volume in cc, flags, and what post-processing removed.

The CT is shown in a soft-tissue window (W 400 / L 40).  Display conventions
(radiological): axial cuts seen from the feet, patient left on the image right and
anterior up; coronal seen from the front, patient left on the image right, superior up;
sagittal seen from the patient's left, anterior on the image left, superior up.  Every
cut carries its orientation letters and a 5 cm scale bar.  Cuts are taken from the
volume's canonical view (``autocontour.volume.to_canonical``: transposes and flips
only), so any axial orientation (HFS, HFP, FFS, FFP, decubitus) is shown the same way,
and each cut is cropped to the External (plus a margin) and scaled to fill its panel,
with square display pixels (the slice spacing is honoured).

Pillow draws the text and resizes; numpy does the rest.  Nothing here changes a contour.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from autocontour.postprocess import StructureResult, bounding_box
from autocontour.structures import EXTERNAL, structure
from autocontour.volume import CanonicalView, Volume, to_canonical

logger = logging.getLogger(__name__)

__all__ = ["QA_BANNER", "QaPage", "Cut", "render_pages", "render_cut", "WINDOW"]

QA_BANNER = "automatic proposal - review before use"
WINDOW = (40.0, 400.0)  # level, width (HU): soft tissue
PANEL = 330  # px, each cut's square cell (image + title)
TITLE_H = 24  # px above each cut
COLUMNS = 4
MAX_ROWS = 3
LEGEND_W = 470
HEADER_H = 78
MARGIN_MM = 12.0  # around the External in each cut
BACKGROUND = (18, 18, 18)
TEXT = (235, 235, 235)
WARN = (255, 190, 60)
NOTE = (170, 170, 170)
BANNER = (255, 80, 80)
OUTLINE_PX = 2  # outline thickness of a structure (the External: 1)


@dataclass
class Cut:
    """One rendered cut: the picture and where it came from."""

    title: str
    kind: str  # "axial", "coronal", "sagittal"
    index: int  # canonical index of the cut along its normal
    image: np.ndarray  # (H, W, 3) uint8
    mm_per_px: float


@dataclass
class QaPage:
    """One page of the QA sheet and the CT slices (k) its cuts were taken from."""

    image: np.ndarray  # (H, W, 3) uint8
    cuts: list[Cut] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = WINDOW
    scaled = (hu.astype(np.float32) - (level - width / 2.0)) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _plane(arr: np.ndarray, kind: str, index: int) -> np.ndarray:
    """A 2-D cut of a canonical (z, y, x) array in display orientation (rows down, columns right)."""
    if kind == "axial":  # rows: anterior -> posterior, columns: patient right -> left
        return arr[index]
    if kind == "coronal":  # rows: superior -> inferior, columns: right -> left
        return arr[::-1, index, :]
    if kind == "sagittal":  # rows: superior -> inferior, columns: anterior -> posterior
        return arr[::-1, :, index]
    raise ValueError(f"unknown cut {kind!r}")


def _pixel_mm(view: CanonicalView, kind: str) -> tuple[float, float]:
    dz, dy, dx = view.spacing_zyx
    return {"axial": (dy, dx), "coronal": (dz, dx), "sagittal": (dz, dy)}[kind]


_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` pixels of its edge (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def render_cut(
    ct: np.ndarray,
    masks: Sequence[tuple[np.ndarray, tuple[int, int, int], int]],
    view: CanonicalView,
    kind: str,
    index: int,
    crop: tuple[slice, slice] | None,
    size: int,
) -> tuple[np.ndarray, float]:
    """One cut of the canonical CT ``ct`` with outlines, scaled to fit ``size`` x ``size``.

    Args:
        ct: canonical (z, y, x) HU array.
        masks: (canonical mask, RGB, outline thickness) in drawing order (later on top).
        kind, index: the cut ("axial" / "coronal" / "sagittal") and its canonical index.
        crop: (rows, columns) of the display-oriented plane to show; None: all of it.
        size: the largest side of the result, px.

    Returns:
        (H, W, 3) uint8 picture and its mm per pixel (square display pixels).
    """
    plane = _plane(ct, kind, index)
    if crop is not None:
        plane = plane[crop]
    row_mm, col_mm = _pixel_mm(view, kind)
    h_mm, w_mm = plane.shape[0] * row_mm, plane.shape[1] * col_mm
    mm_per_px = max(h_mm, w_mm) / size
    out_w = max(1, int(round(w_mm / mm_per_px)))
    out_h = max(1, int(round(h_mm / mm_per_px)))
    grey = Image.fromarray(_window(plane)).resize((out_w, out_h), Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
    for mask, colour, thickness in masks:
        m = _plane(mask, kind, index)
        if crop is not None:
            m = m[crop]
        if not m.any():
            continue
        # nearest neighbour: every display pixel shows the voxel its centre falls in
        shown = np.asarray(Image.fromarray(m.view(np.uint8) * 255).resize((out_w, out_h), Image.Resampling.NEAREST)) > 0
        rgb[_outline(shown, thickness)] = colour
    return rgb, mm_per_px


def _crop_to(view: CanonicalView, kind: str, index: int,
             shape_zyx: tuple[int, int, int], external_c: np.ndarray | None) -> tuple[slice, slice] | None:
    """(rows, columns) of the display plane holding the External on this cut, plus MARGIN_MM."""
    if external_c is None:
        return None
    plane = _plane(external_c, kind, index)
    b = bounding_box(plane)
    if b is None:  # the cut misses the External: crop to the External's overall extent
        b3 = bounding_box(external_c)
        if b3 is None:
            return None
        z, y, x = b3
        nz = shape_zyx[0]
        zr = slice(nz - z.stop, nz - z.start)  # rows run superior -> inferior
        b = {"axial": (y, x), "coronal": (zr, x), "sagittal": (zr, y)}[kind]
    row_mm, col_mm = _pixel_mm(view, kind)
    mr, mc = int(math.ceil(MARGIN_MM / row_mm)), int(math.ceil(MARGIN_MM / col_mm))
    rows, cols = _plane(external_c, kind, index).shape
    return (slice(max(0, b[0].start - mr), min(rows, b[0].stop + mr)),
            slice(max(0, b[1].start - mc), min(cols, b[1].stop + mc)))


def _canonical_index(view: CanonicalView, lps: Sequence[float]) -> np.ndarray:
    """Nearest canonical (z, y, x) index of an LPS point (canonical axes are the LPS axes)."""
    x, y, z = lps
    ox, oy, oz = view.origin_lps
    dz, dy, dx = view.spacing_zyx
    return np.rint([(z - oz) / dz, (y - oy) / dy, (x - ox) / dx]).astype(int)


def _annotate(img: np.ndarray, kind: str, mm_per_px: float) -> np.ndarray:
    """Orientation letters on the four edges and a 5 cm scale bar."""
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    f = _font(15)
    h, w = img.shape[:2]
    top, bottom, left, right = _LETTERS[kind]
    d.text((w / 2, 2), top, fill=WARN, font=f, anchor="mt")
    d.text((w / 2, h - 2), bottom, fill=WARN, font=f, anchor="mb")
    d.text((3, h / 2), left, fill=WARN, font=f, anchor="lm")
    d.text((w - 3, h / 2), right, fill=WARN, font=f, anchor="rm")
    bar = 50.0 / mm_per_px
    if bar < w - 20:
        x0, y0 = w - 8 - bar, h - 10
        d.line([(x0, y0), (x0 + bar, y0)], fill=TEXT, width=2)
        d.text((x0 + bar / 2, y0 - 3), "5 cm", fill=TEXT, font=_font(12), anchor="mb")
    return np.asarray(pil)


def _legend_lines(results: Mapping[str, StructureResult]) -> list[tuple[tuple[int, int, int] | None, str, tuple]]:
    """(swatch colour or None, text, text colour) lines of the legend."""
    lines: list[tuple[tuple[int, int, int] | None, str, tuple]] = []
    width = 52
    for name, r in results.items():
        rgb = structure(name).rgb
        lines.append((rgb, f"{name}  {r.volume_cc:.1f} cc", TEXT))
        for flag in r.flags:
            for i, part in enumerate(textwrap.wrap(f"! {flag}", width)):
                lines.append((None, part if i == 0 else "  " + part, WARN))
        notes = []
        if r.clipped_cc:
            notes.append(f"{r.clipped_cc:.2f} cc outside the External clipped")
        if r.added_from_contained_cc:
            notes.append(f"{r.added_from_contained_cc:.2f} cc of a higher dose level added (nesting)")
        if r.components_removed:
            notes.append(f"{r.components_removed} component(s) removed, {r.removed_cc:.2f} cc")
        if name == EXTERNAL and r.excluded_cc:
            notes.append(f"left out (couch, head rest, other objects): {r.excluded_cc:.0f} cc")
        for note in notes:
            for i, part in enumerate(textwrap.wrap(note, width)):
                lines.append((None, part if i == 0 else "  " + part, NOTE))
    return lines


def render_pages(
    volume: Volume,
    results: Mapping[str, StructureResult],
    *,
    header: str = "",
) -> list[QaPage]:
    """The QA sheet of ``results`` on ``volume``: one page, more when there are many structures.

    ``header`` is a second title line (application, patient ID, series), written as given.
    """
    view = to_canonical(volume)
    ct = view.forward(volume.array)
    shape_zyx = ct.shape
    canon = {name: view.forward(r.mask) for name, r in results.items()}
    external_c = canon.get(EXTERNAL) if EXTERNAL in results and results[EXTERNAL].volume_cc else None
    # External first (thin), then the table order: later outlines are drawn on top
    draw = [(canon[n], structure(n).rgb, 1 if n == EXTERNAL else OUTLINE_PX) for n in results]

    centres = {n: _canonical_index(view, r.centroid_lps) for n, r in results.items()
               if r.centroid_lps is not None and r.volume_cc > 0}
    organ_centres = [c for n, c in centres.items() if n != EXTERNAL]
    middle = (np.rint(np.mean(organ_centres, axis=0)).astype(int) if organ_centres
              else centres.get(EXTERNAL, np.array(shape_zyx) // 2))
    middle = np.clip(middle, 0, np.array(shape_zyx) - 1)
    cell = PANEL - TITLE_H
    specs: list[tuple[str, str, int]] = [
        ("coronal", f"coronal  y = {_mm(view, 1, middle[1])} mm", int(middle[1])),
        ("sagittal", f"sagittal  x = {_mm(view, 2, middle[2])} mm", int(middle[2])),
    ]
    for name, c in centres.items():
        if name == EXTERNAL:
            continue
        z = int(np.clip(c[0], 0, shape_zyx[0] - 1))
        specs.append(("axial", f"{name}: axial  z = {_mm(view, 0, z)} mm", z))

    cuts: list[Cut] = []
    for kind, title, index in specs:
        crop = _crop_to(view, kind, index, shape_zyx, external_c)
        img, mm_px = render_cut(ct, draw, view, kind, index, crop, cell)
        cuts.append(Cut(title, kind, index, _annotate(img, kind, mm_px), mm_px))

    legend = _legend_lines(results)
    per_page = COLUMNS * MAX_ROWS
    pages = []
    for start in range(0, max(len(cuts), 1), per_page):
        chunk = cuts[start : start + per_page]
        pages.append(QaPage(_compose(chunk, legend, header, start // per_page + 1,
                                     math.ceil(len(cuts) / per_page) or 1), chunk))
    return pages


def _mm(view: CanonicalView, axis: int, index: int) -> str:
    origin = (view.origin_lps[2], view.origin_lps[1], view.origin_lps[0])[axis]
    return f"{origin + index * view.spacing_zyx[axis]:.1f}"


def _compose(cuts: list[Cut], legend: list, header: str, page: int, pages: int) -> np.ndarray:
    rows = max(1, math.ceil(len(cuts) / COLUMNS))
    legend_h = 36 + 19 * len(legend)
    height = HEADER_H + max(rows * PANEL, legend_h) + 8
    width = COLUMNS * PANEL + LEGEND_W
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(sheet)
    d.text((12, 8), QA_BANNER, fill=BANNER, font=_font(30))
    d.text((12, 46), header + (f"   page {page}/{pages}" if pages > 1 else ""), fill=TEXT, font=_font(17))
    for n, cut in enumerate(cuts):
        x0 = (n % COLUMNS) * PANEL
        y0 = HEADER_H + (n // COLUMNS) * PANEL
        d.text((x0 + 6, y0 + 3), cut.title, fill=TEXT, font=_font(15))
        h, w = cut.image.shape[:2]
        ox = x0 + (PANEL - w) // 2
        oy = y0 + TITLE_H + (PANEL - TITLE_H - h) // 2
        sheet.paste(Image.fromarray(cut.image), (ox, oy))
    lx, ly = COLUMNS * PANEL + 10, HEADER_H
    d.text((lx, ly), "structure, volume, flags", fill=NOTE, font=_font(16))
    ly += 28
    f = _font(16)
    for colour, text, text_colour in legend:
        if colour is not None:
            ly += 4
            d.rectangle([lx, ly + 2, lx + 22, ly + 16], fill=tuple(colour))
        d.text((lx + 30, ly), text, fill=text_colour, font=f)
        ly += 19
    return np.asarray(sheet)
