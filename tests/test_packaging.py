"""Release hygiene: one version, a changelog entry for it, a light import, a clean wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import camkit

ROOT = Path(__file__).resolve().parent.parent


def test_version_has_one_source() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml states a static version"
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "camkit._version.__version__"
    text = (ROOT / "src" / "camkit" / "_version.py").read_text()
    assert re.fullmatch(r'__version__ = "\d+\.\d+\.\d+(\w+\d*)?"\n', text), text
    assert camkit.__version__ in text


def test_changelog_has_an_entry_for_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    heading = rf"^## \[?{re.escape(camkit.__version__)}\]?( |$)"
    assert re.search(heading, changelog, flags=re.M), f"no '## {camkit.__version__}' heading"


_IMPORT_PROBE = """
import json, sys, time
import numpy, torch
before = set(sys.modules)
start = time.perf_counter()
import camkit
seconds = time.perf_counter() - start
added = sorted({m.split(".")[0] for m in set(sys.modules) - before} - {"camkit"})
print(json.dumps({"seconds": seconds, "added": added}))
"""


def test_import_is_light() -> None:
    """``import camkit`` adds no heavy or optional package to what torch and numpy import."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    forbidden = {"cv2", "torchvision", "matplotlib", "tqdm", "timm", "PIL", "skimage", "pandas"}
    assert not forbidden & set(probe["added"]), probe["added"]
    assert probe["seconds"] < 2.0, f"import camkit took {probe['seconds']:.2f} s after torch"


@pytest.mark.slow
def test_wheel_installs_cleanly_without_optional_packages() -> None:
    """tools/check_wheel.sh: build, twine check, fresh venv without torchvision, import."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    for module in ("build", "twine"):
        pytest.importorskip(module, reason=f"{module} is in the dev extra")
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "check_wheel.sh")],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheel check passed" in done.stdout
