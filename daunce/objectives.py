"""The perturbed objectives of Daunce, per example.

For copy k, training example i in its subset, perturbation ``eps_i`` and ``Delta = theta - theta0``:

* ``"if"``        ``gamma (l_i(theta) - l_i(theta0)) - (1 + eps_i) lin_i``
* ``"efim"``      ``gamma (l_i(theta) - l_i(theta0))^2 - eps_i lin_i``
* ``"trak"``      ``gamma (f_i(theta) - f_i(theta0))^2 - eps_i lin_i``   (f: the task's output function)
* ``"bootstrap"`` ``l_i(theta)``                                        (needs only a fine-tuning API)

where ``lin_i = dl/dout(out_i(theta0))^T (out_i(theta) - out_i(theta0))`` is the linear term
``grad_l_i(theta0)^T Delta`` taken through the chain rule at the model outputs: it has the exact
gradient at theta0 and needs no per-example parameter gradient. (Through a nonlinear network it
also subtracts the outputs' curvature, so the "if" objective's curvature at theta0 is the
Gauss-Newton part of the Hessian; for a linear model the two are the same.)

The whole objective of a copy is the mean over its subset plus the proximal damping and isotropic
noise terms, ``lambda/2 ||Delta||^2 - eta^T Delta`` (see ``proximal_term``).
"""

from __future__ import annotations

import torch


def linear_term(outputs: torch.Tensor, outputs0: torch.Tensor, grad0: torch.Tensor) -> torch.Tensor:
    """``grad0^T (outputs - outputs0)`` per example: ``(B,)``."""
    return ((outputs - outputs0.to(outputs.dtype)) * grad0.to(outputs.dtype)).flatten(1).sum(1)


def perturbed_objective(variant: str, *, loss, gamma: float, eps=None, loss0=None, outputs=None,
                        outputs0=None, grad0=None, f=None, f0=None) -> torch.Tensor:
    """Per-example perturbed objective, ``(B,)``; its mean over a minibatch is what a copy minimises.

    Args:
        variant: "if", "efim", "trak" or "bootstrap".
        loss: ``(B,)`` losses at theta. loss0: ``(B,)`` cached losses at theta0.
        outputs, outputs0, grad0: model outputs at theta and theta0, and dl/dout at theta0, ``(B, ...)``.
        eps: ``(B,)`` perturbations. f, f0: the output function at theta and theta0 (``"trak"``).
    """
    if variant == "bootstrap":
        return loss
    lin = linear_term(outputs, outputs0, grad0)
    if variant == "if":
        return gamma * (loss - loss0) - (1.0 + eps) * lin
    if variant == "efim":
        return gamma * (loss - loss0) ** 2 - eps * lin
    if variant == "trak":
        return gamma * (f - f0) ** 2 - eps * lin
    raise ValueError(f"unknown variant {variant!r}")


def proximal_term(params, params0, damping: float, eta=None) -> torch.Tensor:
    """``damping/2 * ||theta - theta0||^2 - eta^T (theta - theta0)`` over matching lists of tensors."""
    total = params[0].new_zeros(())
    for i, (p, p0) in enumerate(zip(params, params0)):
        delta = p - p0
        if damping:
            total = total + 0.5 * damping * (delta * delta).sum()
        if eta is not None:
            total = total - (eta[i] * delta).sum()
    return total
