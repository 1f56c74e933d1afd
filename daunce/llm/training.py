"""LoRA fine-tuning, response likelihoods and greedy generation.

``finetune`` is theta0's recipe (AdamW on the mean response-token NLL, linear decay to 0); the removal
evaluation retrains with it. Its pieces (``step_batches``, ``lr_factor``, ``make_optimizer``, ``batch_loss``) are
shared with ``daunce.llm.metagradient``, which differentiates the same fine-tune. ``response_nll`` /
``response_log_likelihood`` score the responses of a list of examples (or a ``TextDataset``) under a model.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..progress import progress_bar
from .data import IGNORE, TextDataset, batches, prompt_messages
from .task import CausalLMTask


def as_dataset(tokenizer, examples, max_length):
    """``examples`` as a ``TextDataset`` (tokenised with ``tokenizer`` up to ``max_length``), or as they are when they
    already are one."""
    return examples if isinstance(examples, TextDataset) else TextDataset(tokenizer, examples, max_length)


OPTIMIZERS = ("adamw", "sgd")


def step_batches(n: int, *, epochs: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """theta0's minibatch schedule: one index tensor per optimiser step, ``epochs`` passes over ``range(n)``, each
    in a fresh order from ``torch.randperm`` under a generator seeded with ``seed``, cut into batches of
    ``batch_size`` (the last of an epoch may be smaller). ``finetune`` and ``metagradient_scores`` both follow it."""
    g = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        plan.extend(order[s : s + batch_size] for s in range(0, n, batch_size))
    return plan


def lr_factor(step: int, total: int) -> float:
    """theta0's learning-rate schedule: the factor of the base learning rate at (0-based) ``step`` of ``total``,
    a linear decay ``1 - step / total`` (1 at the first step, ``1 / total`` at the last)."""
    return max(0.0, 1.0 - step / total)


def make_optimizer(params, *, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                   momentum: float = 0.0, eps: float = 1e-8) -> torch.optim.Optimizer:
    """theta0's optimiser on ``params``: ``"adamw"`` (``torch.optim.AdamW``, its default betas, ``eps`` its
    denominator's floor, torch's default 1e-8) or ``"sgd"`` (``torch.optim.SGD`` with ``momentum``);
    ``weight_decay`` as each defines it."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adamw":
        if momentum:
            raise ValueError(f"momentum={momentum} is an SGD setting; AdamW's are its betas")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def batch_loss(model, task: CausalLMTask, batch: dict, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fine-tune's loss on one collated batch: the mean over its examples of each example's mean response NLL,
    each multiplied by its weight ``weights[batch["index"]]`` when ``weights`` (one per training example) is
    given. Without weights it is the plain mean, so weights of 1 give the same loss."""
    losses = task.loss(task.outputs(model, batch), batch)
    if weights is not None:
        losses = losses * weights.to(losses.device, losses.dtype)[batch["index"]]
    return losses.mean()


def finetune(model, tokenizer, examples, *, epochs: int = 2, lr: float = 1e-3, batch_size: int = 8,
             seed: int = 0, max_length: int = 256, weight_decay: float = 0.0, optimizer: str = "adamw",
             momentum: float = 0.0, eps: float = 1e-8, weights: Optional[torch.Tensor] = None, progress: bool = True,
             desc: str = "fine-tune"):
    """Fine-tune the model's trainable parameters (LoRA adapters) in place on ``examples`` (a list of
    dicts or a ``TextDataset``): AdamW (or SGD, ``optimizer="sgd"``) on the mean response-token NLL of each
    minibatch (``batch_loss``), a linear learning-rate decay to 0 (``lr_factor``), the minibatches of
    ``step_batches`` (shuffled from ``seed``). ``weights`` ``(n,)``, optional: each example's loss is multiplied
    by its weight in every step (the weighted training whose derivative ``metagradient_scores`` computes). ``eps``:
    AdamW's; a larger one makes the fine-tune smoother in the weights (see ``daunce.llm.metagradient``).
    Returns the model (eval mode).

    This is theta0's recipe; the removal evaluation retrains with it from the base model."""
    ds = as_dataset(tokenizer, examples, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (add LoRA adapters first)")
    if weights is not None and tuple(weights.shape) != (len(ds),):
        raise ValueError(f"finetune: weights must have shape ({len(ds)},), one per example, got {tuple(weights.shape)}")
    task = CausalLMTask()
    plan = step_batches(len(ds), epochs=epochs, batch_size=batch_size, seed=seed)
    total = len(plan)
    opt = make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum, eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total))
    device = next(model.parameters()).device
    model.train(False)  # no dropout: deterministic, as the copies are
    bar = progress_bar(total=total, desc=desc, progress=progress, leave=False)
    for idx in plan:
        batch = {k: v.to(device) for k, v in next(batches(ds, len(idx), idx)).items()}
        loss = batch_loss(model, task, batch, weights)
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
    ds = as_dataset(tokenizer, examples, max_length)
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
    ds = as_dataset(tokenizer, examples, max_length)
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
