"""``"auto"`` settings: damping, rho and the isotropic term from theta0 and the training data alone.

A user without retraining ground truth cannot tune ``damping``, ``rho`` and ``isotropic_noise``. The rule
here reads only theta0, the task and (a subsample of) the training set. In the terms of
``docs/method.md`` (linearised regime, ``Delta_k = theta_k - theta0``):

* **The copy's curvature.** A copy minimises ``objective(theta) + lambda/2 ||Delta||^2 - eta^T Delta``;
  at theta0 with eps = 0 the objective's Hessian ``C`` is the curvature every copy sees: the Gauss-Newton
  matrix for ``"if"`` (gamma G), ``2 gamma G_emp`` (the empirical Fisher) for ``"efim"`` and ``"trak"``,
  the loss Hessian for ``"bootstrap"``. Its spectrum is estimated by stochastic Lanczos quadrature
  (``probes`` random starts x ``lanczos_steps`` Hessian-vector products of that objective on up to
  ``n_examples`` training examples, by double backward or, where the model has no second derivative,
  central differences of gradients; negative Ritz values are clipped to 0).

* **damping.** Two lower bounds, the larger wins. (a) Approximation: the ground truth an attribution is
  judged by (retraining on half the data) is far from theta0, where the low-curvature directions are the
  least linear, so the damping is kept at a fixed fraction of the top curvature, ``lambda >= RELATIVE_DAMPING
  * c_max`` (a fraction is invariant to the scale of the loss); on ``benchmarks/auto_settings.py`` the
  grid-best damping sat at 0.035-0.31 times the top curvature, and the d_lambda bound alone (below) damped
  far too little at K = 256. (b) Monte-Carlo noise: the score is a Monte-Carlo estimate of a quadratic form whose kernel
  has effective rank ``d_lambda = tr(C (C + lambda I)^-1)``, the number of curvature directions above the
  damping, and its relative noise falls like ``sqrt(d_lambda / K)``; ``lambda`` is kept at least the value
  where ``d_lambda = DIRECTIONS_PER_COPY * K`` (relative noise about 1/2), which matters for small K.

* **isotropic_noise.** The isotropic term makes the limit the damped influence function exactly, but
  adds noise in every one of the d directions: the kernel of the copies' displacement covariance changes
  from ``C (C + lambda)^-2`` to ``(C + lambda)^-1``, whose effective rank
  ``r_iso = (sum 1/(c_j + lambda))^2 / sum 1/(c_j + lambda)^2`` counts the flat directions too. It is
  turned on when ``r_iso <= K`` (the K copies can resolve it), off otherwise.

* **rho.** rho only sets the scale of the perturbation: in the linear regime the covariance is
  proportional to rho^2 and the ranking does not depend on it, so it should be as small as float
  rounding allows and small enough that the copies stay linear. It is *measured*: one probe
  displacement ``Delta = (C + lambda)^-1 b`` with ``b = (1/m) sum eps_i grad l_i`` (conjugate gradients on
  Hessian-vector products, scaled to a subset of ``round(r n)`` examples, eps ~ U(-rho_p, rho_p))
  gives the per-example losses at theta0 +- Delta; their curvature share
  ``nl = ||l(+) + l(-) - 2 l0|| / ||l(+) - l(-)||`` grows like rho in the quadratic regime, so
  ``rho = rho_p * NONLINEARITY / nl``, capped at 1 and raised if needed so the first-order loss change
  stays ``FLOAT_MARGIN`` times above float rounding of the losses.

For ``"bootstrap"`` (no linear term, no eps) rho resolves to 1 and the isotropic term to False (both inert).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from .config import AUTO, DaunceConfig
from .engines.context import ModelContext
from .engines.sequential import theta0_values
from .objectives import perturbed_objective

#: Target of the damping rule, ``d_lambda = DIRECTIONS_PER_COPY * K``; 1/4 means a relative Monte-Carlo
#: noise about sqrt(1/4) = 0.5 per score at K copies (the rule of thumb of docs/method.md).
DIRECTIONS_PER_COPY = 0.25
#: The damping's floor relative to the top curvature (the approximation bound of the rule). 0.1 is the
#: geometric mean of grid-best damping / top curvature over the four wine and breast-cancer pairs of
#: ``benchmarks/auto_settings.py`` (0.035-0.31); the make_classification pairs were not used to choose it.
RELATIVE_DAMPING = 0.1
#: Target curvature share of the probe's loss change (the rho rule): 5 % second order.
NONLINEARITY = 0.05
#: The first-order change of the losses must stay this many times above their float rounding.
FLOAT_MARGIN = 1e3


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


class _Curvature:
    """Hessian-vector products of a copy's objective at theta0 (eps = 0) on a subsample of the training set."""

    def __init__(self, ctx: ModelContext, config: DaunceConfig, train: Dataset, idx: torch.Tensor):
        self.ctx, self.config, self.train, self.idx = ctx, config, train, idx
        self.params = ctx.params
        self.batches = []
        ctx.reset()
        ctx.model.train(False)
        for s in range(0, len(idx), ctx.eval_batch_size):
            bi = idx[s : s + ctx.eval_batch_size]
            batch = ctx.fetch(train, bi)
            self.batches.append((bi, batch, theta0_values(ctx, config, batch, len(bi))))

    def _objective(self, batch, base, n: int) -> torch.Tensor:
        """Sum over the batch of the eps = 0 objective (its Hessian at theta0 is the copy's curvature)."""
        ctx, cfg = self.ctx, self.config
        out = ctx.outputs(batch)
        loss = ctx.loss(out, batch, n)
        if cfg.variant == "bootstrap":
            return loss.sum()
        kw = dict(loss0=base["loss"], outputs=out, outputs0=base["outputs"], grad0=base["grad"],
                  eps=torch.zeros_like(loss))
        if cfg.variant == "trak":
            kw["f"], kw["f0"] = ctx.output_function(out, batch, n), base["f"]
        return perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma, **kw).sum()

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for a flat ``(d,)`` vector (C: the Hessian of the mean eps = 0 objective at theta0): by double
        backward, or, for models whose operations have no second derivative (e.g. fused attention kernels), by a
        central difference of gradients (``self.exact`` says which)."""
        if self.exact:
            try:
                return self._hvp_exact(v)
            except RuntimeError:
                self.exact = False
        return self._hvp_difference(v)

    exact = True

    def _hvp_exact(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.ctx.unflatten(v)
        total = torch.zeros_like(v)
        with torch.enable_grad():
            for bi, batch, base in self.batches:
                obj = self._objective(batch, base, len(bi))
                grads = torch.autograd.grad(obj, self.params, create_graph=True, allow_unused=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
                if not torch.is_tensor(dot) or not dot.requires_grad:
                    continue
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                total += _flat([h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)]
                               ).to(total.dtype)
        return total / len(self.idx)

    def _gradient_at(self, delta: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        ctx.load_state([t0 + d for t0, d in zip(ctx.theta0, ctx.unflatten(delta))])
        total = torch.zeros_like(delta)
        with torch.enable_grad():
            for bi, batch, base in self.batches:
                obj = self._objective(batch, base, len(bi))
                grads = torch.autograd.grad(obj, self.params, allow_unused=True)
                total += _flat([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
                               ).to(total.dtype)
        ctx.reset()
        return total / len(self.idx)

    def _hvp_difference(self, v: torch.Tensor) -> torch.Tensor:
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        scale = max(1.0, float(_flat([t.detach() for t in self.ctx.theta0]).norm()))
        h = math.sqrt(torch.finfo(v.dtype).eps) * scale
        u = v / norm
        return (self._gradient_at(h * u) - self._gradient_at(-h * u)) * (norm / (2 * h))

    def weighted_loss_grad(self, weights: torch.Tensor) -> torch.Tensor:
        """``(1/m) sum_i w_i grad l_i(theta0)`` over the subsample (one backward pass per batch)."""
        total = None
        s = 0
        with torch.enable_grad():
            for bi, batch, _ in self.batches:
                loss = self.ctx.loss(self.ctx.outputs(batch), batch, len(bi))
                w = weights[s : s + len(bi)].to(loss.device, loss.dtype)
                s += len(bi)
                grads = torch.autograd.grad((w * loss).sum(), self.params, allow_unused=True)
                g = _flat([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(grads, self.params)])
                total = g if total is None else total + g
        return total / len(self.idx)

    @torch.no_grad()
    def losses_at(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example losses (float64) of the subsample at theta0 + delta (the working model is reset after)."""
        ctx = self.ctx
        ctx.load_state([t0 + d for t0, d in zip(ctx.theta0, ctx.unflatten(delta))])
        out = torch.cat([ctx.loss(ctx.outputs(batch), batch, len(bi)).double().cpu()
                         for bi, batch, _ in self.batches])
        ctx.reset()
        return out


def lanczos_spectrum(hvp, d: int, dtype, device, steps: int = 30, probes: int = 4, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature: ``(nodes, weights)`` with ``tr f(C) ~ sum_j weights_j f(nodes_j)``
    (weights sum to d). ``probes`` Rademacher starts, ``steps`` Lanczos steps each, full reorthogonalisation."""
    g = torch.Generator().manual_seed(seed)
    steps = max(1, min(steps, d))
    nodes, weights = [], []
    for _ in range(probes):
        v = (torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1).to(device, dtype)
        v = v / v.norm()
        Q = [v]
        alpha, beta = [], []
        for j in range(steps):
            w = hvp(Q[-1])
            a = float((w * Q[-1]).sum())
            alpha.append(a)
            w = w - a * Q[-1] - (beta[-1] * Q[-2] if j > 0 else 0)
            for q in Q:  # full reorthogonalisation
                w = w - (w * q).sum() * q
            b = float(w.norm())
            if j == steps - 1 or b < 1e-10 * max(1.0, abs(a)):
                break
            beta.append(b)
            Q.append(w / b)
        T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if beta:
            off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        ev, U = torch.linalg.eigh(T)
        nodes.append(ev.clamp_min(0.0))
        weights.append(U[0] ** 2 * d / probes)
    return torch.cat(nodes), torch.cat(weights)


def effective_dimension(nodes: torch.Tensor, weights: torch.Tensor, lam: float) -> float:
    """``d_lambda = tr(C (C + lambda I)^-1)`` from a quadrature of C's spectrum."""
    return float((weights * nodes / (nodes + lam)).sum())


def damping_for(nodes: torch.Tensor, weights: torch.Tensor, target: float, floor: float = 0.0) -> float:
    """The lambda whose ``d_lambda`` equals ``target`` (bisection on log lambda), at least ``floor`` times the
    top curvature."""
    top = float(nodes.max()) if nodes.numel() else 0.0
    if top <= 0:
        return 1e-3
    lo, hi = top * max(floor, 1e-12), top * 1e6
    if effective_dimension(nodes, weights, lo) <= target:
        return lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if effective_dimension(nodes, weights, mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return math.sqrt(lo * hi)


def isotropic_rank(nodes: torch.Tensor, weights: torch.Tensor, lam: float) -> float:
    """Effective rank ``(tr M)^2 / tr(M^2)`` of ``M = (C + lambda)^-1`` (the isotropic-term kernel)."""
    inv = 1.0 / (nodes + lam)
    return float((weights * inv).sum() ** 2 / (weights * inv**2).sum())


def conjugate_gradient(matvec, b: torch.Tensor, iters: int = 30, rtol: float = 1e-4) -> torch.Tensor:
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    b2 = rs
    for _ in range(iters):
        Ap = matvec(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        a = rs / pAp
        x = x + a * p
        r = r - a * Ap
        rs_new = float((r * r).sum())
        if rs_new <= rtol**2 * b2:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def resolve(ctx: ModelContext, config: DaunceConfig, train: Dataset, *, n_examples: int = 256,
            lanczos_steps: int = 30, probes: int = 4, cg_iters: int = 30, seed: int = 0
            ) -> tuple[DaunceConfig, dict]:
    """``(resolved config, details)``: the config with every ``"auto"`` field replaced by its value (see the
    module docstring for the rule) and a dict of what the rule measured. Fields set explicitly are kept.
    The working model is left at theta0."""
    autos = config.auto_fields
    if not autos:
        return config, {}
    n = len(train)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(n, n_examples)]
    K = config.n_models
    info: dict = {"auto_fields": list(autos), "n_examples": len(idx)}
    changes: dict = {}
    bootstrap = config.variant == "bootstrap"
    if bootstrap:
        if config.rho == AUTO:
            changes["rho"] = 1.0
        if config.isotropic_noise == AUTO:
            changes["isotropic_noise"] = False
    need_curv = config.damping == AUTO or (not bootstrap and AUTO in (config.rho, config.isotropic_noise))
    lam = None if config.damping == AUTO else float(config.damping)
    if need_curv:
        curv = _Curvature(ctx, config, train, idx)
        p0 = _flat([p.detach() for p in ctx.params])
        d = p0.numel()
        nodes, weights = lanczos_spectrum(curv.hvp, d, p0.dtype, p0.device, lanczos_steps, probes, seed)
        info.update(d=d, top_curvature=float(nodes.max()), mean_curvature=float((weights * nodes).sum()) / d)
        if lam is None:
            lam = damping_for(nodes, weights, DIRECTIONS_PER_COPY * K, RELATIVE_DAMPING)
            changes["damping"] = lam
        info["d_lambda"] = effective_dimension(nodes, weights, lam)
        if not bootstrap and config.isotropic_noise == AUTO:
            r_iso = isotropic_rank(nodes, weights, lam)
            info["isotropic_rank"] = r_iso
            changes["isotropic_noise"] = bool(lam > 0 and r_iso <= K)
        if not bootstrap and config.rho == AUTO:
            changes["rho"], more = _measure_rho(curv, config, lam, n, idx, cg_iters, g)
            info.update(more)
    resolved = config.replace(**changes)
    if need_curv:
        info["hessian_vector_products"] = "double backward" if curv.exact else "central differences of gradients"
    info["resolved"] = {f: getattr(resolved, f) for f in autos}
    ctx.reset()
    return resolved, info


def _measure_rho(curv: _Curvature, config: DaunceConfig, lam: float, n: int, idx: torch.Tensor, cg_iters: int,
                 g: torch.Generator) -> tuple[float, dict]:
    """rho from one probe displacement (module docstring): curvature share of the loss change at NONLINEARITY."""
    rho_p = 0.1
    ms = len(idx)
    m = max(1, round(config.subset_ratio * n))
    eps = rho_p * (2 * torch.rand(ms, generator=g, dtype=torch.float64) - 1)
    b = curv.weighted_loss_grad(eps)
    if float(b.norm()) == 0.0:
        return 1.0, {"rho_probe_nonlinearity": 0.0}
    lam_eff = max(lam, 1e-8 * float(b.abs().max()))
    delta = conjugate_gradient(lambda v: curv.hvp(v) + lam_eff * v, b, cg_iters)
    delta = delta * math.sqrt(ms / m)  # a copy's subset has m examples: its b is sqrt(ms / m) times this one's
    l0 = curv.losses_at(torch.zeros_like(delta))
    lp, lm = curv.losses_at(delta), curv.losses_at(-delta)
    first = (lp - lm).norm() / 2
    second = (lp + lm - 2 * l0).norm() / 2
    nl = float(second / first) if float(first) > 0 else 0.0
    rho = 1.0 if nl <= 0 else min(1.0, rho_p * NONLINEARITY / nl)
    # float floor: the first-order change per unit rho, against float32 rounding of the losses
    per_rho = float(first) / rho_p / math.sqrt(ms)
    floor = FLOAT_MARGIN * torch.finfo(torch.float32).eps * max(float(l0.abs().mean()), 1e-12) / max(per_rho, 1e-30)
    rho = float(min(1.0, max(rho, floor)))
    return rho, {"rho_probe_nonlinearity": nl, "rho_float_floor": floor}


__all__ = ["resolve", "lanczos_spectrum", "effective_dimension", "damping_for", "isotropic_rank",
           "conjugate_gradient", "DIRECTIONS_PER_COPY", "RELATIVE_DAMPING", "NONLINEARITY", "FLOAT_MARGIN"]
