"""The documentation builds without a warning, covers the public API, and its code runs."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import camkit

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = (
    "index", "quickstart", "methods", "layers", "receptive_fields", "metrics", "study",
    "dataset", "api", "changelog",
)


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("sphinx", "furo", "myst_parser", "sphinx_copybutton"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install camkit[docs])")
    out = tmp_path_factory.mktemp("docs")
    env = {k: v for k, v in os.environ.items() if k != "CAMKIT_DOCS_INTERSPHINX"}  # offline
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, f"sphinx failed or warned:\n{done.stderr}\n{done.stdout}"
    return out / "html"


def test_every_page_is_built(html: Path) -> None:
    for page in PAGES:
        assert (html / f"{page}.html").is_file(), page


def test_api_page_documents_every_public_name(html: Path) -> None:
    generated = html / "api" / "generated"
    for name in camkit.__all__:
        if name == "__version__":
            continue
        page = generated / f"camkit.{name}.html"
        assert page.is_file(), f"camkit.{name} has no API page"
        anchor = "module-camkit" if inspect.ismodule(getattr(camkit, name)) else "camkit"
        assert f'id="{anchor}.{name}"' in page.read_text(), f"camkit.{name} is not described"
    metrics_page = (generated / "camkit.metrics.html").read_text()
    for name in camkit.metrics.__all__:
        assert f'id="camkit.metrics.{name}"' in metrics_page, f"metrics.{name} is missing"


def test_changelog_page_holds_the_current_release(html: Path) -> None:
    text = (html / "changelog.html").read_text()
    assert camkit.__version__ in text


def test_receptive_field_figure_is_published(html: Path) -> None:
    assert (html / "_static" / "rf_box.png").is_file()


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_quickstart_code_runs_and_says_what_it_prints(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torchvision")
    blocks = _python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "quickstart"}
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)
    # The values the page's comments state.
    assert namespace["cam"].layer == "layer4"
    assert tuple(namespace["result"].maps.shape) == (2, 224, 224)
    assert tuple(namespace["result"].raw.shape) == (2, 7, 7)
    assert namespace["result_pp"].layer == "layer3"
    assert tuple(namespace["several"].maps.shape) == (2, 3, 224, 224)
    assert namespace["picture"].shape == (224, 224, 3)
    assert str(namespace["picture"].dtype) == "uint8"
