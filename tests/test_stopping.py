"""Copies that stop when they have converged, the step cap, momentum and the cosine schedule, "auto" settings,
and fit's memory against the number of steps."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig, auto
from daunce.engines import vmap as vec

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def tiny():
    """A 3-class logistic regression on 60 examples, trained to its optimum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=g) > 0).long() + (x[:, 1] > 1).long()
    train = TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 5e-3 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model, train


EXPLICIT = dict(rho=0.3, damping=1e-2, isotropic_noise=True)


@pytest.mark.parametrize("trainer", ["sequential", "vmap", "shared"])
def test_copies_that_converge_stop_early_and_say_so(tiny, tmp_path, trainer):
    model, train = tiny
    cfg = DaunceConfig(n_models=4, optimizer="adam", lr=0.05, tol=0.05, max_steps=500, **EXPLICIT)
    d = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, trainer=trainer).fit(train)
    assert d.trainer_used == trainer
    assert set(d.copy_steps) == set(range(4))
    assert all(0 < s < 500 for s in d.copy_steps.values()), d.copy_steps
    assert all(c is True for c in d.copy_converged.values())
    assert d.n_unconverged == 0
    rec = d.store.load(2)
    assert rec["steps"] == d.copy_steps[2] and rec["converged"] is True
    assert json.loads((tmp_path / "manifest.json").read_text())["unconverged"] == []


def test_sequential_and_vmap_stop_at_the_same_step(tiny):
    model, train = tiny
    cfg = DaunceConfig(n_models=3, optimizer="adam", lr=0.05, tol=0.05, max_steps=400, **EXPLICIT)
    seq = Daunce(model, TASK, cfg, progress=False, trainer="sequential").fit(train)
    vm = Daunce(model, TASK, cfg, progress=False, trainer="vmap").fit(train)
    sh = Daunce(model, TASK, cfg, progress=False, trainer="shared").fit(train)
    assert seq.copy_steps == vm.copy_steps == sh.copy_steps
    assert len(set(seq.copy_steps.values())) > 1  # the copies stop on their own tests, not together
    for k in range(3):
        for a, b, c in zip(seq.state(k), vm.state(k), sh.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainer", ["sequential", "vmap", "shared"])
def test_copies_that_hit_the_cap_are_counted_warned_and_recorded(tiny, tmp_path, trainer):
    model, train = tiny
    cfg = DaunceConfig(n_models=3, optimizer="sgd", lr=0.01, tol=1e-3, max_steps=5, **EXPLICIT)
    d = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, trainer=trainer)
    with pytest.warns(RuntimeWarning, match="3 of 3 copies reached max_steps=5") as caught:
        d.fit(train)
    assert len([w for w in caught if "max_steps" in str(w.message)]) == 1  # one warning per fit
    assert d.n_unconverged == 3
    assert d.copy_steps == {0: 5, 1: 5, 2: 5}
    assert d.store.load(0)["converged"] is False
    assert json.loads((tmp_path / "manifest.json").read_text())["unconverged"] == [0, 1, 2]
    # a rerun on the same folder loads the copies and still knows they did not converge
    again = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False, trainer=trainer).fit(train)
    assert again.n_unconverged == 3


def test_fixed_steps_train_exactly_that_many_and_keep_their_key(tiny):
    model, train = tiny
    cfg = DaunceConfig(n_models=2, steps=7, optimizer="sgd", lr=0.1, **EXPLICIT)
    d = Daunce(model, TASK, cfg, progress=False, trainer="sequential").fit(train)
    assert d.copy_steps == {0: 7, 1: 7} and d.copy_converged == {0: None, 1: None}
    key = json.loads(cfg.training_key())
    assert not {"tol", "max_steps", "momentum", "lr_schedule"} & set(key)  # the key of before these fields
    assert {"tol", "max_steps"} <= set(json.loads(cfg.replace(steps=None).training_key()))
    assert "momentum" in json.loads(cfg.replace(momentum=0.9).training_key())
    assert "lr_schedule" in json.loads(cfg.replace(lr_schedule="cosine").training_key())


def test_momentum_and_cosine_schedule_agree_across_trainers(tiny):
    model, train = tiny
    cfg = DaunceConfig(n_models=3, optimizer="sgd", lr=0.3, momentum=0.9, lr_schedule="cosine", batch_size=16,
                       epochs=2, **EXPLICIT)
    seq = Daunce(model, TASK, cfg, progress=False, trainer="sequential").fit(train)
    vm = Daunce(model, TASK, cfg, progress=False, trainer="vmap").fit(train)
    plain = Daunce(model, TASK, cfg.replace(momentum=0.0, lr_schedule="constant"), progress=False,
                   trainer="sequential").fit(train)
    for k in range(3):
        for a, b, c in zip(seq.state(k), vm.state(k), plain.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(a, c, atol=1e-4)
    assert seq.copy_steps == {k: 4 for k in range(3)}  # 30 examples in batches of 16, two epochs


def test_stacked_sgd_momentum_matches_torch():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) for _ in range(4)]
    p = w.clone()
    opt = vec.StackedSGD([p], 0.1, momentum=0.9)
    for gr in grads:
        opt.step([gr])
    for c in range(3):
        q = nn.Parameter(w[c].clone())
        ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
        for gr in grads:
            q.grad = gr[c].clone()
            ref.step()
        torch.testing.assert_close(p[c], q.detach(), rtol=1e-6, atol=1e-7)


def test_config_fields_validate_clearly():
    for field, bad in (("damping", "automatic"), ("rho", "Auto"), ("isotropic_noise", "yes"),
                       ("isotropic_noise", 1), ("damping", -1.0), ("rho", 0.0)):
        with pytest.raises(ValueError, match=field):
            DaunceConfig(**{field: bad})
    with pytest.raises(ValueError, match="momentum"):
        DaunceConfig(optimizer="adam", momentum=0.9)
    with pytest.raises(ValueError, match="optimizer"):
        DaunceConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr_schedule"):
        DaunceConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="tol"):
        DaunceConfig(tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        DaunceConfig(max_steps=0)
    # full batch with the stopping test: heavy-ball SGD whose step and momentum need the curvature
    assert DaunceConfig().auto_fields == ("rho", "damping", "isotropic_noise", "lr", "momentum")
    assert DaunceConfig().static().optimizer == "sgd"
    # minibatches or fixed steps: Adam at the former defaults, nothing left to measure for the optimiser
    for cfg in (DaunceConfig(batch_size=8), DaunceConfig(steps=100)):
        assert cfg.static().optimizer == "adam" and cfg.static().lr == 1e-2 and cfg.static().momentum == 0.0
        assert cfg.auto_fields == ("rho", "damping", "isotropic_noise")
    # SGD with a learning rate given: plain SGD; the key of such a configuration is what it was before "auto"
    assert DaunceConfig(optimizer="sgd", lr=0.1, rho=0.3, damping=0.1, isotropic_noise=True).auto_fields == ()
    assert "momentum" not in json.loads(DaunceConfig(optimizer="sgd", lr=0.1).training_key())


def test_auto_settings_are_resolved_recorded_and_reused(tiny, tmp_path):
    model, train = tiny
    cfg = DaunceConfig(n_models=4)
    d = Daunce(model, TASK, cfg, workdir=tmp_path, progress=False).fit(train)
    res = d.resolved_config
    assert not res.auto_fields
    assert res.damping > 0 and 0 < res.rho <= 1 and isinstance(res.isotropic_noise, bool)
    assert d.resolved["d"] == 18 and d.resolved["top_curvature"] > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["damping"] == "auto"
    assert manifest["resolved"] == {"rho": res.rho, "damping": res.damping, "isotropic_noise": res.isotropic_noise,
                                    "lr": res.lr, "momentum": res.momentum}
    assert res.optimizer == "sgd" and 0 < res.momentum < 1 and res.lr > 0  # heavy-ball copies
    assert max(d.copy_steps.values()) < res.max_steps and d.n_unconverged == 0
    # the resolved damping follows the curvature: a model with 10x the curvature gets about 10x the damping
    x, y = train.tensors
    scaled = TensorDataset(x * 10 ** 0.5, y)
    big = Daunce(model, TASK, DaunceConfig(n_models=4, rho=0.3, isotropic_noise=False), progress=False)
    small = Daunce(model, TASK, DaunceConfig(n_models=4, rho=0.3, isotropic_noise=False), progress=False)
    ratio = big.resolve(scaled).damping / small.resolve(train).damping
    assert 3 < ratio < 30, ratio
    # a rerun (here: with more copies) reuses the stored resolution instead of measuring again
    more = Daunce(model, TASK, cfg.replace(n_models=6), workdir=tmp_path, progress=False).fit(train)
    assert more.resolved_config == res.replace(n_models=6) and more.resolved.get("reused_from_manifest")
    assert manifest["auto_rule"] == auto.RULE_VERSION
    # a folder resolved by another version of the rule is refused, naming both versions
    manifest["auto_rule"] = auto.RULE_VERSION - 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"resolved by version {auto.RULE_VERSION - 1} of the rule.*this is version "
                                         f"{auto.RULE_VERSION}"):
        Daunce(model, TASK, cfg.replace(n_models=6), workdir=tmp_path, progress=False).fit(train)
    del manifest["auto_rule"]  # a folder from before the version was recorded
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="resolved by an earlier version of the rule"):
        Daunce(model, TASK, cfg.replace(n_models=6), workdir=tmp_path, progress=False).fit(train)
    # explicit fields stay as given; bootstrap resolves the knobs it does not use to inert values
    boot = Daunce(model, TASK, DaunceConfig(variant="bootstrap", n_models=2, damping=1e-2), progress=False)
    assert boot.resolve(train).rho == 1.0 and boot.resolve(train).isotropic_noise is False
    assert boot.resolve(train).damping == 1e-2


def test_fit_memory_does_not_grow_with_the_number_of_full_batch_steps():
    """Peak resident memory of a fit of 4 copies with 4,000 full-batch steps each (the stopping test on, out of
    reach) stays within 4 MB of one with 200 steps. Plans that stored every step's indices took about 1.7 KB
    per copy per step: 26 MB more here."""
    script = textwrap.dedent("""
        import resource, sys, warnings, torch
        torch.set_num_threads(1)
        from torch.utils.data import TensorDataset
        from daunce import ClassificationTask, Daunce, DaunceConfig, auto
        torch.manual_seed(0)
        train = TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
        model = torch.nn.Linear(4, 2)
        cfg = DaunceConfig(n_models=4, max_steps=int(sys.argv[1]), tol=1e-12, optimizer="sgd", lr=1e-3,
                           subset_ratio=1.0, rho=0.3, damping=1e-2, isotropic_noise=True)
        d = Daunce(model, ClassificationTask(), cfg, progress=False, trainer="vmap")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the copies hit the cap, as intended
            d.fit(train)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sum(d.copy_steps.values()))
    """)
    rss = {}
    for steps in (200, 4_000):
        out = subprocess.run([sys.executable, "-c", script, str(steps)], capture_output=True, text=True,
                             timeout=300, check=True)
        kib, total = out.stdout.split()[-2:]
        assert int(total) == 4 * steps  # every copy really took the steps (tol is out of reach)
        rss[steps] = int(kib) / 1024  # MiB (ru_maxrss is in KiB on Linux)
    assert rss[4_000] - rss[200] < 4, rss


def test_auto_settings_resolve_on_lora_parameters_of_a_causal_lm():
    """The rule needs only the task's outputs and loss: it works on the LoRA weights of a (tiny) causal LM."""
    import copy

    from daunce import llm

    model, tok = llm.tiny_llama(seed=0, num_layers=2)
    pm = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=0)
    texts = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" It is {2 * i}."} for i in range(6)]
    train = llm.TextDataset(tok, texts, 64)
    d = Daunce(pm, llm.CausalLMTask(), DaunceConfig(n_models=8, batch_size=2), progress=False, eval_batch_size=3)
    # fewer Lanczos steps than the default, for time (the test machine's attention has no double backward, so
    # every product is two gradient passes)
    res, info = auto.resolve(d.context, d.config, train, lanczos_steps=6, probes=2, cg_iters=6, proxy_fine_tunes=3,
                             proxy_queries=2, krylov_steps=4)
    n_lora = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert info["d"] == n_lora and info["top_curvature"] > 0
    assert res.damping > 0 and 0 < res.rho <= 1 and isinstance(res.isotropic_noise, bool)
    for p, q in zip(d.context.params, d.context.theta0):  # the working model is back at theta0
        assert torch.equal(p, q)


def test_auto_takes_the_explicit_values_of_an_existing_work_folder(tiny, tmp_path):
    """A folder trained with the settings given explicitly stays valid (and its manifest unchanged) when the
    same run leaves them at "auto": the copies there are reused, not retrained."""
    model, train = tiny
    explicit = DaunceConfig(n_models=3, steps=5, optimizer="sgd", lr=0.1, **EXPLICIT)
    first = Daunce(model, TASK, explicit, workdir=tmp_path, progress=False).fit(train)
    before = (tmp_path / "manifest.json").read_bytes()
    again = Daunce(model, TASK, explicit.replace(isotropic_noise="auto"), workdir=tmp_path, progress=False).fit(train)
    assert again.trained_copies == [] and again.resolved_config == explicit.static()
    assert (tmp_path / "manifest.json").read_bytes() == before
    torch.testing.assert_close(again.attribute(train, train), first.attribute(train, train))
    with pytest.raises(ValueError, match="another run"):  # a real difference is still refused
        Daunce(model, TASK, explicit.replace(isotropic_noise="auto", lr=0.2), workdir=tmp_path,
               progress=False).fit(train)


def test_krylov_solves_equal_direct_solves_for_every_damping():
    """One Lanczos run from b gives (C + lambda)^-1 b and C (C + lambda)^-2 b for every lambda (exact at d steps)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    C = a @ a.T / 12
    b = torch.randn(12, generator=g, dtype=torch.float64)
    lams = [1e-3, 1e-1, 10.0]
    X = auto.krylov_solves(lambda v: C @ v, b, lams, steps=12, squared=True)
    for j, lam in enumerate(lams):
        M = C + lam * torch.eye(12, dtype=torch.float64)
        torch.testing.assert_close(X[j], torch.linalg.solve(M, b), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(X[len(lams) + j], C @ torch.linalg.solve(M, torch.linalg.solve(M, b)),
                                   rtol=1e-6, atol=1e-9)


def test_auto_damping_proxy_predicts_held_out_fine_tunes(tiny):
    """The damping rule's proxy: warm-started half-subset fine-tunes (L-BFGS, converged well inside the cap) whose
    held-out query changes the damped-IF limit predicts with the right sign and a clear correlation (predictions of
    the wrong sign would give the same LDS negated); the chosen damping is a grid point below c_max."""
    model, train = tiny
    d = Daunce(model, TASK, DaunceConfig(n_models=64), progress=False)
    res = d.resolve(train)
    proxy, top = d.resolved["proxy"], d.resolved["top_curvature"]
    assert proxy["proxy_steps_mean"] < DaunceConfig().max_steps / 4
    for kernel in ("isotropic", "plain"):
        assert proxy[kernel]["proxy_lds"] > 0.5, proxy[kernel]
        assert proxy[kernel]["damping"] < top
        assert any(abs(proxy[kernel]["damping"] / top - r) < 1e-9 * r for r in auto.PROXY_GRID)
    assert res.damping == max(proxy["plain" if not res.isotropic_noise else "isotropic"]["damping"],
                              d.resolved["noise_damping"])


def _objective_gradient_norm(d, train, k, state, with_noise=True):
    """Copy k's whole perturbed objective (or, ``with_noise=False``, the objective without its isotropic noise term)
    differentiated at the weights ``state``, by the sequential engine's own pieces."""
    from daunce.engines.sequential import objective_terms
    from daunce.objectives import proximal_term

    cfg, ctx, plan = d.training_config(), d.context, d.plan(k, len(train))
    cache = d.base_cache(train)   # theta0's values, before the working model moves
    ctx.load_state(state)
    ctx.model.train(cfg.train_mode)
    idx = next(iter(plan.batches))
    obj = objective_terms(cfg, ctx, plan, idx, ctx.fetch(train, idx), cache).mean()
    obj = obj + proximal_term(ctx.params, ctx.theta0, cfg.damping, plan.eta if with_noise else None)
    grads = torch.autograd.grad(obj, ctx.params, allow_unused=True)
    return float(sum(g.double().pow(2).sum() for g in grads if g is not None).sqrt())


@pytest.mark.parametrize("trainer", ["sequential", "vmap"])
def test_the_stopping_test_asks_the_same_with_the_noise_term_on_and_off(tiny, trainer):
    """A copy stops when its gradient is tol times its data part's at theta0 (the objective without the isotropic
    noise term), with the noise term on or off: with it on, measured against the whole start gradient (whose scale
    is ||eta||), a copy would stop with its data part barely solved."""
    model, train = tiny
    tol = 0.05
    for iso in (False, True):
        cfg = DaunceConfig(n_models=3, optimizer="sgd", lr=0.05, momentum=0.9, tol=tol, max_steps=3000, rho=0.3,
                           damping=10.0, isotropic_noise=iso)
        d = Daunce(model, TASK, cfg, progress=False, trainer=trainer).fit(train)
        assert d.n_unconverged == 0
        theta0 = [p.detach().clone() for p in d.context.theta0]
        for k in range(3):
            ref = _objective_gradient_norm(d, train, k, theta0, with_noise=False)
            whole0 = _objective_gradient_norm(d, train, k, theta0)
            final = _objective_gradient_norm(d, train, k, d.state(k))
            assert final <= tol * ref * 1.001, (iso, k, final, ref)
            if iso:   # the old reference would have stopped far earlier: ||eta|| dominates the start gradient
                assert whole0 > 5 * ref, (whole0, ref)
