"""``CausalLMTask``: the ``daunce.Task`` of response-masked chat batches.

Its per-example loss and signal are the mean negative log-likelihood of the response tokens
(higher = worse). Its ``outputs`` are the last hidden states ``(B, T, h)``, not vocabulary-sized
logits: the frozen LM head is applied inside ``loss``, as in the reference implementation, so
``Daunce`` caches hidden states and ``dl/dhidden`` for the linear term of the perturbed objectives.
LoRA adapters sit below the head, so the hidden states move with them and the chain rule through
the hidden states gives the exact gradient of ``grad_l(theta0)^T (theta - theta0)`` at theta0.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..task import Task, describe
from .data import IGNORE
from .layers import backbone_and_head


def response_token_losses(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module):
    """Token NLLs of the response: ``(nll, example_index)`` for every position with a label.

    ``hidden`` ``(B, T, h)`` predicts token ``t + 1`` at position ``t``. The head is applied only at
    loss-carrying positions (so no ``(B, T, V)`` logits are formed for the prompt)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    rows, cols = mask.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows, cols]  # (N_tok, h)
    logits = head(h)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(logits, target[rows, cols], reduction="none")
    return nll, rows


class CausalLMTask(Task):
    """``daunce.Task`` for response-masked chat batches of a transformers causal LM (peft LoRA or not).

    * ``outputs(model, batch)``: last hidden states ``(B, T, h)`` (after the final norm), padded back to
      the dataset's length ``T`` after running the model on the batch trimmed to its longest example.
    * ``loss(outputs, batch)``: ``(B,)`` mean NLL of the response tokens, with the frozen LM head
      applied inside (captured from the last model ``outputs`` saw, or given as ``lm_head``).
    * ``signal``: the loss (higher = worse); ``signal="sum"`` records the summed response NLL, i.e.
      minus the response log-likelihood.

    The head must be frozen: the linear term goes through the hidden states, so a trainable head
    would be missed by it (a warning says so).
    """

    def __init__(self, lm_head: Optional[torch.nn.Module] = None, signal: str = "mean"):
        if signal not in ("mean", "sum"):
            raise ValueError(f"CausalLMTask: signal must be 'mean' or 'sum', got {signal!r}")
        self.head = lm_head
        self.signal_kind = signal
        self._warned = False

    def outputs(self, model, batch):
        decoder, head = backbone_and_head(model)
        self.head = head
        if not self._warned and any(p.requires_grad for p in head.parameters()):
            warnings.warn("CausalLMTask: the LM head is trainable; the perturbed objectives' linear term "
                          "goes through the hidden states and does not see changes of the head", stacklevel=2)
            self._warned = True
        mask = batch["attention_mask"]
        T = mask.shape[1]
        L = int(mask.sum(1).max())
        if "inputs_embeds" in batch:  # cached hidden states of a frozen bottom part (split_model)
            out = decoder(inputs_embeds=batch["inputs_embeds"][:, :L], attention_mask=mask[:, :L], use_cache=False)
        else:
            out = decoder(input_ids=batch["input_ids"][:, :L], attention_mask=mask[:, :L], use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if L < T:
            hidden = F.pad(hidden, (0, 0, 0, T - L))
        return hidden

    def token_losses(self, outputs, batch):
        """``(total, count)``, each ``(B,)``: the summed NLL of each example's response tokens and their
        number (``total`` = minus the response log-likelihood; ``loss`` = ``total / count``)."""
        if self.head is None:
            raise RuntimeError("CausalLMTask: no LM head yet; call outputs(model, batch) first or pass lm_head")
        labels = batch["labels"]
        L = outputs.shape[1]
        nll, rows = response_token_losses(outputs, labels[:, :L], self.head)
        B = labels.shape[0]
        total = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        count = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
        return total, count

    def loss(self, outputs, batch):
        total, count = self.token_losses(outputs, batch)
        return total / count.clamp_min(1)

    def signal(self, outputs, batch):
        if self.signal_kind == "sum":
            return self.token_losses(outputs, batch)[0]
        return self.loss(outputs, batch)

    def fingerprint(self) -> str:
        """``"CausalLMTask(signal='mean')"``: what a work folder records of the task (the LM head is part of the
        model's fingerprint, not the task's)."""
        return describe(self, {"signal": self.signal_kind}, skip=("signal_kind", "head"))

    def __repr__(self):
        return f"CausalLMTask(signal={self.signal_kind!r})"

