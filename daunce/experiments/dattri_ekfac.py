"""SHIM for dattri 0.3.0's EK-FAC influence function (``IFAttributorEKFAC``): two defects corrected.

Written for dattri **0.3.0** only. ``corrected_ekfac`` returns this subclass when the installed dattri
is that version; on any other version it returns dattri's own class unchanged and warns, so that a
fixed release is used as it is (``tests/test_baselines.py`` shows both the defect and the correction
against kronfluence's empirical-Fisher EK-FAC on a tiny linear model).

The defects (EK-FAC approximates the Fisher of a linear layer by ``Q_S diag(lambda) Q_S^T`` kron
``Q_A diag(...) Q_A^T`` and preconditions a gradient ``G`` (out x in) in the eigenbasis: ``Q_S^T G Q_A``):

1. ``torch.linalg.eigh`` returns eigenvectors as *columns*, but dattri projects with rows:
   ``q_s @ G @ q_a.T`` (in ``dattri.func.fisher._update_lambda`` and in ``transform_test_rep``).
   Here the cached eigenvector matrices are stored transposed (rows = eigenvectors), which makes
   every one of dattri's projections, and the eigenvalue correction computed from them, the right one.
2. With a bias, dattri flattens weight and bias, concatenates them and reshapes to ``(out, in + 1)``,
   so row k holds ``W[k, k:]`` then ``W[k + 1, :k + 1]`` and the bias column does not line up with the
   activation factor's appended ones. Here ``[W | b]`` is built column-wise, and the result is split
   back into the weight and bias blocks in the order of the training representation.

One more choice that is not a defect when the measurement is the loss: dattri estimates the Fisher
from the task's *target* function. Here it is always estimated from the training loss, so the query
measurement (e.g. the margin) can differ from the loss the Fisher belongs to.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from importlib.metadata import version

import torch

WRITTEN_FOR = "0.3.0"


def corrected_ekfac():
    """The EK-FAC attributor class to use: the corrected subclass on dattri 0.3.0, dattri's own otherwise."""
    from dattri.algorithm import IFAttributorEKFAC

    if version("dattri") != WRITTEN_FOR:
        warnings.warn(f"daunce's EK-FAC shim was written for dattri {WRITTEN_FOR}; dattri {version('dattri')} "
                      "is installed, so its own IFAttributorEKFAC is used unchanged", stacklevel=2)
        return IFAttributorEKFAC

    class CorrectedEKFAC(IFAttributorEKFAC):
        """dattri 0.3.0's ``IFAttributorEKFAC`` with eigenvectors as columns and ``[W | b]`` aligned."""

        def cache(self, full_train_dataloader, max_iter=None) -> None:
            from dattri.func.fisher import estimate_covariance, estimate_eigenvector, estimate_lambda

            self.full_train_dataloader = full_train_dataloader
            max_iter = len(full_train_dataloader) if max_iter is None else max_iter

            def hook(module, inputs, outputs):
                inputs = inputs[0] if isinstance(inputs, tuple) else inputs
                outputs = outputs[0] if isinstance(outputs, tuple) else outputs
                if module.bias is not None:
                    inputs = torch.cat([inputs, inputs.new_ones((*inputs.shape[:-1], 1))], dim=-1)
                outputs.retain_grad()
                self.layer_cache[self.module_to_name[module]] = (inputs, outputs)

            handles = [self.task.model.get_submodule(n).register_forward_hook(hook) for n in self.module_name]
            try:
                # the Fisher of the training loss, whatever the query measurement (the task's target) is
                func = partial(self.task.get_loss_func(), self.task.get_param()[0])
                cov = estimate_covariance(func, full_train_dataloader, self.layer_cache, max_iter, device=self.device)
                q = estimate_eigenvector(cov)
                # defect 1: eigh's eigenvectors are columns; dattri projects with rows, so store Q^T
                self.cached_q = {name: (q_a.T.contiguous(), q_s.T.contiguous()) for name, (q_a, q_s) in q.items()}
                self.cached_lambdas = estimate_lambda(func, full_train_dataloader, self.cached_q, self.layer_cache,
                                                      max_iter, device=self.device)
            finally:
                for h in handles:
                    h.remove()

        def transform_test_rep(self, ckpt_idx: int, test_rep: torch.Tensor) -> torch.Tensor:
            if ckpt_idx != 0:
                raise ValueError("EK-FAC supports a single checkpoint")
            params = dict(self.task.model.named_parameters())
            blocks, at = {}, 0
            for name in self.layer_name:  # the training representation's layout: weight, bias per module
                size = math.prod(params[name].shape)
                blocks[name] = test_rep[:, at:at + size].reshape(-1, *params[name].shape)
                at += size
            out = []
            for name in self.module_name:
                w = blocks[name + ".weight"]
                has_bias = self.name_to_module[name].bias is not None
                v = torch.cat([w, blocks[name + ".bias"].unsqueeze(-1)], dim=-1) if has_bias else w  # defect 2
                q_a, q_s = self.cached_q[name]  # rows are eigenvectors (see cache)
                ifvp = q_s.T @ ((q_s @ v @ q_a.T) / (self.cached_lambdas[name] + self.damping)) @ q_a
                out.append(ifvp[..., :w.shape[-1]].flatten(1))
                if has_bias:
                    out.append(ifvp[..., -1])
            return torch.cat(out, dim=1)

    return CorrectedEKFAC
