"""Teacher labels for the organs a patient's clinician did not contour (an experiment).

OpenKBP's train patients lack many organ references: of 170, the Esophagus is contoured for
59, the Larynx for 81 and the Mandible for 112 (Brainstem 156, SpinalCord 168, parotids
162-163).  The two organs contoured least are the two the organ model scores worst on.  The
trainer treats a missing reference as unknown (its probability merged into background,
``softmax_marginal_loss``), so those organs are learnt from a third to a half of the
patients.  With a *teacher* (a released organ model, ``--teacher models/hn_oar/model.ts``)
each missing organ of a training patient takes the teacher's label map instead:

* a clinician's reference always wins: the teacher's label is used only for the organs the
  patient lacks, and only on voxels no reference of that patient claims;
* the filled organ is then an ordinary reference: known where ``Task.known_slices`` says
  (a partial-length organ between its first and last labelled slice, the others
  everywhere), so the teacher's background beside its organ is learnt too;
* an organ the teacher does not find either stays unknown;
* the held-out patients, which choose the checkpoint, are never filled: they are scored on
  the clinicians' references only;
* the sampler's per-structure weights stay those of the clinicians' references, so the
  patches centred on a real Esophagus are as many as without a teacher, and those on a
  filled one come on top.
"""

from __future__ import annotations

import numpy as np

from training.tasks import Task

__all__ = ["with_teacher_labels"]


def with_teacher_labels(refs: list[np.ndarray | None], teacher: np.ndarray, task: Task) -> list[np.ndarray | None]:
    """``refs`` (``Task.references``) with each missing output filled from ``teacher``.

    ``teacher`` is a softmax task's uint8 label map on the patient's grid (0 = background,
    i = output i - 1 of ``task``).  A missing output (None) becomes the teacher's voxels of
    that label that no present reference covers, or stays None when there are none.
    """
    if task.kind != "softmax":
        raise ValueError(f"{task.name}: teacher labels need mutually exclusive (softmax) outputs")
    if teacher.shape != next((r.shape for r in refs if r is not None), teacher.shape):
        raise ValueError(f"teacher label map {teacher.shape} is not on the references' grid")
    claimed = np.zeros(teacher.shape, bool)
    for r in refs:
        if r is not None:
            claimed |= r
    out: list[np.ndarray | None] = []
    for i, r in enumerate(refs):
        if r is None:
            filled = (teacher == i + 1) & ~claimed
            r = filled if filled.any() else None
        out.append(r)
    return out
