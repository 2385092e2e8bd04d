"""Sphinx configuration for the camkit documentation.

Build (from the repository root; ``make docs`` runs the same)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

``-W`` turns every warning into an error, so the build stays warning-free.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Document the checkout's sources even where an older camkit is installed.
sys.path.insert(0, str(ROOT / "src"))

from camkit._version import __version__  # noqa: E402

project = "camkit"
author = "camkit developers"
copyright = "camkit developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# --------------------------------------------------------------------------- API pages
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}

napoleon_google_docstring = False
napoleon_numpy_docstring = True
# ``Attributes`` sections become ``.. attribute::`` entries, each with its own anchor
# (``CAMResult.maps`` can be linked). Dataclass fields are annotation-only class members, so
# autodoc's ``:members:`` does not describe them a second time.
napoleon_use_ivar = False
napoleon_use_rtype = False

# --------------------------------------------------------------------------- links to torch, numpy
# intersphinx needs each project's objects.inv, fetched over the network at build time. The
# machines that build these docs (CI included) often have no internet, and a failed fetch is
# a warning, which -W turns into a failed build. So the mapping is opt-in:
#
#     CAMKIT_DOCS_INTERSPHINX=1 make docs
#
# links torch.Tensor, numpy.ndarray, ... to their projects' pages. Without it, those names
# render as plain code: Sphinx only warns about unresolved references in nitpicky mode, which
# this build does not use, so the offline build stays warning-free.
if os.environ.get("CAMKIT_DOCS_INTERSPHINX", "") not in ("", "0"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
    }
else:
    intersphinx_mapping = {}
intersphinx_timeout = 10

# --------------------------------------------------------------------------- Markdown pages
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# --------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"camkit {release}"
html_static_path = ["_static"]
html_css_files = ["camkit.css"]

# Copy shell commands and Python code without their prompts.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
