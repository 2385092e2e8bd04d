"""Write the results into a hidden staging folder and move it into place only when complete.

A run that fails or is interrupted leaves no ``--out`` folder that looks like a result. An
existing ``--out`` is replaced only when it is empty or holds an earlier study's output (a
``metrics.json`` beside a ``report.md``), so a mistyped path cannot wipe unrelated files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from study.errors import StudyInputError

MARKERS = ("metrics.json", "report.md")


class StagedOutput:
    """A staging folder next to ``out``; :meth:`commit` renames it to ``out``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).expanduser().absolute()
        self._check_target()
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
        except OSError as exc:
            raise StudyInputError(
                f"--out {out} cannot be written ({exc.strerror or exc}); pass a folder in a "
                "writable location, e.g. --out ./study-output"
            ) from None

    def _check_target(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise StudyInputError(
                f"--out {out} exists and is not a folder; pass a new folder path"
            )
        ancestor = out.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise StudyInputError(
                f"--out {out} cannot be written: {ancestor} is a file, not a folder; pass a "
                "folder in a writable location, e.g. --out ./study-output"
            )
        if out.is_dir() and any(out.iterdir()) and not all((out / m).is_file() for m in MARKERS):
            raise StudyInputError(
                f"--out {out} is a non-empty folder that does not hold an earlier study's "
                "output; pass a new or empty folder (an earlier output is replaced)"
            )

    def commit(self) -> Path:
        """Move the staged files to ``out``, replacing an earlier output in one step."""
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "previous")
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:
                os.replace(old / "previous", self.out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
