"""Waits for both writers, writes report.json, then moves every output into OUTPUT."""

from __future__ import annotations

import json
import logging
import time

from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.output import commit
from autocontour.report import build_report
from autocontour.run_record import RunRecord

logger = logging.getLogger(__name__)


class ReportOperator(Operator):
    """The last node: nothing reaches OUTPUT before this runs, so a failed run leaves nothing."""

    IN_STRUCTURES = "structures"
    IN_SEG = "seg_file"
    IN_RTSTRUCT = "rtstruct_file"
    IN_QA = "qa_files"
    REPORT_NAME = "report.json"

    def __init__(self, fragment: Fragment, *args, record: RunRecord, with_qa: bool = False, **kwargs):
        self.record = record
        self.with_qa = with_qa  # wait for the QA operator too
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_STRUCTURES)
        spec.input(self.IN_SEG)
        spec.input(self.IN_RTSTRUCT)
        if self.with_qa:
            spec.input(self.IN_QA)

    def compute(self, op_input, op_output, context):
        results = op_input.receive(self.IN_STRUCTURES)
        op_input.receive(self.IN_SEG)
        op_input.receive(self.IN_RTSTRUCT)
        if self.with_qa:
            op_input.receive(self.IN_QA)
        self.record.seconds["total_in_graph"] = round(time.perf_counter() - self.record.started, 3)
        report = build_report(self.record, results)
        path = self.record.staging_path / self.REPORT_NAME
        path.write_text(json.dumps(report, indent=1))
        files = commit({**self.record.staged_files, self.REPORT_NAME: path}, self.record.output_path,
                       self.record.staging_path)
        self.record.committed = True
        logger.info("wrote %s", ", ".join(str(f) for f in files))
