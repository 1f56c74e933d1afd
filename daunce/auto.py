"""``"auto"`` settings: damping, rho, the isotropic term and the copies' optimiser from theta0 and the training data.

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

* **damping.** Two lower bounds, the larger wins. (a) Approximation, measured on a proxy ground truth: the
  attribution is judged against retraining on half the data, so the rule retrains, cheaply: ``proxy_fine_tunes``
  fine-tunes of theta0 on random halves of the training set (full batch: L-BFGS with a strong-Wolfe line search
  until the gradient's largest entry is ``tol`` times its start; minibatches: the copies' own recipe), with
  ``proxy_queries`` training examples held out of all of them as queries. The estimator's limit at damping
  lambda predicts each fine-tune's change of a query's signal as ``-grad s_q^T K_lambda g_S``
  (``g_S``: the half's mean loss gradient at theta0), with the kernel ``K_lambda = (C + lambda)^-1`` (isotropic term on)
  or ``C (C + lambda)^-2`` (off); one Lanczos run per half, started at ``g_S``, gives these for every lambda at once
  (``krylov_solves``). The proxy LDS (mean over the held-out queries of the Spearman correlation, across the
  halves, of predicted and actual changes) is computed for lambda = c_max x 10^-6 ... 1 in half decades and for
  both kernels; the largest lambda within ``PROXY_TIE`` of each kernel's best is kept. Retraining from theta0
  rather than from scratch leaves out the seed's randomness; on ``benchmarks/auto_settings.py`` the proxy's
  choice landed within a factor of 10 of the grid's best damping. The proxy's own LDS is not a forecast of the real one
  where retraining does something fine-tuning from theta0 does not: in an earlier run of notebook 02 (each run records
  ``auto_proxy`` beside its ``daunce-auto`` row in ``papermill_runs/02_vision_lds.json``) it was 0.527 against a
  measured 0.521 on the convex logistic regression and 0.281 against 0.334 on the CNN, but 0.496 against 0.310 on the
  tanh MLP (Adam from scratch) and 0.283 against 0.128 on the BatchNorm ResNet trained from scratch by SGD, where the
  damping it picked was far from the ground truth's best. (b) Monte-Carlo noise: the score is a
  Monte-Carlo estimate of a quadratic form whose kernel has effective rank ``d_lambda = tr(C (C + lambda I)^-1)``,
  and its relative noise falls like ``sqrt(d_lambda / K)``; ``lambda`` is kept at least the value where
  ``d_lambda = DIRECTIONS_PER_COPY * K`` (relative noise about 1), which matters for small K.

* **isotropic_noise.** The isotropic term makes the limit the damped influence function exactly, but
  adds noise in every one of the d directions: the kernel of the copies' displacement covariance changes
  from ``C (C + lambda)^-2`` to ``(C + lambda)^-1``, whose effective rank
  ``r_iso = (sum 1/(c_j + lambda))^2 / sum 1/(c_j + lambda)^2`` counts the flat directions too. It is
  turned on only when the K copies can resolve it (``r_iso <= K`` at its damping) and the proxy prefers its
  kernel by more than ``PROXY_TIE``; otherwise the plain kernel's damping is taken.

* **rho.** rho only sets the scale of the perturbation: in the linear regime the covariance is
  proportional to rho^2 and the ranking does not depend on it, so it should be as small as float
  rounding allows and small enough that the copies stay linear. It is *measured*: one probe
  displacement ``Delta = (C + lambda)^-1 b`` with ``b = (1/m) sum eps_i grad l_i`` (conjugate gradients on
  Hessian-vector products, scaled to a subset of ``round(r n)`` examples, eps ~ U(-rho_p, rho_p))
  gives the per-example losses at theta0 +- Delta; their curvature share
  ``nl = ||l(+) + l(-) - 2 l0|| / ||l(+) - l(-)||`` grows like rho in the quadratic regime, so
  ``rho = rho_p * NONLINEARITY / nl``, capped at 1 and raised if needed so the first-order loss change
  stays ``FLOAT_MARGIN`` times above float rounding of the losses.

* **optimizer, lr, momentum.** The linear theory needs each copy at the minimum of its objective, reached
  with a displacement proportional to its perturbation. Adam's steps have the size lr whatever the
  gradient, so tiny perturbations get displacements of the step's size, not the perturbation's. Full-batch
  copies with the stopping test therefore get heavy-ball SGD with the parameters that are optimal for a
  quadratic with curvature in ``[lambda, CURVATURE_SAFETY * c_max + lambda]`` (``heavy_ball``): scale-free,
  and about ``sqrt(condition number)`` steps per e-fold of the error. Minibatch copies and copies with fixed
  ``steps`` keep Adam at lr ``ADAM_LR``.

For ``"bootstrap"`` (no linear term, no eps) rho resolves to 1 and the isotropic term to False (both inert).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset

from .config import ADAM_LR, AUTO, DaunceConfig
from .engines.context import ModelContext, check_training_set, set_copy_mode
from .engines.sequential import signals_now, theta0_values, train_copy
from .objectives import perturbed_objective
from .plans import make_plan

#: The noise bound of the damping rule, ``d_lambda <= DIRECTIONS_PER_COPY * K``: a relative Monte-Carlo noise of about
#: sqrt(d_lambda / K) <= 1 per score (the rule of thumb of docs/method.md). Measured once when the rule was written, on
#: an earlier run of notebook 02's MLP (K = 64, converged heavy-ball copies, report LDS): the proxy's damping 0.128 gave
#: 0.356, heavier dampings less (0.4: 0.326; 1.05, where d_lambda = K / 4: 0.288), lighter ones too (0.04: 0.324, 0.01:
#: 0.245): K / 4 was too strict.
DIRECTIONS_PER_COPY = 1.0
#: the version of this rule, kept in the manifest of every work folder whose settings it resolved: a folder resolved
#: by another version (its copies were trained with that version's values) is refused. 1: the damping floor
#: ``0.1 c_max``, Adam copies; 2: the proxy ground truth's damping and heavy-ball copies (the rule above)
RULE_VERSION = 2
#: The proxy ground truth of the damping rule (module docstring): this many warm-started fine-tunes on half
#: subsets, their signals measured on this many held-out training examples, predictions from this many Lanczos
#: steps per half. Sized for cost (16 fine-tunes are 1/16 of a K = 256 fit when a fine-tune costs a copy), not
#: tuned: on benchmarks/auto_settings.py the proxy's curves are smooth in lambda at this size.
PROXY_FINE_TUNES = 16
PROXY_QUERIES = 64
#: The fewest training examples the damping proxy (held-out queries and half-subset fine-tunes) can run on: 2 held-out
#: queries and 2 examples left, whose half subsets (of 1) differ between fine-tunes.
AUTO_MIN_EXAMPLES = 4
KRYLOV_STEPS = 30
#: Candidate dampings of the proxy, relative to the top curvature: 10^-6 ... 1 in half decades.
PROXY_GRID = tuple(10 ** (e / 2) for e in range(-12, 1))
#: A damping within this much proxy LDS of the best counts as tied; the largest tied one is taken (fewer
#: directions for the copies to resolve, the same proxy accuracy).
PROXY_TIE = 0.01
#: Heavy-ball copies (``lr``/``momentum`` "auto", full batch): the curvature bound is this many times the top
#: curvature measured at theta0 on a subsample (room for the subset's curvature and for curvature that grows
#: along the path: heavy ball is unstable above its bound). On benchmarks/auto_settings.py's LR / wine (K = 256)
#: 1.5 left 11 copies oscillating at the step cap (LDS 0.06); 3 and 6 gave the same LDS on the wine and
#: breast-cancer pairs (0.671 / 0.667, 0.559 / 0.560, 0.534 / 0.530) with all copies converged; 6 keeps the margin.
CURVATURE_SAFETY = 6.0
#: The smallest curvature the heavy-ball parameters assume, relative to the bound (caps the condition number
#: at 1e4 when the damping is 0).
MIN_CURVATURE_RATIO = 1e-4
#: Target curvature share of the probe's loss change (the rho rule): 5 % second order.
NONLINEARITY = 0.05
#: The first-order change of the losses must stay this many times above their float rounding.
FLOAT_MARGIN = 1e3


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _flat_grads(grads, params) -> torch.Tensor:
    """One flat vector of ``autograd.grad``'s output (``None``, an unused parameter, counts as zeros)."""
    return _flat([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])


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
                total += _flat_grads(hv, self.params).to(total.dtype)
        return total / len(self.idx)

    def _gradient_at(self, delta: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        ctx.load_state([t0 + d for t0, d in zip(ctx.theta0, ctx.unflatten(delta))])
        total = torch.zeros_like(delta)
        with torch.enable_grad():
            for bi, batch, base in self.batches:
                obj = self._objective(batch, base, len(bi))
                grads = torch.autograd.grad(obj, self.params, allow_unused=True)
                total += _flat_grads(grads, self.params).to(total.dtype)
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
                g = _flat_grads(grads, self.params)
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


def _lanczos(hvp, q0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, T)``: at most ``steps`` Lanczos steps on ``C`` from the unit vector ``q0`` with full
    reorthogonalisation (stopping early at a breakdown): the ``(s, d)`` basis and the ``(s, s)`` tridiagonal
    ``T = Q C Q^T`` (float64)."""
    Q = [q0]
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
    return torch.stack(Q[: len(alpha)]), T


def lanczos_spectrum(hvp, d: int, dtype, device, steps: int = 30, probes: int = 4, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature: ``(nodes, weights)`` with ``tr f(C) ~ sum_j weights_j f(nodes_j)``
    (weights sum to d). ``probes`` Rademacher starts, ``steps`` Lanczos steps each, full reorthogonalisation."""
    g = torch.Generator().manual_seed(seed)
    steps = max(1, min(steps, d))
    nodes, weights = [], []
    for _ in range(probes):
        v = (torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1).to(device, dtype)
        _, T = _lanczos(hvp, v / v.norm(), steps)
        ev, U = torch.linalg.eigh(T)
        nodes.append(ev.clamp_min(0.0))
        weights.append(U[0] ** 2 * d / probes)
    return torch.cat(nodes), torch.cat(weights)


def curvature_spectrum(ctx: ModelContext, config: DaunceConfig, train: Dataset, *, n_examples: int = 256,
                       steps: int = 30, probes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``lanczos_spectrum`` of a copy's curvature at theta0 (the Hessian of its eps = 0 objective on ``n_examples``
    training examples drawn with ``seed``): what ``resolve`` measures, for callers that set the damping
    themselves and want the heavy-ball step (``heavy_ball(nodes.max(), damping)``) or ``d_lambda`` from it.
    Fewer ``steps`` / ``probes`` / ``n_examples`` make it cheaper (each step is one Hessian-vector product over
    the examples) at the cost of a coarser quadrature; the top node is the first to converge.
    The working model is left at theta0."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[: min(len(train), n_examples)]
    curv = _Curvature(ctx, config.static(), train, idx)
    p0 = _flat([p.detach() for p in ctx.params])
    out = lanczos_spectrum(curv.hvp, p0.numel(), p0.dtype, p0.device, steps, probes, seed)
    ctx.reset()
    return out


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


def krylov_solves(hvp, b: torch.Tensor, lams, steps: int = KRYLOV_STEPS, squared: bool = False) -> torch.Tensor:
    """``(len(lams), d)``: ``(C + lambda I)^-1 b`` (``squared``: also ``C (C + lambda I)^-2 b``, stacked after) for
    every lambda from one Lanczos run on ``C`` started at ``b`` (the Krylov space of ``C + lambda I`` does not
    depend on lambda); full reorthogonalisation."""
    beta0 = float(b.norm())
    if beta0 == 0.0:
        return torch.zeros(len(lams) * (2 if squared else 1), b.numel(), dtype=b.dtype, device=b.device)
    Q, T = _lanczos(hvp, b / beta0, min(steps, b.numel()))
    e1 = torch.zeros(len(T), dtype=torch.float64)
    e1[0] = beta0
    ev, U = torch.linalg.eigh(T)
    ev = ev.clamp_min(0.0)
    proj = U.T @ e1
    funcs = [1.0 / (ev + lam) for lam in lams]
    if squared:
        funcs += [ev / (ev + lam) ** 2 for lam in lams]
    coef = torch.stack([U @ (f * proj) for f in funcs])
    return coef.to(b.dtype) @ Q


def _rank_rows(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).to(torch.float64)


def _spearman_columns(pred: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of every column of ``pred`` ``(..., M, Q)`` with the same column of ``actual``
    ``(M, Q)`` (over the M rows); NaN where a column is constant. Ties get ordinal ranks (``argsort``). This is
    not ``daunce.metrics.columnwise_spearman`` (average ranks, 0 for a constant column): the two differ on the
    proxy's held-out signals (with it, benchmarks/auto_settings.py's MLP / breast cancer resolves another
    damping), and the committed "auto" results were made with this one."""
    rp = _rank_rows(pred.transpose(-1, -2))
    ra = _rank_rows(actual.T)
    rp, ra = rp - rp.mean(-1, keepdim=True), ra - ra.mean(-1, keepdim=True)
    den = rp.norm(dim=-1) * ra.norm(dim=-1)
    return (rp * ra).sum(-1) / den


def _fine_tune_lbfgs(ctx: ModelContext, config: DaunceConfig, train: Dataset, subset: torch.Tensor,
                     report: dict) -> None:
    """Warm-started full-batch fine-tune of the working model on ``train[subset]`` (mean loss) by L-BFGS with a
    strong-Wolfe line search, until the gradient's largest entry is ``config.tol`` times its value at theta0 or
    ``config.max_steps`` loss evaluations; ``report`` receives ``"steps"`` (evaluations) and ``"converged"``."""
    ctx.reset()
    set_copy_mode(ctx.model, config)
    params = ctx.params
    m = len(subset)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        for p in params:
            p.grad = None
        total = 0.0
        for s in range(0, m, ctx.eval_batch_size):
            bi = subset[s : s + ctx.eval_batch_size]
            batch = ctx.fetch(train, bi)
            loss = ctx.loss(ctx.outputs(batch), batch, len(bi)).sum() / m
            loss.backward()
            total += float(loss.detach())
        return torch.tensor(total)

    closure()
    g0 = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=config.max_steps, max_eval=config.max_steps,
                            tolerance_grad=config.tol * g0, tolerance_change=0.0, history_size=20,
                            line_search_fn="strong_wolfe")
    evals = 0
    opt.step(closure)
    g = max(float(p.grad.abs().max()) for p in params if p.grad is not None)
    report.update(steps=evals, converged=g <= config.tol * g0)


def _proxy_damping(ctx: ModelContext, config: DaunceConfig, train: Dataset, curv: _Curvature, top: float,
                   g: torch.Generator, n_tunes: int = PROXY_FINE_TUNES, n_queries: int = PROXY_QUERIES,
                   krylov_steps: int = KRYLOV_STEPS) -> dict:
    """The damping whose limit best predicts warm-started fine-tunes on half subsets (module docstring)."""
    n = len(train)
    n_q = min(n_queries, max(2, n // 5))
    perm = torch.randperm(n, generator=g)
    q_idx, keep = perm[:n_q].sort().values, perm[n_q:].sort().values
    queries, rest = Subset(train, q_idx.tolist()), Subset(train, keep.tolist())
    n_rest = len(keep)
    proxy = config.replace(variant="bootstrap", subset_ratio=0.5, damping=0.0, rho=1.0, isotropic_noise=False,
                           perturbation="iid", n_models=n_tunes, seed=config.seed + 104_729)
    proxy = proxy.static()
    proxy = proxy.replace(**_optimizer_fields(proxy, top, 0.0))
    params = ctx.params
    d = ctx.n_params
    ctx.reset()
    s0 = signals_now(ctx, queries)
    actual, masks, steps = [], [], []
    for k in range(n_tunes):
        plan = make_plan(proxy, k, n_rest, d, ctx.unflatten)
        rep: dict = {}
        if proxy.stops_early:
            _fine_tune_lbfgs(ctx, proxy, rest, plan.subset, rep)
        else:
            train_copy(ctx, proxy, plan, rest, None, rep)
        actual.append(signals_now(ctx, queries) - s0)
        mask = torch.zeros(n_rest, dtype=torch.float64)
        mask[plan.subset] = 1.0 / len(plan.subset)
        masks.append(mask)
        steps.append(rep.get("steps", 0))
    ctx.reset()
    actual_t, W = torch.stack(actual), torch.stack(masks)
    # the fine-tunes' starting gradients g_S = (1/m) sum_{i in S} grad l_i(theta0): one forward pass per batch
    ctx.model.train(False)
    grads = torch.zeros(n_tunes, d, dtype=torch.float64)
    with torch.enable_grad():
        for bi in ctx.index_batches(n_rest):
            batch = ctx.fetch(rest, bi)
            loss = ctx.loss(ctx.outputs(batch), batch, len(bi))
            for k in range(n_tunes):
                w = W[k, bi].to(loss.device, loss.dtype)
                gk = torch.autograd.grad((w * loss).sum(), params, retain_graph=True, allow_unused=True)
                grads[k] += _flat_grads(gk, params).double().cpu()
        # the query signals' gradients at theta0, one query at a time
        gq = torch.zeros(n_q, d, dtype=torch.float64)
        for j in range(n_q):
            batch = ctx.fetch(queries, torch.tensor([j]))
            sig = ctx.signal(ctx.outputs(batch), batch, 1).sum()
            gj = torch.autograd.grad(sig, params, allow_unused=True)
            gq[j] = _flat_grads(gj, params).double().cpu()
    lams = [top * r for r in PROXY_GRID]
    pred = []
    for k in range(n_tunes):
        X = krylov_solves(curv.hvp, grads[k].to(params[0].device, params[0].dtype), lams, krylov_steps,
                          squared=True)  # (2L, d)
        pred.append(-(X.double().cpu() @ gq.T))  # (2L, Q): predicted signal change of every query
    pred_t = torch.stack(pred, 1)  # (2L, M, Q)
    score = torch.nanmean(_spearman_columns(pred_t, actual_t), dim=-1)  # (2L,)
    L = len(lams)
    out = {"proxy_fine_tunes": n_tunes, "proxy_queries": n_q,
           "proxy_steps_mean": float(sum(steps)) / len(steps)}
    for name, sc in (("isotropic", score[:L]), ("plain", score[L:])):
        best = float(torch.nan_to_num(sc, nan=-2.0).max())
        tied = [i for i, v in enumerate(sc.tolist()) if v == v and v >= best - PROXY_TIE]
        out[name] = {"damping": lams[max(tied)] if tied else top * PROXY_GRID[-1], "proxy_lds": best,
                     "curve": {f"{lam_:.3g}": float(v) for lam_, v in zip(lams, sc.tolist())}}
    return out


def resolve(ctx: ModelContext, config: DaunceConfig, train: Dataset, *, n_examples: int = 256,
            lanczos_steps: int = 30, probes: int = 4, cg_iters: int = 30, seed: int = 0,
            proxy_fine_tunes: int = PROXY_FINE_TUNES, proxy_queries: int = PROXY_QUERIES,
            krylov_steps: int = KRYLOV_STEPS) -> tuple[DaunceConfig, dict]:
    """``(resolved config, details)``: the config with every ``"auto"`` field replaced by its value (see the
    module docstring for the rule) and a dict of what the rule measured. Fields set explicitly are kept.
    The working model is left at theta0.

    Raises ValueError for a training set ``check_training_set`` refuses, and for one of fewer than
    ``AUTO_MIN_EXAMPLES`` examples when the damping is "auto" (its proxy holds queries out of the training set and
    fine-tunes on half subsets of the rest)."""
    config = config.static()
    autos = config.auto_fields
    if not autos:
        return config, {}
    n = check_training_set(ctx, train)
    if config.damping == AUTO and n < AUTO_MIN_EXAMPLES:
        raise ValueError(f"damping='auto' needs at least {AUTO_MIN_EXAMPLES} training examples (its proxy holds "
                         f"queries out and fine-tunes on half subsets of the rest), got {n}: set damping (and the "
                         f"other 'auto' fields {list(autos)}) explicitly")
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
    heavy = config.lr == AUTO  # after static(): SGD copies whose heavy-ball step needs the curvature
    need_curv = config.damping == AUTO or heavy or (not bootstrap and AUTO in (config.rho, config.isotropic_noise))
    lam = None if config.damping == AUTO else float(config.damping)
    if need_curv:
        curv = _Curvature(ctx, config, train, idx)
        p0 = _flat([p.detach() for p in ctx.params])
        d = p0.numel()
        nodes, weights = lanczos_spectrum(curv.hvp, d, p0.dtype, p0.device, lanczos_steps, probes, seed)
        info.update(d=d, top_curvature=float(nodes.max()), mean_curvature=float((weights * nodes).sum()) / d)
        lam_noise = damping_for(nodes, weights, DIRECTIONS_PER_COPY * K)
        info["noise_damping"] = lam_noise
        iso = None if bootstrap or config.isotropic_noise == AUTO else bool(config.isotropic_noise)
        if lam is None:
            proxy = _proxy_damping(ctx, config, train, curv, float(nodes.max()), g, proxy_fine_tunes,
                                   proxy_queries, krylov_steps)
            info["proxy"] = proxy
            if iso is None and not bootstrap:
                on, off = proxy["isotropic"], proxy["plain"]
                lam_on = max(on["damping"], lam_noise)
                iso = bool(isotropic_rank(nodes, weights, lam_on) <= K
                           and on["proxy_lds"] > off["proxy_lds"] + PROXY_TIE)
            lam = max(proxy["isotropic" if iso or bootstrap else "plain"]["damping"], lam_noise)
            changes["damping"] = lam
        info["d_lambda"] = effective_dimension(nodes, weights, lam)
        if not bootstrap and config.isotropic_noise == AUTO:
            r_iso = isotropic_rank(nodes, weights, lam)
            info["isotropic_rank"] = r_iso
            if iso is None:
                iso = bool(lam > 0 and r_iso <= K)
            changes["isotropic_noise"] = iso
        if not bootstrap and config.rho == AUTO:
            changes["rho"], more = _measure_rho(curv, config, lam, n, idx, cg_iters, g)
            info.update(more)
    changes.update(_optimizer_fields(config, info.get("top_curvature"), lam))
    resolved = config.replace(**changes)
    if need_curv:
        info["hessian_vector_products"] = "double backward" if curv.exact else "central differences of gradients"
    info["resolved"] = {f: getattr(resolved, f) for f in autos}
    ctx.reset()
    return resolved, info


def heavy_ball(top: float, lam: float, momentum=None) -> tuple[float, float]:
    """``(lr, momentum)`` of the heavy-ball method for a quadratic with curvature in ``[mu, L]``,
    ``L = CURVATURE_SAFETY * top + lam``, ``mu = max(lam, MIN_CURVATURE_RATIO * L)``: the optimal momentum
    ``m = ((sqrt L - sqrt mu) / (sqrt L + sqrt mu))^2`` unless one is given, and ``lr = (1 + sqrt m)^2 / L``
    (with the optimal m this is the optimal ``4 / (sqrt L + sqrt mu)^2``; with m = 0 it is 1 / L). The error
    then shrinks by about ``sqrt m`` per step: ~ sqrt(L / mu) steps per e-fold."""
    L = CURVATURE_SAFETY * max(top, 0.0) + lam
    if not L > 0:
        return ADAM_LR, 0.0 if momentum is None else momentum
    if momentum is None:
        mu = max(lam, MIN_CURVATURE_RATIO * L)
        a, b = math.sqrt(L), math.sqrt(mu)
        momentum = ((a - b) / (a + b)) ** 2
    return (1.0 + math.sqrt(momentum)) ** 2 / L, momentum


def _optimizer_fields(config: DaunceConfig, top, lam) -> dict:
    """Heavy-ball ``lr`` / ``momentum`` where they are still "auto" after ``config.static()`` (SGD copies)."""
    if config.lr != AUTO:
        return {}
    given = None if config.momentum == AUTO else float(config.momentum)
    lr, mom = heavy_ball(top or 0.0, lam or 0.0, given)
    return {"lr": lr, **({"momentum": mom} if config.momentum == AUTO else {})}


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


__all__ = ["resolve", "lanczos_spectrum", "curvature_spectrum", "effective_dimension", "damping_for", "isotropic_rank",
           "conjugate_gradient", "krylov_solves", "DIRECTIONS_PER_COPY", "NONLINEARITY", "FLOAT_MARGIN",
           "PROXY_FINE_TUNES", "PROXY_QUERIES", "KRYLOV_STEPS", "PROXY_GRID", "PROXY_TIE", "heavy_ball",
           "CURVATURE_SAFETY", "MIN_CURVATURE_RATIO", "ADAM_LR"]
