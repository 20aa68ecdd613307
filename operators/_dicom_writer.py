"""What the SEG and RTSTRUCT writer operators share: receive, build, stage, emit."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.dicom_elements import write_dataset
from autocontour.run_record import OutputFile, RunRecord
from operators._ports import PYOBJECT


class DicomWriterOperator(Operator):
    """Base of the writers: builds one DICOM object from the volume and the structures and
    stages it in the run's staging folder (the report operator moves it into OUTPUT)."""

    IN_VOLUME = "volume"
    IN_STRUCTURES = "structures"
    OUT_DONE = "file"
    STAGE = ""  # report.json stage name
    SUFFIX = ""  # file name: <SeriesInstanceUID>_<SUFFIX>.dcm
    # build(volume, masks, *, algorithm_name, algorithm_version, series_description) -> Dataset
    BUILDER = None

    def __init__(self, fragment: Fragment, *args, record: RunRecord, algorithm_name: str, algorithm_version: str,
                 series_description: str, **kwargs):
        self.record = record
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        self.series_description = series_description
        super().__init__(fragment, *args, **kwargs)

    def record_output(self, output: OutputFile) -> None:
        """Set this writer's field of the run record (report.json's ``outputs``)."""
        raise NotImplementedError

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.input(self.IN_STRUCTURES)
        spec.output(self.OUT_DONE)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        results = op_input.receive(self.IN_STRUCTURES)
        with self.record.stage(self.STAGE):
            ds = self.BUILDER(
                volume, {n: r.mask for n, r in results.items()}, algorithm_name=self.algorithm_name,
                algorithm_version=self.algorithm_version, series_description=self.series_description,
            )
            name = f"{volume.series_instance_uid}_{self.SUFFIX}.dcm"
            path = self.record.staging_path / name
            write_dataset(ds, path)
        self.record.staged_files[name] = path
        self.record_output(OutputFile(file=name, series_instance_uid=str(ds.SeriesInstanceUID)))
        op_output.emit(str(path), self.OUT_DONE, PYOBJECT)
