"""Series selection: config/series_selection.yaml read into SelectionRules (or refused as a
ConfigurationError, exit 8), and the rules' filters and ranking applied to candidate series."""

from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from autocontour.errors import EXIT_CODES, ConfigurationError, SeriesSelectionError
from autocontour.series_selection import DEFAULT_RULES_PATH, SelectionRules, SeriesCandidate, select_series


def test_shipped_rules_are_the_defaults_the_tests_use():
    """Tests build SelectionRules() directly: the shipped file must say the same."""
    assert SelectionRules.from_yaml(DEFAULT_RULES_PATH) == SelectionRules()


def test_partial_file_keeps_the_other_defaults(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text("filters:\n  min_slices: 20\n  exclude_image_type: [localizer]\nranking: [most_slices]\n")
    rules = SelectionRules.from_yaml(p)
    assert rules.min_slices == 20 and rules.exclude_image_type == ("LOCALIZER",) and rules.ranking == ("most_slices",)
    assert rules.modality == "CT" and rules.require_axial is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("filters: [modality: CT\n", r"are not valid YAML at line 2"),
        ("- most_slices\n", r"must be a mapping with 'filters' and 'ranking', not list"),
        ("", r"must be a mapping with 'filters' and 'ranking', not NoneType"),
        ("filters: CT\n", r"'filters' must be a mapping, not str"),
        ("ranking: [most_slices, largest]\n", r"unknown ranking keys \['largest'\]; valid: \["),
        ("ranking: most_slices\n", r"ranking must be a list of strings, not 'most_slices'"),
        ("filters:\n  min_slice: 5\n", r"unknown filters keys \['min_slice'\]; valid: \["),
        ("filter:\n  min_slices: 5\n", r"unknown top-level keys \['filter'\]"),
        ("filters:\n  min_slices: ten\n", r"invalid literal for int\(\) with base 10: 'ten'"),
        ("filters:\n  axial_tolerance: [0.1]\n", r"float\(\) argument must be"),
        ("filters:\n  sop_class_uids: 1.2.840.10008.5.1.4.1.1.2\n", r"filters\.sop_class_uids must be a list of strings"),
        ("filters:\n  exclude_image_type: [1, 2]\n", r"filters\.exclude_image_type must be a list of strings"),
        ("filters:\n  require_axial: maybe\n", r"filters\.require_axial must be true or false, not 'maybe'"),
        ("filters:\n  modality: 5\n", r"filters\.modality must be a string, not 5"),
    ],
    ids=["yaml-syntax", "a-list", "empty", "filters-not-mapping", "unknown-ranking-key", "ranking-not-list",
         "unknown-filter-key", "unknown-top-key", "min-slices-not-int", "tolerance-not-number", "uids-not-list",
         "image-type-not-text", "require-axial-not-bool", "modality-not-text"],
)
def test_bad_rules_file_is_a_configuration_error_naming_the_file_and_the_fix(tmp_path, text, message):
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    with pytest.raises(ConfigurationError) as exc:
        SelectionRules.from_yaml(p)
    msg = str(exc.value)
    assert re.search(message, msg), msg
    assert str(p) in msg and "\n" not in msg
    assert msg.endswith("- fix it or restore config/series_selection.yaml from the release")


def test_missing_rules_file(tmp_path):
    with pytest.raises(ConfigurationError, match=r"cannot be read \(No such file or directory\) - pass --rules"):
        SelectionRules.from_yaml(tmp_path / "none.yaml")


def test_configuration_error_has_its_own_exit_code():
    assert ConfigurationError.exit_code == EXIT_CODES["ConfigurationError"] == 8
    assert sorted(EXIT_CODES.values()) == list(range(1, 9))  # no code shared by two classes


# --------------------------------------------------------------------------- choosing among series (headers only)


def _series(uid: str, n: int = 12, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), thickness=3.0, date="20260101",
            modality="CT", iop=(1, 0, 0, 0, 1, 0)) -> SeriesCandidate:
    cand = SeriesCandidate(uid)
    for k in range(n):
        ds = Dataset()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, f"{uid}.{k + 1}"
        ds.SOPClassUID, ds.Modality, ds.ImageType = CTImageStorage, modality, list(image_type)
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [0, 0, thickness * k]
        ds.SliceThickness, ds.SeriesDate, ds.SeriesTime = thickness, date, "120000"
        ds.PixelData = b""  # present: only headers are looked at here
        cand.datasets.append(ds)
        cand.paths.append(f"/in/{uid}/{k}.dcm")
    return cand


@pytest.mark.parametrize(
    "others, winner",
    [
        ([_series("1.9", n=40, image_type=("DERIVED", "SECONDARY"))], "1.1"),  # ORIGINAL/PRIMARY before more slices
        ([_series("1.9", n=13)], "1.9"),  # then the most slices
        ([_series("1.9", thickness=2.0)], "1.9"),  # then the thinnest
        ([_series("1.9", date="20260102")], "1.9"),  # then the newest
        ([_series("1.0")], "1.0"),  # then the UID, so the choice never depends on file order
    ],
    ids=["original-primary", "most-slices", "thinnest", "newest", "uid"],
)
def test_ranking_keys_in_order(others, winner):
    cands = [_series("1.1"), *others]
    assert select_series(cands, SelectionRules()).series_instance_uid == winner
    assert select_series(cands[::-1], SelectionRules()).series_instance_uid == winner


def test_ranking_order_comes_from_the_rules(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text("ranking: [thinnest_slices, most_slices]\n")
    cands = [_series("1.1", n=40, thickness=3.0), _series("1.2", n=20, thickness=1.0)]
    assert select_series(cands, SelectionRules()).series_instance_uid == "1.1"
    assert select_series(cands, SelectionRules.from_yaml(p)).series_instance_uid == "1.2"


def test_no_eligible_series_lists_each_and_why():
    cands = [_series("1.1", modality="MR"), _series("1.2", n=9), _series("1.3", iop=(1, 0, 0, 0, 0, -1)),
             _series("1.4", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))]
    with pytest.raises(SeriesSelectionError) as exc:
        select_series(cands, SelectionRules(), "/in")
    msg = str(exc.value)
    for part in ("1.1 (MR", "modality MR, not CT", "9 slices, fewer than the 10", "not axial (slice normal",
                 "(localiser/scout)", "- send an axial CT series of at least 10 slices"):
        assert part in msg, msg
    assert [c.rejected != "" for c in cands] == [True] * 4
