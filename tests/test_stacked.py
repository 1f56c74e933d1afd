"""The shared-input trainer (``daunce.engines.stacked``): the sequential loop's copies and scores from one large
matmul per layer for all copies, with subsets, the orthogonal design, the isotropic noise term and the stopping
rule; the layer-by-layer evaluation of distinct copies; and what ``trainer="auto"`` chooses and why."""

import pytest
import torch
from torch import nn

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.engines import stacked
from daunce.experiments import data, models, training

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def digits():
    train, query = data.digits(160, 16, seed=5)
    mlp = models.seeded(models.mlp, 0, 64, 10, hidden=12)
    training.train_classifier(mlp, train, epochs=5)
    lr = models.seeded(models.logistic_regression, 0, 64, 10)
    training.train_classifier(lr, train, epochs=5)
    return {"lr": lr, "mlp": mlp}, train, query


def _fit(model, train, query, cfg, trainer, **kw):
    d = Daunce(model, TASK, cfg, trainer=trainer, progress=False, **kw).fit(train, query)
    return d, d.attribute(train, query)


def _assert_same(a, b, atol=1e-4):
    """Equal up to float32 rounding accumulated over the training steps, relative to the scores' scale."""
    scale = a.abs().max()
    assert scale > 0
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=atol)


CASES = {
    # full-batch copies to the stopping test, isotropic noise, orthogonal design
    "if-stopping-orthogonal-noise": dict(variant="if", optimizer="adam", lr=0.02, max_steps=500,
                                         perturbation="orthogonal", isotropic_noise=True),
    "if-heavy-ball-steps": dict(variant="if", optimizer="sgd", lr=0.3, momentum=0.5, steps=12, isotropic_noise=False),
    "efim-adam-steps": dict(variant="efim", optimizer="adam", lr=1e-2, steps=12, isotropic_noise=False),
    "trak-adam-steps": dict(variant="trak", optimizer="adam", lr=1e-2, steps=12, isotropic_noise=False),
    "bootstrap-sgd-steps": dict(variant="bootstrap", optimizer="sgd", lr=0.2, steps=12, isotropic_noise=False),
}


@pytest.mark.parametrize("layout", ["union", "gather"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["lr", "mlp"])
def test_shared_input_copies_equal_the_sequential_loop(digits, name, case, layout):
    mods, train, query = digits
    cfg = DaunceConfig(n_models=5, subset_ratio=0.5, rho=0.3, damping=1e-2, **CASES[case])
    seq, s_seq = _fit(mods[name], train, query, cfg, "sequential")
    sh, s_sh = _fit(mods[name], train, query, cfg, "shared", vmap_block=3, shared_layout=layout)  # blocks 3 + 2
    assert sh.trainer_used == "shared" and seq.trainer_used == "sequential"
    _assert_same(s_seq, s_sh)
    assert sh.copy_steps == seq.copy_steps and sh.copy_converged == seq.copy_converged
    if cfg.stops_early:  # the stopping test ran per copy, and the copies stopped on their own
        assert all(seq.copy_converged.values()) and len(set(seq.copy_steps.values())) > 1
    for k in range(cfg.n_models):
        for a, b in zip(seq.state(k), sh.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # signals of a new dataset from the stored weights, on the shared-input signal path
    extra = torch.utils.data.Subset(train, range(0, 160, 9))
    _assert_same(seq.signals(extra), sh.signals(extra))
    assert sh.signal_path_used == "shared"


@pytest.mark.parametrize("layout", ["union", "gather"])
def test_copies_on_the_whole_training_set_keep_their_own_perturbations_in_every_block(digits, layout):
    """At subset ratio 1 every block sees the same examples: a block must still use its own copies' perturbations
    (they were once taken from the previous block's cached step inputs: notebook 01's copies 256+ were wrong)."""
    mods, train, query = digits
    cfg = DaunceConfig(variant="efim", n_models=5, subset_ratio=1.0, rho=0.1, damping=2e-2, optimizer="sgd", lr=1.0,
                       steps=30, isotropic_noise=True, perturbation="orthogonal")
    seq, s_seq = _fit(mods["lr"], train, query, cfg, "sequential")
    sh, s_sh = _fit(mods["lr"], train, query, cfg, "shared", vmap_block=2, shared_layout=layout)  # blocks 2 + 2 + 1
    _assert_same(s_seq, s_sh)
    for k in range(cfg.n_models):
        for a, b in zip(seq.state(k), sh.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # SGD at lr 1: rounding grows


def test_stacked_forward_evaluates_distinct_copies_of_every_supported_layer():
    """Each copy's outputs equal its own model's, for copies with different weights (the layouts' reshapes and
    transposes are the point), through convolutions, pooling, flatten, linear layers and a frozen layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Sequential(nn.Conv2d(3, 4, 3, stride=1), nn.Tanh()), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 7), nn.GELU(), nn.Dropout(0.5), nn.Linear(7, 5))
    net.eval()
    net[-1].bias.requires_grad_(False)  # a frozen bias next to a trainable weight
    x = torch.randn(6, 2, 10, 10)
    ctx = Daunce(net, TASK, DaunceConfig(n_models=2), progress=False).context
    C = 3
    copies = [[p + 0.3 * torch.randn_like(p) for p in ctx.theta0] for _ in range(C)]
    params = [torch.stack([c[j] for c in copies]) for j in range(len(ctx.theta0))]
    out = stacked.StackedForward(ctx)(params, x)
    per_copy = stacked.StackedForward(ctx)(params, x.unsqueeze(0).expand(C, *x.shape), per_copy=True)
    for c in range(C):
        ctx.load_state(copies[c])
        with torch.no_grad():
            ref = ctx.model(x)
        torch.testing.assert_close(out[c], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_copy[c], ref, rtol=1e-5, atol=1e-5)


def test_head_only_copies_share_the_frozen_body(digits):
    """Copies that fine-tune only the last layer: the frozen layers run once, shared, and the copies equal the
    sequential loop's."""
    mods, train, query = digits
    model = models.seeded(models.mlp, 0, 64, 10, hidden=12)
    for p in model[1].parameters():
        p.requires_grad_(False)
    cfg = DaunceConfig(n_models=4, rho=0.3, damping=1e-2, isotropic_noise=False, optimizer="adam", lr=1e-2, steps=8)
    _, s_seq = _fit(model, train, query, cfg, "sequential")
    d, s_sh = _fit(model, train, query, cfg, "shared", shared_layout="union")
    _assert_same(s_seq, s_sh)
    assert d.context.n_params == 12 * 10 + 10


def test_auto_chooses_shared_and_says_why(digits):
    mods, train, query = digits
    cfg = DaunceConfig(n_models=6, rho=0.3, damping=1e-2, isotropic_noise=False, optimizer="adam", lr=1e-2, steps=4)
    d = Daunce(mods["lr"], TASK, cfg, progress=False).fit(train, query)
    assert d.trainer_used == "shared" and "shared-input passes" in d.trainer_reason
    # the layout follows the first layer's width (10 outputs: the union), and the reason says so
    assert "layout union: the first trainable layer has 10 outputs per copy" in d.trainer_reason, d.trainer_reason
    wide = Daunce(models.seeded(models.mlp, 0, 64, 10, hidden=40), TASK, cfg, progress=False).fit(train)
    assert "layout gather: the first trainable layer has 40 outputs" in wide.trainer_reason, wide.trainer_reason
    # the same seed gives the same copies bit for bit (the choice does not depend on timings)
    again = Daunce(mods["lr"], TASK, cfg, progress=False).fit(train, query)
    assert torch.equal(d.attribute(train, query), again.attribute(train, query))
    # minibatches of each copy's own subset: nothing to share, vmap as before (and the reason says why)
    mb = Daunce(mods["lr"], TASK, cfg.replace(batch_size=20), progress=False)
    assert mb.choose_trainer(train) == "vmap" and "no input to share" in mb.trainer_reason
    # a model the stacked evaluation does not cover falls through with its reason
    bn = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10)).eval()
    seq = Daunce(bn, TASK, cfg, progress=False)
    assert seq.choose_trainer(train) == "sequential" and "BatchNorm1d is not supported" in seq.trainer_reason
    with pytest.raises(ValueError, match="trainer='shared' cannot be used"):
        Daunce(bn, TASK, cfg, trainer="shared", progress=False).fit(train)


def test_auto_keeps_conv_nets_sequential_on_cpu_and_shared_conv_copies_are_right():
    train, query = data.digits(120, 10, seed=4, image=True)
    model = models.seeded(models.small_cnn, 0, 1, 10, width=4, image_size=8)
    cfg = DaunceConfig(n_models=3, steps=6, rho=0.3, damping=1e-2, optimizer="adam", lr=1e-2, isotropic_noise=False)
    auto = Daunce(model, TASK, cfg, progress=False)
    assert auto.choose_trainer(train) == "sequential" and "trainable convolution" in auto.trainer_reason
    _, s_seq = _fit(model, train, query, cfg, "sequential")
    _, s_sh = _fit(model, train, query, cfg, "shared", shared_layout="union")
    _assert_same(s_seq, s_sh)


def test_a_task_whose_outputs_are_not_the_model_call_is_refused(digits):
    mods, train, _ = digits

    class Scaled(ClassificationTask):
        def outputs(self, model, batch):
            return 2.0 * model(batch[0])

    d = Daunce(mods["lr"], Scaled(), DaunceConfig(n_models=2, steps=2, rho=0.3, damping=1e-2), progress=False)
    assert d.choose_trainer(train) == "vmap" and "is not model(batch[0])" in d.trainer_reason


def test_bad_layout_is_refused(digits):
    mods, _, _ = digits
    with pytest.raises(ValueError, match="shared_layout must be one of"):
        Daunce(mods["lr"], TASK, DaunceConfig(n_models=2), shared_layout="rows")
