"""eos_kernels: Efficient Operator Search (EOS) for vision-language models.

Public API (imported lazily so that ``import eos_kernels`` stays light and does
not import Triton or transformers until they are needed):

- :func:`eos_reduce` -- the unified token-reduction operator (Triton or PyTorch).
- :mod:`eos_kernels.corners` -- prune / merge / pool / reweight as plain algorithms.
- :class:`Theta`, :class:`SearchSpace` -- deployable configurations and the search space.
- :func:`text_to_visual_importance`, :func:`select_anchors` -- token importance and anchors.
- :func:`patch_llava`, :func:`unpatch_llava` -- EOS inside a Hugging Face LLaVA model.
"""
from importlib import import_module

__version__ = "0.1.0"

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
