"""The metagradient reference: the exact derivative of each query's loss through theta0's fine-tune with respect
to the training examples' weights (what MAGIC computes, Ilyas & Engstrom 2025).

Weight training example ``i``'s loss by ``w_i`` in every step of ``finetune`` (``batch_loss``: the minibatch loss
is the mean of ``w_i l_i``); the fine-tune ends at ``theta_T(w)``. The reference's score is

    S(i, q) = - d l_q(theta_T(w)) / d w_i   at w = 1,

positive = up-weighting ``i`` lowers the query's loss (helpful), the orientation of every other score in the
package. To first order, removing a set R of training examples (``w_i = 0`` for ``i`` in R) raises ``l_q`` by
``sum_{i in R} S(i, q)``: the linear datamodel the LDS compares with retraining.

How: the fine-tune runs once, keeping the trainable parameters and the optimiser state after every step (LoRA
adapters: small); then, for each query, reverse-mode differentiation goes back through the steps one at a time
(MAGIC's replay): step t's gradient is recomputed with its graph (``create_graph``), and the vector-Jacobian
product of the optimiser update maps the adjoint of the state after the step to the adjoint before it and adds
the step's derivative with respect to the weights. Only one step's graph is held at a time. The optimiser update
is written out differentiably here (AdamW and SGD as ``torch.optim`` define them, hyper-parameters read from the
optimiser ``make_optimizer`` builds), and the minibatches, learning-rate schedule and loss are ``finetune``'s own
(``step_batches``, ``lr_factor``, ``batch_loss``); the tests check the unrolled fine-tune against ``finetune``
and the derivative against finite differences of ``finetune`` in the weights, and against bergson's MAGIC where
bergson is installed. LoRA's B = 0 start gives the A matrices an exactly zero first gradient, so Adam's second
moment is 0 there: its square root is differentiated as 0 at 0 (``_sqrt0``), the true value (bergson's AdamW
gives NaN for the first batch's examples there unless its ``eps_root`` is positive).

Smoothness: the derivative is exact, but whether it predicts removals depends on how smooth the fine-tune is in
the weights. AdamW with torch's eps = 1e-8 normalises gradient components near zero to steps of size lr
(``g / (|g| + eps)``), so components whose gradient is within a few eps of 0 weigh heavily in the derivative and
flip within a tiny change of the weights. On the tests' tiny Llama (float64, 4 AdamW steps) central differences
match it to 7e-6 at h = 1e-6 but not at h >= 1e-3, and its Pearson correlation with the effect of removing one
example is 0.49; with eps = 1e-3 the agreement holds to 2e-3 at h = 0.1 and the correlation is 0.97; with SGD,
1.00. On notebook 03's default math set (SmolLM2, 40 examples, 15 steps, float32), for training example 4 and
query 0: with eps = 1e-8 the metagradient is 0.081, central differences give 0.084 at h = 1e-4 but 0.004 at
h = 0.1 (removing the example: +0.007); with eps = 1e-4 the largest score (example 36) is 0.0463 and central
differences at h = 0.1 give 0.0463. MAGIC asks for such a smooth ("metasmooth") training run.
"""

from __future__ import annotations

import torch

from ..progress import progress_bar
from .data import batches
from .task import CausalLMTask
from .training import as_dataset, batch_loss, lr_factor, make_optimizer, step_batches

__all__ = ["metagradient_scores"]


def _sqrt0(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` whose derivative is 0 where ``v == 0`` (not inf): Adam's second moment is 0 only where every
    gradient so far was 0, and there the first moment is 0 too, so the true derivative through it is 0."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _adamw_update(group: dict):
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("metagradient: AdamW with amsgrad or maximize is not supported")

    def update(theta, state, grads, lr, k):
        """torch.optim.AdamW's step ``k`` (1-based): decoupled decay, moments, bias-corrected step."""
        m, v = state
        bc1, bc2 = 1 - beta1 ** k, (1 - beta2 ** k) ** 0.5
        new_theta, new_m, new_v = [], [], []
        for p, m_, v_, g in zip(theta, m, v, grads):
            m_ = beta1 * m_ + (1 - beta1) * g
            v_ = beta2 * v_ + (1 - beta2) * g * g
            new_theta.append(p * (1 - lr * wd) - (lr / bc1) * m_ / (_sqrt0(v_) / bc2 + eps))
            new_m.append(m_)
            new_v.append(v_)
        return new_theta, [new_m, new_v]

    return update, 2


def _sgd_update(group: dict):
    mu, wd = group["momentum"], group["weight_decay"]
    if group.get("dampening") or group.get("nesterov") or group.get("maximize"):
        raise ValueError("metagradient: SGD with dampening, nesterov or maximize is not supported")

    def update(theta, state, grads, lr, k):
        """torch.optim.SGD's step: weight decay into the gradient, heavy-ball buffer (the first step's buffer is
        the gradient itself, as a zero buffer gives), parameter step."""
        (buf,) = state
        new_theta, new_buf = [], []
        for p, b, g in zip(theta, buf, grads):
            d = g + wd * p if wd else g
            b = mu * b + d if mu else d
            new_theta.append(p - lr * b)
            new_buf.append(b)
        return new_theta, [new_buf]

    return update, 1


def _collate(ds, idx, device):
    return {k: v.to(device) for k, v in next(batches(ds, len(idx), idx)).items()}


def metagradient_scores(model, tokenizer, train, queries, *, epochs: int = 2, lr: float = 1e-3,
                        batch_size: int = 8, seed: int = 0, max_length: int = 256, weight_decay: float = 0.0,
                        optimizer: str = "adamw", momentum: float = 0.0, eps: float = 1e-8, query_chunk: int = 1,
                        progress: bool = False) -> torch.Tensor:
    """``(n_train, n_query)`` float64 on the CPU: the exact metagradient ``S(i, q) = -d l_q(theta_T) / d w_i`` at
    ``w = 1`` (positive = helpful; see the module docstring), where ``theta_T`` is ``finetune(model, tokenizer,
    train, epochs=..., lr=..., batch_size=..., seed=..., ...)`` from the model's current trainable parameters
    (e.g. the seeded initial adapters) and ``l_q`` is query ``q``'s mean response NLL (``response_nll``).

    ``train`` / ``queries``: lists of example dicts or ``TextDataset``s (with cached bottom features for a split
    model). The recipe keywords are ``finetune``'s. The model ends at ``theta_T`` (eval mode), as ``finetune``
    leaves it. Cost: one fine-tune, one gradient per query, and per query and step one vector-Jacobian product
    through the step's gradient (a double backward over the step's minibatch); memory: the optimiser state of
    every step plus one step's double-backward graph. ``query_chunk`` queries go through a step in one batched
    product (``is_grads_batched``): fewer passes, that many times the memory of the double backward.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ds = as_dataset(tokenizer, train, max_length)
    dq = as_dataset(tokenizer, queries, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("metagradient_scores: the model has no trainable parameters (add LoRA adapters first)")
    if query_chunk < 1:
        raise ValueError(f"metagradient_scores: query_chunk must be at least 1, got {query_chunk}")
    device = params[0].device
    n, nq = len(ds), len(dq)
    plan = step_batches(n, epochs=epochs, batch_size=batch_size, seed=seed)
    total = len(plan)
    group = make_optimizer(params, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                           momentum=momentum, eps=eps).param_groups[0]
    update, n_state = (_adamw_update if optimizer == "adamw" else _sgd_update)(group)
    task = CausalLMTask()
    model.eval()

    def load(theta):
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)

    # forward: the fine-tune, keeping (theta_t, optimiser state_t) before every step
    theta = [p.detach().clone() for p in params]
    state = [[torch.zeros_like(p) for p in theta] for _ in range(n_state)]
    trajectory = []
    bar = progress_bar(total=total * (nq + 1), desc="metagradient", progress=progress, leave=False)
    for t, idx in enumerate(plan):
        trajectory.append((theta, state))
        load(theta)
        grads = torch.autograd.grad(batch_loss(model, task, _collate(ds, idx, device)), params)
        with torch.no_grad():
            theta, state = update(theta, state, grads, group["lr"] * lr_factor(t, total), t + 1)
        bar.update(1)
    load(theta)

    # the adjoints of the state after the last step, one row per query: the query's loss gradient for the
    # parameters, zero for the optimiser state; laid out as the update's outputs (parameters, then each state part)
    adj = [torch.zeros(nq, *p.shape, dtype=p.dtype, device=device) for _ in range(1 + n_state) for p in params]
    for q in range(nq):
        batch = _collate(dq, torch.tensor([q]), device)
        for a, g in zip(adj, torch.autograd.grad(task.loss(task.outputs(model, batch), batch).sum(), params)):
            a[q] = g
    w_bar = torch.zeros(nq, n, dtype=torch.float64)

    # backward: replay each step with its graph and pull every query's adjoint through it
    with sdpa_kernel(SDPBackend.MATH):   # attention's fused kernels have no double backward
        for t in reversed(range(total)):
            theta_t, state_t = trajectory[t]
            load(theta_t)
            state_in = [[s.detach().clone().requires_grad_(True) for s in part] for part in state_t]
            w = torch.ones(n, dtype=params[0].dtype, device=device, requires_grad=True)
            batch = _collate(ds, plan[t], device)
            grads = torch.autograd.grad(batch_loss(model, task, batch, w), params, create_graph=True)
            new_theta, new_state = update(params, state_in, grads, group["lr"] * lr_factor(t, total), t + 1)
            outs = list(new_theta) + [s for part in new_state for s in part]
            ins = list(params) + [s for part in state_in for s in part] + [w]
            for a in range(0, nq, query_chunk):
                b = min(a + query_chunk, nq)
                if b - a == 1:
                    res = torch.autograd.grad(outs, ins, grad_outputs=[x[a] for x in adj], retain_graph=True,
                                              allow_unused=True)
                    res = [None if r is None else r[None] for r in res]
                else:
                    res = torch.autograd.grad(outs, ins, grad_outputs=[x[a:b] for x in adj], retain_graph=True,
                                              allow_unused=True, is_grads_batched=True)
                for x, r in zip(adj, res):
                    x[a:b] = 0 if r is None else r.detach()
                if res[-1] is not None:
                    w_bar[a:b] += res[-1].detach().double().cpu()
                bar.update(b - a)
            del grads, new_theta, new_state, outs
    bar.close()
    load(theta)
    model.eval()
    return -w_bar.T.contiguous()
