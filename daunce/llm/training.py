"""LoRA fine-tuning, response likelihoods and greedy generation.

``finetune`` is theta0's recipe (Adam on the mean response-token NLL, linear decay to 0); the removal
evaluation retrains with it. ``response_nll`` / ``response_log_likelihood`` score the responses of a
list of examples (or a ``TextDataset``) under a model.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch

from ..progress import progress_bar
from .data import IGNORE, TextDataset, batches, prompt_messages
from .task import CausalLMTask


def _as_dataset(tokenizer, examples, max_length):
    return examples if isinstance(examples, TextDataset) else TextDataset(tokenizer, examples, max_length)


def finetune(model, tokenizer, examples, *, epochs: int = 2, lr: float = 1e-3, batch_size: int = 8,
             seed: int = 0, max_length: int = 256, weight_decay: float = 0.0, progress: bool = True,
             desc: str = "fine-tune"):
    """Fine-tune the model's trainable parameters (LoRA adapters) in place on ``examples`` (a list of
    dicts or a ``TextDataset``): Adam on the mean response-token NLL of each minibatch, a linear
    learning-rate decay to 0, shuffling from ``seed``. Returns the model (eval mode).

    This is theta0's recipe; the removal evaluation retrains with it from the base model."""
    ds = _as_dataset(tokenizer, examples, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (add LoRA adapters first)")
    task = CausalLMTask()
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    device = next(model.parameters()).device
    model.train(False)  # no dropout: deterministic, as the copies are
    bar = progress_bar(total=total, desc=desc, progress=progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for batch in batches(ds, batch_size, order):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = task.loss(task.outputs(model, batch), batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def _response_stats(model, tokenizer, examples, batch_size, max_length):
    ds = _as_dataset(tokenizer, examples, max_length)
    task = CausalLMTask()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    tot, cnt = [], []
    for batch in batches(ds, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        t, c = task.token_losses(task.outputs(model, batch), batch)
        tot.append(t.double().cpu())
        cnt.append(c.double().cpu())
    model.train(was)
    return torch.cat(tot), torch.cat(cnt)


def response_nll(model, tokenizer, examples, batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """``(n,)`` mean NLL of each example's response tokens (float64, higher = worse)."""
    tot, cnt = _response_stats(model, tokenizer, examples, batch_size, max_length)
    return tot / cnt.clamp_min(1)


@torch.no_grad()
def greedy_matches(model, tokenizer, examples, batch_size: int = 16, max_length: int = 256,
                   end_token: Optional[int] = None) -> torch.Tensor:
    """``(n,)`` bool: would greedy decoding after each example's prompt reproduce its response? True where the
    model's most likely next token equals the response's at every response position up to ``end_token`` (the
    end-of-turn token, included; the template's tokens after it are not compared), each position fed the
    response's own previous tokens. Greedy decoding reproduces the response exactly when this holds, so it is a
    generation test run in one forward pass, on split models (``daunce.llm.split_model``) too."""
    ds = _as_dataset(tokenizer, examples, max_length)
    task = CausalLMTask()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for batch in batches(ds, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = task.outputs(model, batch)
        target = batch["labels"][:, 1 : hidden.shape[1]]
        compared = target != IGNORE
        if end_token is not None:   # positions after the first end-of-turn token are not generated
            ended = (target == end_token).long()
            compared &= (ended.cumsum(1) - ended) == 0
        predicted = task.head(hidden[:, :-1]).argmax(-1)
        out.append(((predicted == target) | ~compared).all(1).cpu())
    model.train(was)
    return torch.cat(out)


def response_log_likelihood(model, tokenizer, examples, batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """``(n,)`` summed log-probability of each example's response tokens (float64, higher = better)."""
    return -_response_stats(model, tokenizer, examples, batch_size, max_length)[0]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence, max_new_tokens: int = 128, batch_size: int = 8,
             progress: bool = False) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches). A prompt is a string, or an example
    dict rendered as in training (its optional ``"system"`` turn included)."""
    device = next(model.parameters()).device
    out = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in progress_bar(range(0, len(prompts), batch_size), desc="generate", progress=progress, leave=False):
            texts = [tokenizer.apply_chat_template(prompt_messages(p if isinstance(p, dict) else {"prompt": p}),
                                                   tokenize=False, add_generation_prompt=True)
                     for p in prompts[s : s + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return [o.strip() for o in out]


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
