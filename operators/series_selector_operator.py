"""Input folder -> the one CT series to contour (rules in config/series_selection.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.run_record import CandidateSeries, RunRecord, SeriesChoice
from autocontour.series_selection import SelectionRules, scan_folder, select_series

logger = logging.getLogger(__name__)


class SeriesSelectorOperator(Operator):
    """Scans the input folder's DICOM headers and emits the chosen ``SeriesCandidate``.

    The SDK's DICOMDataLoaderOperator + DICOMSeriesSelectorOperator read every file in
    full and match regex rules without ranking; this operator reads headers only (pixel
    data deferred) and ranks the eligible series by the configured preferences.
    """

    OUT_SERIES = "series"

    def __init__(self, fragment: Fragment, *args, input_folder: Path, rules: SelectionRules, record: RunRecord, **kwargs):
        self.input_folder = Path(input_folder)
        self.rules = rules
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output(self.OUT_SERIES)

    def compute(self, op_input, op_output, context):
        with self.record.stage("load"):  # every file's header, pixel data deferred
            candidates, skipped = scan_folder(self.input_folder)
        with self.record.stage("select"):
            chosen = select_series(candidates, self.rules, self.input_folder)
        self.record.series = SeriesChoice(
            chosen=chosen.series_instance_uid,
            files=len(chosen.datasets),
            candidates=[CandidateSeries(c.series_instance_uid, len(c.datasets), c.rejected) for c in candidates],
            skipped_files=len(skipped),
            ranking=list(self.rules.ranking),
        )
        op_output.emit(chosen, self.OUT_SERIES, PYOBJECT)
