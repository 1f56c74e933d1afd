"""daunce: data attribution through uncertainty estimation.

Train K randomly perturbed copies of a model and score every (training example, query) pair by the
covariance of their per-example losses across the copies (Pan et al., arXiv 2505.23223).

The method core imports only torch: ``Daunce`` (the front, ``daunce.method``), ``DaunceEnsemble`` (Daunce over
several trained models, ``daunce.ensemble``), ``DaunceConfig``, the
tasks, ``plans``, ``objectives``, ``scores``, ``exact``, ``metrics``, ``reliability``, ``store``, and the
``engines`` that train the copies in one public ``ModelContext``. The rest loads on first use, so
``import daunce`` stays light:

* ``daunce.llm`` / ``daunce.CausalLMTask``: causal language models with LoRA (transformers, peft);
* ``daunce.blackbox`` (``BlackBoxDaunce``, ``Backend``, ``LocalLoRABackend``, ``OpenAIBackend``):
  attribution through a fine-tuning API only;
* ``daunce.dattri_adapter.DaunceAttributor``: Daunce behind dattri's attributor contract;
* ``daunce.ekfac.ekfac_grid``: kronfluence's EK-FAC influence for any model and kronfluence task;
* ``daunce.experiments``: what the notebooks need besides the method (vision data and models, LDS
  ground truth, baselines, text data, the backdoor set, plotting, the README report).
"""

import importlib

from . import exact, scores
from .config import DaunceConfig
from .ensemble import DaunceEnsemble
from .method import Daunce
from .task import ClassificationTask, Task

_SUBMODULES = {"blackbox", "dattri_adapter", "ekfac", "engines", "experiments", "llm", "metrics", "objectives",
               "parallel", "plans", "reliability", "store"}
_LAZY = {"CausalLMTask": "llm", "BlackBoxDaunce": "blackbox", "Backend": "blackbox",
         "LocalLoRABackend": "blackbox", "OpenAIBackend": "blackbox", "DaunceAttributor": "dattri_adapter",
         "map_tasks": "engines.ray_executor"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'daunce' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_LAZY))


__all__ = ["Daunce", "DaunceEnsemble", "DaunceConfig", "Task", "ClassificationTask", "scores", "exact", "CausalLMTask",
           "BlackBoxDaunce", "Backend", "LocalLoRABackend", "OpenAIBackend", "DaunceAttributor", "map_tasks"]
__version__ = "0.1.0"
