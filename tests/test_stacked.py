"""The shared-input trainer (``daunce.engines.stacked``): the sequential loop's copies and scores from one large
matmul per layer for all copies, with subsets, the orthogonal design, the isotropic noise term and the stopping
rule; the layer-by-layer evaluation of distinct copies; and what ``trainer="auto"`` chooses and why."""

import re

import pytest
import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------- models written as nn.Module classes
class ClassMLP(nn.Module):
    """Linear-ReLU-Linear with the activation in forward (F.relu), as most PyTorch models are written."""

    def __init__(self, d_in=64, hidden=12, n_classes=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ClassLogReg(nn.Module):
    def __init__(self, d_in=64, n_classes=10):
        super().__init__()
        self.linear = nn.Linear(d_in, n_classes)

    def forward(self, x):
        return self.linear(torch.flatten(x, 1))


class ClassCNN(nn.Module):
    """conv -> relu -> max pool -> conv -> tanh -> avg pool -> view(N, -1) -> linear, on 8 x 8 images."""

    def __init__(self, width=4, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 2 * 2, n_classes)

    def forward(self, x):
        n = x.size(0)
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(self.conv2(x).tanh(), kernel_size=2)
        x = F.dropout(x, 0.5, training=self.training)
        return self.head(x.view(n, -1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc2(torch.add(F.relu(self.fc1(x)), x))


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.01 * torch.randn(10, 64))

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight)


class Branchy(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def _class_model(name):
    if name == "cnn":
        return models.seeded(ClassCNN, 0)
    return models.seeded(ClassMLP if name == "mlp" else ClassLogReg, 0)


@pytest.mark.parametrize("name", ["mlp", "lr", "cnn"])
def test_class_defined_models_train_shared_like_the_sequential_loop(name):
    """A model written as a class is traced with torch.fx into the same layer chain: its copies (by parameter
    name) and scores are the sequential loop's up to float32 rounding (scores within 1e-4 of their largest value,
    weights rtol 1e-4 / atol 1e-5, as for nn.Sequential above)."""
    train, query = data.digits(120, 10, seed=4, image=True)
    model = _class_model(name)
    training.train_classifier(model, train, epochs=3)
    cfg = DaunceConfig(n_models=4, subset_ratio=0.5, rho=0.3, damping=1e-2, isotropic_noise=True, optimizer="adam",
                       lr=1e-2, steps=10)
    seq, s_seq = _fit(model, train, query, cfg, "sequential")
    sh, s_sh = _fit(model, train, query, cfg, "shared", vmap_block=3, shared_layout="gather" if name == "mlp"
                    else "union")
    assert sh.trainer_used == "shared"
    assert f"{type(model).__name__}.forward traced by torch.fx into a chain of" in sh.trainer_reason, sh.trainer_reason
    assert sh.context.names == [n for n, _ in model.named_parameters()]
    _assert_same(s_seq, s_sh)
    for k in range(cfg.n_models):
        for a, b in zip(seq.state(k), sh.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if name != "cnn":  # "auto" picks the shared-input trainer for them (a CPU keeps conv nets sequential)
        auto = Daunce(model, TASK, cfg, progress=False)
        assert auto.choose_trainer(train) == "shared", auto.trainer_reason


class Functional(nn.Module):
    """More of the functional forms: a ModuleList loop, leaky ReLU and tanh-GELU with arguments, x.sigmoid(),
    adaptive pooling, x.contiguous(), torch.reshape to (x.shape[0], -1)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 2, 3)])
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        x = F.adaptive_avg_pool2d(x.sigmoid(), 2).contiguous()
        x = torch.reshape(x, (x.shape[0], -1))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@pytest.mark.parametrize("name", ["cnn", "functional"])
def test_stacked_forward_evaluates_distinct_copies_of_a_traced_model(name):
    """Distinct copies through the traced models' functional ops (the CNN: F.relu, F.max_pool2d, x.tanh(),
    F.avg_pool2d, F.dropout in eval mode, x.view(n, -1), with a frozen head bias; ``Functional``): each copy's
    outputs equal its own model's (rtol / atol 1e-5)."""
    torch.manual_seed(0)
    if name == "cnn":
        net = ClassCNN(width=3).eval()
        net.head.bias.requires_grad_(False)
        names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "head.weight"]
        kinds = ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "Tanh", "AvgPool2d", "Identity", "Flatten", "Linear"]
    else:
        net = Functional().eval()
        names = [n for n, _ in net.named_parameters()]
        kinds = ["Conv2d", "LeakyReLU", "Conv2d", "LeakyReLU", "Sigmoid", "AdaptiveAvgPool2d", "Identity", "Flatten",
                 "Linear", "GELU", "Linear"]
    x = torch.randn(5, 1, 8, 8)
    ctx = Daunce(net, TASK, DaunceConfig(n_models=2), progress=False).context
    assert ctx.names == names
    C = 3
    copies = [[p + 0.3 * torch.randn_like(p) for p in ctx.theta0] for _ in range(C)]
    params = [torch.stack([c[j] for c in copies]) for j in range(len(ctx.theta0))]
    fwd = stacked.StackedForward(ctx)
    assert [type(m).__name__ for m in fwd.layers] == kinds
    out = fwd(params, x)
    for c in range(C):
        ctx.load_state(copies[c])
        with torch.no_grad():
            ref = ctx.model(x)
        torch.testing.assert_close(out[c], ref, rtol=1e-5, atol=1e-5)


def test_class_defined_head_only_copies_share_the_frozen_body(digits):
    """A frozen fc1 in a class-defined MLP: the frozen layer is the module's own tensor, the trainable fc2 is
    stacked by name, and the copies equal the sequential loop's."""
    _, train, query = digits
    model = models.seeded(ClassMLP, 0)
    model.fc1.requires_grad_(False)
    cfg = DaunceConfig(n_models=3, rho=0.3, damping=1e-2, isotropic_noise=False, optimizer="adam", lr=1e-2, steps=8)
    _, s_seq = _fit(model, train, query, cfg, "sequential")
    d, s_sh = _fit(model, train, query, cfg, "shared", shared_layout="union")
    assert d.trainer_used == "shared" and d.context.names == ["fc2.weight", "fc2.bias"]
    _assert_same(s_seq, s_sh)


@pytest.mark.parametrize("model, reason", [
    (Residual(), "Residual.forward uses torch.add on two tensors (a branch: relu, flatten)"),
    (OwnParameter(), "OwnParameter.forward reads the tensor weight directly (in torch.nn.functional.linear)"),
    (Branchy(), "torch.fx could not trace Branchy.forward: TraceError: symbolically traced variables cannot be "
                "used as inputs to control flow"),
])
def test_models_that_are_not_a_chain_fall_back_with_the_reason(digits, model, reason):
    _, train, _ = digits
    cfg = DaunceConfig(n_models=2, steps=2, rho=0.3, damping=1e-2, optimizer="adam", lr=1e-2)
    d = Daunce(model, TASK, cfg, progress=False)
    assert d.choose_trainer(train) in ("vmap", "sequential")  # Branchy's control flow cannot be vmapped either
    assert d.trainer_reason.startswith("not shared: " + reason), d.trainer_reason
    with pytest.raises(ValueError, match=re.escape("trainer='shared' cannot be used: " + reason)):
        Daunce(model, TASK, cfg, trainer="shared", progress=False).fit(train)


def test_traced_functions_that_do_not_map_are_named():
    """Each unsupported use of a function names the function and what is wrong with it."""

    class Stochastic(ClassLogReg):
        def forward(self, x):
            return F.dropout(self.linear(x.flatten(1)), 0.1)  # training=True: the function's default

    class Scaled(ClassLogReg):
        def forward(self, x):
            return 2.0 * self.linear(x.flatten(1))

    class Reshaped(ClassLogReg):
        def forward(self, x):
            return self.linear(x.view(-1, 64))

    class TwoOutputs(ClassLogReg):
        def forward(self, x):
            h = self.linear(x.flatten(1))
            return h, h

    class TwoInputs(ClassLogReg):
        def forward(self, x, y):
            return self.linear(x.flatten(1))

    cases = {Stochastic: "Stochastic.forward calls torch.nn.functional.dropout with training=True",
             Scaled: "Scaled.forward calls operator.mul, which the shared-input trainer does not evaluate",
             Reshaped: "Reshaped.forward calls the method .view() with a shape other than (x.size(0), -1)",
             TwoOutputs: "TwoOutputs.forward returns a tuple of 2 values",
             TwoInputs: "TwoInputs.forward takes 2 inputs (x, y)"}
    for cls, reason in cases.items():
        ok, why = stacked.supported(cls().eval())
        assert not ok and why.startswith(reason), (cls.__name__, why)
    # minibatch copies share no input: said before forward is traced (a large model would be traced for nothing)
    train, _ = data.digits(40, 4, seed=4)
    mb = Daunce(Branchy(), TASK, DaunceConfig(n_models=2, steps=2, batch_size=8, rho=0.3, damping=1e-2),
                progress=False)
    mb.choose_trainer(train)
    assert mb.trainer_reason.startswith("not shared: copies train on minibatches"), mb.trainer_reason
    # in train mode self.training is True when forward is traced: F.dropout(training=self.training) is refused
    ok, why = stacked.supported(ClassCNN().eval(), train_mode=True)
    assert not ok and "torch.nn.functional.dropout with training=True" in why, why
    assert stacked.supported(ClassCNN().train(), train_mode=False)[0]
