"""All-or-nothing output: files are written to a staging folder inside OUTPUT, then renamed.

A run that fails leaves OUTPUT as it found it (the staging folder is removed); a run that
succeeds renames each file into place (``os.replace`` within one filesystem is atomic),
the report last.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from autocontour.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = ["prepare_staging", "commit", "discard", "STAGING_PREFIX"]

STAGING_PREFIX = ".autocontour-staging-"


def prepare_staging(output_dir: Path) -> Path:
    """Create OUTPUT if needed and a private staging folder in it.

    Raises:
        OutputError: OUTPUT cannot be created or written.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    except OSError as exc:
        raise OutputError(
            f"output folder {output_dir} cannot be written ({exc.strerror or exc}) - pass -o with a writable folder"
        ) from None


def commit(staged: dict[str, Path], output_dir: Path, staging: Path) -> list[Path]:
    """Rename staged files into OUTPUT (in the given order) and remove the staging folder."""
    done: list[Path] = []
    made: list[Path] = []
    try:
        for name, path in staged.items():
            target = Path(output_dir) / name
            if target.parent != Path(output_dir) and not target.parent.is_dir():
                target.parent.mkdir(parents=True)  # e.g. OUTPUT/qa/
                made.append(target.parent)
            os.replace(path, target)
            done.append(target)
    except OSError as exc:
        for p in done:  # no partial output
            p.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise OutputError(
            f"could not move results into {output_dir}: {exc} - check the output folder's free space and permissions"
        ) from None
    finally:
        discard(staging)
    return done


def discard(staging: Path | None) -> None:
    """Remove the staging folder and whatever is in it (nothing if None or already gone)."""
    if staging is not None and Path(staging).exists():
        shutil.rmtree(staging, ignore_errors=True)
