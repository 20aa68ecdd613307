"""The one structure table: names, colours, codes and clinical constraints.

Both writers (DICOM-SEG, RTSTRUCT), the post-processor and the report read this table;
nothing else defines a colour or a code.  Importing it costs nothing (no numpy, no DICOM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Code", "Laterality", "StructureDefinition", "STRUCTURES", "EXTERNAL", "TARGET_TYPES", "structure", "mirror_partner",
]


class Laterality(str, Enum):
    NONE = "none"
    LEFT = "left"  # patient left = +x in DICOM LPS
    RIGHT = "right"  # patient right = -x in DICOM LPS


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")

ENTIRE_BODY = Code("38266002", "SCT", "Entire body")
# RTROIInterpretedType values of targets (clipped to the External)
TARGET_TYPES = frozenset({"GTV", "CTV", "ITV", "PTV"})
EXTERNAL = "External"  # TG-263 name of the body contour, computed from the CT (autocontour.external)

_TG263 = re.compile(r"^[A-Za-z][A-Za-z0-9_^~]{0,15}$")


@dataclass(frozen=True)
class StructureDefinition:
    """One output structure.

    ``min_component_cc`` drops connected components smaller than that (specks);
    ``max_components`` keeps at most that many of the largest components; organs keep
    one.

    Stray components (structures allowed more than one): a component other than the
    largest is kept only when it is a clinically plausible part of the structure, that
    is when it is at least ``secondary_min_fraction`` of the largest component's volume
    **or** its nearest voxel lies within ``secondary_max_gap_mm`` of the largest
    component; otherwise it is removed, logged and counted.  For ``PTV_High`` (10 %,
    30 mm): a second high-dose target is a nodal level (or a contralateral node) with its
    own CTV and PTV margins, so it is either substantial (a level II-IV nodal PTV is tens
    of cc, >= 10 % of a typical 150-700 cc primary PTV) or lies along the same jugular
    chain next to the primary PTV (adjacent nodal levels are contiguous; 30 mm bridges a
    skipped level, about one level's cranio-caudal height).  A piece that is both small
    and far is not a target: on hn-chus-052 the model's 1.4 cc piece inside the brain is
    0.2 % of the 644 cc PTV and 68 mm from it, on the bundled sample a 51 cc piece in the
    left shoulder is 8 % and 98 mm away; both go.  Only the *gap* is measured (nearest
    voxels, in mm, from the CT's spacing), so a long primary PTV does not make its own
    nodes look far.
    ``contains`` names structures that lie inside this one by definition (the nested dose
    levels: PTV_Mid = PTV63 + PTV70 contains PTV_High, PTV_Low contains PTV_Mid); after
    post-processing, any of their voxels outside it are added to it (logged and counted),
    so a planner building rings from the levels never meets a sliver of a higher level
    outside a lower one.
    ``volume_range_cc`` is the plausible volume range (2.5th-97.5th percentile of the
    OpenKBP training contours, low / 1.5 and high * 1.5, from ``python -m
    training.volume_stats``); a volume outside it is flagged, never changed.
    The SpinalCord range depends on how far inferior the cord was contoured.
    """

    name: str  # AAPM TG-263
    rt_roi_interpreted_type: str  # RTSTRUCT RTROIInterpretedType
    rgb: tuple[int, int, int]
    category: Code
    type: Code
    laterality: Laterality = Laterality.NONE
    min_component_cc: float = 0.1
    max_components: int = 1
    secondary_min_fraction: float = 0.10
    secondary_max_gap_mm: float = 30.0
    fill_holes: bool = True
    volume_range_cc: tuple[float, float] = (0.0, float("inf"))
    contains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _TG263.match(self.name):
            raise ValueError(f"{self.name!r} is not a TG-263 name (<= 16 characters, no spaces)")
        if not all(0 <= c <= 255 for c in self.rgb):
            raise ValueError(f"{self.name}: colour {self.rgb} outside 0-255")
        if self.max_components < 1:
            raise ValueError(f"{self.name}: max_components must be >= 1")

    @property
    def is_target(self) -> bool:
        """GTV/CTV/ITV/PTV: clipped to the External (no target voxel outside the patient)."""
        return self.rt_roi_interpreted_type in TARGET_TYPES

    @property
    def laterality_code(self) -> Code | None:
        return {Laterality.LEFT: LEFT, Laterality.RIGHT: RIGHT}.get(self.laterality)


def _organ(name: str, code: str, meaning: str, rgb: tuple[int, int, int], **kw) -> StructureDefinition:
    return StructureDefinition(name, "ORGAN", rgb, ANATOMICAL_STRUCTURE, Code(code, "SCT", meaning), **kw)


STRUCTURES: tuple[StructureDefinition, ...] = (
    # the patient's outer surface, from the CT (autocontour.external: threshold, opening,
    # components, holes); one component by construction, its own checks
    # (autocontour.external.check_external) instead of a volume range
    StructureDefinition(EXTERNAL, "EXTERNAL", (127, 255, 0), ANATOMICAL_STRUCTURE, ENTIRE_BODY,
                        min_component_cc=0.0, fill_holes=False),
    _organ("Brainstem", "15926001", "Brainstem", (0, 200, 255), volume_range_cc=(5.8, 62.5)),
    _organ("SpinalCord", "2748008", "Spinal cord", (255, 255, 0), volume_range_cc=(8.0, 67.8)),
    _organ(
        "Parotid_L", "45289007", "Parotid gland", (0, 160, 0),
        laterality=Laterality.LEFT, volume_range_cc=(7.3, 71.6),
    ),
    _organ(
        "Parotid_R", "45289007", "Parotid gland", (255, 128, 0),
        laterality=Laterality.RIGHT, volume_range_cc=(7.9, 70.6),
    ),
    _organ("Esophagus", "32849002", "Esophagus", (160, 80, 40), volume_range_cc=(2.5, 39.5)),
    _organ("Larynx", "4596009", "Larynx", (255, 0, 255), volume_range_cc=(1.3, 87.0)),
    _organ("Bone_Mandible", "91609006", "Mandible", (230, 230, 200), volume_range_cc=(24.5, 134.3)),
    StructureDefinition(
        "PTV_High", "PTV", (255, 0, 0), MORPHOLOGICALLY_ALTERED,
        Code("228793007", "SCT", "Planning target volume"),
        max_components=4, min_component_cc=0.5, fill_holes=False, volume_range_cc=(39.3, 1193.9),
    ),
    # the nested clinical dose levels of hn_target 2.x: PTV_Mid = PTV63 + PTV70 (85 OpenKBP train
    # patients have a PTV63), PTV_Low = PTV56 + PTV63 + PTV70 (154 have a PTV56)
    StructureDefinition(
        "PTV_Mid", "PTV", (255, 140, 180), MORPHOLOGICALLY_ALTERED,
        Code("228793007", "SCT", "Planning target volume"),
        max_components=4, min_component_cc=0.5, fill_holes=False, volume_range_cc=(88.0, 1134.7),
        contains=("PTV_High",),
    ),
    StructureDefinition(
        "PTV_Low", "PTV", (80, 120, 255), MORPHOLOGICALLY_ALTERED,
        Code("228793007", "SCT", "Planning target volume"),
        max_components=4, min_component_cc=0.5, fill_holes=False, volume_range_cc=(195.1, 2369.8),
        contains=("PTV_Mid",),
    ),
)

_BY_NAME = {s.name: s for s in STRUCTURES}
for _outer in STRUCTURES:  # a contained structure comes earlier in the table (post-processed first)
    for _inner in _outer.contains:
        if _inner not in _BY_NAME or STRUCTURES.index(_BY_NAME[_inner]) >= STRUCTURES.index(_outer):
            raise ValueError(f"{_outer.name} contains {_inner}, which must be a structure listed before it")
if len({n.lower() for n in _BY_NAME}) != len(STRUCTURES):
    raise ValueError("structure names must be unique regardless of case (TG-263)")


def structure(name: str) -> StructureDefinition:
    """The table entry for ``name``; KeyError lists the valid names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"Unknown structure {name!r}. Valid structures: {', '.join(_BY_NAME)}") from None


def mirror_partner(name: str) -> str | None:
    """The structure a left-right mirror image turns ``name`` into: the table's structure of
    the same type with the opposite laterality (``Parotid_L`` -> ``Parotid_R``), or None for
    a structure without laterality."""
    s = structure(name)
    if s.laterality is Laterality.NONE:
        return None
    other = Laterality.RIGHT if s.laterality is Laterality.LEFT else Laterality.LEFT
    for t in STRUCTURES:
        if t.type == s.type and t.laterality is other:
            return t.name
    return None
