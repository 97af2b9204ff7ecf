"""vtprune: visual-token pruning for HuggingFace multimodal LLMs.

    import vtprune
    vtprune.wrap(model, "random", keep=64)   # the one line
    model.generate(**inputs)
    print(vtprune.report(model))
    vtprune.unwrap(model)
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# The design card keeps patches/, cuda/ and eval/ at the top of the repository;
# setup.py installs them as vtprune.patches, vtprune.cuda and vtprune.eval. In a
# source checkout (python run from the repo root, where this folder shadows the
# installed package) the same names resolve to those folders, so the source tree
# and the installed package agree.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_TOP_LEVEL = ("patches", "cuda", "eval")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``vtprune.patches`` / ``.cuda`` / ``.eval`` in the repository's top-level folders."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.partition(".")
        if head != __name__ or name not in _TOP_LEVEL:
            return None
        init = _SOURCE_ROOT / name / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if not (Path(__file__).resolve().parent / "patches").is_dir() and (_SOURCE_ROOT / "patches" / "__init__.py").is_file():
    sys.meta_path.insert(0, _SourceTreeFinder())

from . import policies  # noqa: E402
from .api import is_wrapped, pruned, report, unwrap, wrap  # noqa: E402
from .patches import supported_model_types  # noqa: E402
from .policies import Pipeline, available_policies  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "available_policies",
    "is_wrapped",
    "policies",
    "pruned",
    "report",
    "supported_model_types",
    "unwrap",
    "wrap",
]
