"""daunce: data attribution through uncertainty estimation.

Train K randomly perturbed copies of a model and score every (training example, query) pair by the
covariance of their per-example losses across the copies (Pan et al., arXiv 2505.23223).

The core (``Daunce``, ``DaunceConfig``, the tasks, ``scores``, ``exact``) imports only torch. The
rest loads on first use, so ``import daunce`` stays light:

* ``daunce.llm`` / ``daunce.CausalLMTask``: causal language models with LoRA (transformers, peft);
* ``daunce.blackbox`` (``BlackBoxDaunce``, ``Backend``, ``LocalLoRABackend``) and
  ``daunce.openai_backend``: attribution through a fine-tuning API only;
* ``daunce.metrics``, ``daunce.groundtruth``, ``daunce.reliability``: LDS, its ground truth, and how
  many copies are enough;
* ``daunce.baselines`` and ``daunce.DaunceAttributor``: dattri / kronfluence baselines and a dattri-style
  attributor;
* ``daunce.vectorised`` and ``daunce.distributed``: the vmap trainer and the Ray engine;
* ``daunce.multiadapter``: signals of many LoRA copies in one pass (peft mixed-adapter batches).
"""

import importlib

from . import exact, scores
from .config import DaunceConfig
from .method import Daunce
from .task import ClassificationTask, Task

_SUBMODULES = {"backdoor", "baselines", "blackbox", "data", "dattri_adapter", "distributed", "groundtruth",
               "llm", "metrics", "models", "multiadapter", "openai_backend", "paths", "reliability", "textdata",
               "training", "vectorised", "vision"}
_LAZY = {"CausalLMTask": "llm", "BlackBoxDaunce": "blackbox", "Backend": "blackbox",
         "LocalLoRABackend": "blackbox", "OpenAIBackend": "openai_backend", "DaunceAttributor": "dattri_adapter",
         "map_tasks": "distributed"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'daunce' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_LAZY))


__all__ = ["Daunce", "DaunceConfig", "Task", "ClassificationTask", "scores", "exact", *sorted(_LAZY)]
__version__ = "0.1.0"
