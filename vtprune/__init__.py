"""vtprune: visual-token pruning for HuggingFace multimodal LLMs.

import vtprune
vtprune.wrap(model, "random", keep=64)   # the one line
model.generate(**inputs)
print(vtprune.report(model))
vtprune.unwrap(model)
"""

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

# patches/, cuda/ and eval/ sit at the top of the repository;
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

# The public names are imported on first use (PEP 562), so that `vtprune --help` and the
# command line's argument errors need neither torch nor transformers.
_PUBLIC = {
    "wrap": "api",
    "unwrap": "api",
    "pruned": "api",
    "report": "api",
    "is_wrapped": "api",
    "Pipeline": "policies",
    "available_policies": "policies",
    "supported_model_types": "patches",
}


def __getattr__(name: str):
    if name == "policies":
        return importlib.import_module(".policies", __name__)
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
