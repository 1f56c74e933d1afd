"""Black-box Daunce: attribution through a fine-tuning API only (no gradients, no weights).

* ``runner``: the ``Backend`` protocol (``fine_tune``, ``log_likelihoods``; ``response_lengths`` for the mean-NLL
  signal) and ``BlackBoxDaunce``, which fine-tunes K models on random subsets (one fine-tuning seed for all of
  them by default) and scores by the covariance of losses across them; job ids, model ids and signals are kept
  in a work folder, so no fine-tune is paid for twice.
* ``local``: ``LocalLoRABackend``, the protocol served by a local transformers + peft model.
* ``openai``: ``OpenAIBackend``, the protocol over OpenAI's API or an OpenAI-compatible server.
"""

from .local import LocalLoRABackend
from .openai import FineTuneFailed, OpenAIBackend
from .runner import Backend, BlackBoxDaunce

__all__ = ["Backend", "BlackBoxDaunce", "FineTuneFailed", "LocalLoRABackend", "OpenAIBackend"]
