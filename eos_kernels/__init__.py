"""eos_kernels: Efficient Operator Search (EOS) for vision-language models.

Public API (imported lazily so that ``import eos_kernels`` stays light and does
not import Triton or transformers until they are needed):

- :func:`eos_reduce` -- the unified token-reduction operator (Triton or PyTorch).
- :mod:`eos_kernels.corners` -- prune / merge / pool / reweight as plain algorithms.
- :class:`Theta`, :class:`SearchSpace` -- deployable configurations and the search space.
- :func:`text_to_visual_importance`, :func:`select_anchors` -- token importance and anchors.
- :func:`patch`, :func:`unpatch` -- EOS inside a supported Hugging Face model (the adapter is
  chosen from its class); :func:`patch_llava`, :func:`unpatch_llava` for LLaVA-1.5.
"""
import importlib.abc
import importlib.util
import sys
from importlib import import_module
from pathlib import Path

__version__ = "0.1.0"


class _SourceCheckoutIntegrations(importlib.abc.MetaPathFinder):
    """Finds ``eos_kernels.integrations`` in a source checkout.

    setup.py installs the top-level ``integrations/`` folder as
    ``eos_kernels.integrations``; run from a checkout (not installed), this
    finder gives the same layout, for that one name only.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != __name__ + ".integrations":
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


_here = Path(__file__).resolve().parent
if not (_here / "integrations").is_dir() and (_here.parent / "integrations" / "__init__.py").is_file():
    sys.meta_path.append(_SourceCheckoutIntegrations(_here.parent / "integrations"))

# public name -> module that defines it
_LAZY = {
    "eos_reduce": "eos_kernels.operator",
    "Theta": "eos_kernels.theta",
    "Reducer": "eos_kernels.theta",
    "SearchSpace": "eos_kernels.search_space",
    "text_to_visual_importance": "eos_kernels.importance",
    "select_anchors": "eos_kernels.selection",
    "patch_llava": "eos_kernels.integrations.llava",
    "unpatch_llava": "eos_kernels.integrations.llava",
    "patch": "eos_kernels.integrations.auto",
    "unpatch": "eos_kernels.integrations.auto",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eos_kernels' has no attribute {name!r}")


def __dir__():
    return __all__
