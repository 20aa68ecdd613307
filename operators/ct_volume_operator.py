"""Chosen series -> ``Volume`` (HU array with its exact patient geometry)."""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.ct_volume import build_volume
from autocontour.run_record import RunRecord, VolumeGeometry


class CTVolumeOperator(Operator):
    """Sorts slices along the normal, checks spacing, applies rescale; see ``autocontour.ct_volume``."""

    IN_SERIES = "series"
    OUT_VOLUME = "volume"

    def __init__(self, fragment: Fragment, *args, record: RunRecord, **kwargs):
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_SERIES)
        spec.output(self.OUT_VOLUME)

    def compute(self, op_input, op_output, context):
        series = op_input.receive(self.IN_SERIES)
        with self.record.stage("convert"):
            volume = build_volume(series)
        self.record.volume = VolumeGeometry(
            shape_kji=list(volume.array.shape),
            spacing_kji_mm=[round(float(s), 4) for s in volume.spacing],
            affine=[[round(float(v), 5) for v in row] for row in volume.affine],
            frame_of_reference_uid=volume.frame_of_reference_uid,
            study_instance_uid=volume.study_instance_uid,
        )
        op_output.emit(volume, self.OUT_VOLUME, PYOBJECT)
