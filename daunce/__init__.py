"""daunce: data attribution through uncertainty estimation.

Train K randomly perturbed copies of a model and score every (training example, query) pair by the
covariance of their per-example losses across the copies (Pan et al., arXiv 2505.23223).
"""

from . import exact, scores
from .config import DaunceConfig
from .method import Daunce
from .task import ClassificationTask, Task

__all__ = ["Daunce", "DaunceConfig", "Task", "ClassificationTask", "scores", "exact"]
__version__ = "0.1.0"
