"""Train-mode BatchNorm copies (``DaunceConfig.batchnorm="train"``) and random shifts / flips during copy training
(``DaunceConfig.augment``), on a tiny conv net with BatchNorm2d and random 8x8 images."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.engines import sequential, stacked
from daunce.engines.context import ModelContext, set_copy_mode
from daunce.plans import augment_batch, augment_generator, make_plan, shift_flip

#: minibatch copies (the authors' recipe: SGD with momentum, one epoch over the subset in batches)
MINIBATCH = dict(n_models=4, rho=0.3, damping=0.1, isotropic_noise=False, subset_ratio=0.5, optimizer="sgd",
                 lr=0.05, momentum=0.9, batch_size=4, epochs=2)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 16, 3))


@pytest.fixture(scope="module")
def bn_data():
    """theta0 (a few train-mode passes, so its running statistics are not BatchNorm's initial ones), 24 training
    images, 6 queries."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:24]), y[:24]).backward()
        opt.step()
    model.eval()
    return model, TensorDataset(x[:24], y[:24]), TensorDataset(x[24:], y[24:])


def _bn(model):
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _fit(model, train, query=None, trainer="sequential", workdir=None, task=None, **changes):
    cfg = DaunceConfig(**{**MINIBATCH, **changes})
    d = Daunce(model, task or ClassificationTask(), cfg, workdir=workdir, progress=False, trainer=trainer)
    return d.fit(train, query)


def _by_hand(model, state, stats, data, task, train_mode=False):
    """The task's signal of a copy rebuilt from its stored weights and running statistics, in eval mode (or, with
    ``train_mode``, with batch statistics)."""
    m = copy.deepcopy(model)
    ctx = ModelContext(m, task, copy_model=False)
    ctx.load_state(state)
    ctx.load_stats(stats)
    m.train(train_mode)
    with torch.no_grad():
        x, y = data.tensors
        return task.signal(m(x), (x, y)).double()


def test_train_mode_copies_leave_theta0_untouched_and_keep_their_own_statistics(bn_data):
    model, train, query = bn_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = _fit(model, train, query, batchnorm="train")
    after = model.state_dict()
    for k, v in before.items():  # theta0's weights and running statistics, bit for bit
        assert torch.equal(v, after[k]), k
    assert d.copies_batchnorm == "train" and d.per_copy_stats and not d.uses_base_cache
    names = d.context.stat_names
    assert names == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    stats = [d.stats(k) for k in range(4)]
    steps = 2 * 3  # two epochs of a 12-example subset in batches of 4
    bn = _bn(model)
    for k, (mean, var, tracked) in enumerate(stats):
        assert not torch.allclose(mean, bn.running_mean, atol=1e-4), k  # moved from theta0's
        assert not torch.allclose(var, bn.running_var, atol=1e-4), k
        assert int(tracked) == int(bn.num_batches_tracked) + steps, k  # one update per training step
    for a in range(4):  # and each copy's differ from every other copy's
        for b in range(a + 1, 4):
            assert not torch.allclose(stats[a][0], stats[b][0], atol=1e-4), (a, b)


def test_signals_are_recorded_in_eval_mode_with_the_copys_own_statistics(bn_data):
    model, train, query = bn_data
    task = ClassificationTask(signal="margin")
    d = _fit(model, train, query, task=task, batchnorm="train")
    A, B = d.signals(train), d.signals(query)  # recorded during fit
    for k in (0, 3):
        state, stats = d.state(k), d.stats(k)
        torch.testing.assert_close(A[k], _by_hand(model, state, stats, train, task), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B[k], _by_hand(model, state, stats, query, task), rtol=1e-5, atol=1e-6)
        # neither with theta0's statistics nor with batch statistics
        assert (A[k] - _by_hand(model, state, None, train, task)).abs().max() > 1e-3
        assert (A[k] - _by_hand(model, state, stats, train, task, train_mode=True)).abs().max() > 1e-3


def test_default_copies_use_theta0s_statistics_as_before(bn_data):
    model, train, query = bn_data
    task = ClassificationTask()
    d = _fit(model, train, query, task=task)
    assert d.config.batchnorm == "eval" and d.config.augment == "none"
    assert d.copies_batchnorm == "eval" and not d.per_copy_stats and d.uses_base_cache
    assert d.stats(0) is None and "stats" not in d.store.load(0)
    A = d.signals(train)
    torch.testing.assert_close(A[1], _by_hand(model, d.state(1), None, train, task), rtol=1e-5, atol=1e-6)
    # work folders of earlier runs keep their key: the new fields at their defaults are not part of it
    key = DaunceConfig(**MINIBATCH).training_key()
    assert "batchnorm" not in key and "augment" not in key
    assert '"batchnorm": "train"' in DaunceConfig(**MINIBATCH, batchnorm="train").training_key()
    # the model without running statistics: no mode to report
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    assert Daunce(plain, task, DaunceConfig(**MINIBATCH, batchnorm="train"), progress=False).copies_batchnorm is None


def test_theta0_is_stationary_in_train_mode_with_its_values_taken_on_the_batch(bn_data):
    """With batch statistics theta0's cached eval-mode values would not match the copy's outputs at theta0; taken on
    the batch in the copy's mode they do: the "if" objective of every example is 0 at theta0 (up to rounding)."""
    model, train, _ = bn_data
    cfg = DaunceConfig(**MINIBATCH, batchnorm="train", augment="shift-flip").static()
    ctx = ModelContext(model, ClassificationTask())
    plan = make_plan(cfg, 0, len(train), ctx.n_params, ctx.unflatten)
    ctx.reset()
    set_copy_mode(ctx.model, cfg)
    idx = next(iter(plan.batches))
    batch = augment_batch(ctx.fetch(train, idx), cfg, augment_generator(cfg.seed, 0))
    with torch.no_grad():
        terms = sequential.objective_terms(cfg, ctx, plan, idx, batch, None)
    assert terms.abs().max() < 1e-5
    cache = sequential.base_cache(ctx, cfg.replace(batchnorm="eval", augment="none"), train)
    ctx.reset()
    set_copy_mode(ctx.model, cfg)
    with torch.no_grad():
        cached = sequential.objective_terms(cfg.replace(batchnorm="eval", augment="none"), ctx, plan, idx, batch,
                                            cache)
    assert cached.abs().max() > 1e-2  # what the eval-mode cache would have given


def test_vmap_and_sequential_agree_on_train_mode_copies(bn_data):
    """Same plans, same augmentation draws: the same weights, running statistics and signals up to float rounding
    (measured: weights and running statistics within 9e-8, signals within 6e-7)."""
    model, train, query = bn_data
    runs = {t: _fit(model, train, query, trainer=t, batchnorm="train", augment="shift-flip", augment_shift=2)
            for t in ("sequential", "vmap")}
    s, v = runs["sequential"], runs["vmap"]
    assert v.trainer_used == "vmap" and s.trainer_used == "sequential"
    for k in range(4):
        for a, b in zip(s.state(k) + s.stats(k), v.state(k) + v.stats(k)):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    for data in (train, query):
        torch.testing.assert_close(s.signals(data), v.signals(data), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.attribute(train, query), v.attribute(train, query), rtol=1e-3, atol=1e-6)


def test_vmap_leaves_train_mode_batchnorm_with_the_stopping_test_to_the_sequential_trainer(bn_data):
    model, train, _ = bn_data
    cfg = DaunceConfig(n_models=2, rho=0.1, damping=0.1, isotropic_noise=False, optimizer="sgd", lr=0.05,
                       max_steps=3, batchnorm="train")
    with pytest.raises(ValueError, match="stopping test is on: a stopped copy would keep running"):
        Daunce(model, ClassificationTask(), cfg, progress=False, trainer="vmap").fit(train)
    d = Daunce(model, ClassificationTask(), cfg, progress=False)
    with pytest.warns(RuntimeWarning, match="max_steps"):
        d.fit(train)
    assert d.trainer_used == "sequential" and "stopping test is on" in d.trainer_reason
    # one running-statistics update per forward pass: every step's, and the one that passed the test, if any
    assert int(d.stats(0)[2]) - int(_bn(model).num_batches_tracked) == d.copy_steps[0] + bool(d.copy_converged[0])


def test_stored_statistics_give_the_same_signals_and_scores_after_a_resume(bn_data, tmp_path):
    model, train, query = bn_data
    task = ClassificationTask(signal="margin")
    d = _fit(model, train, query, task=task, workdir=tmp_path, batchnorm="train")
    rec = torch.load(tmp_path / "copies" / "copy_0002.pt", weights_only=True)
    assert [tuple(t.shape) for t in rec["stats"]] == [(4,), (4,), ()]
    S = d.attribute(train, query)
    # a new object on the folder: copies loaded, not trained; the signals recomputed from the stored weights and
    # statistics (a signal function forces the computation) equal the ones recorded during fit
    again = Daunce(model, task, DaunceConfig(**MINIBATCH, batchnorm="train"), workdir=tmp_path, progress=False)
    again.fit(train, query)
    assert again.trained_copies == []
    recomputed = again.signals(query, signal=task.signal)
    torch.testing.assert_close(recomputed, d.signals(query), rtol=1e-5, atol=1e-6)
    assert torch.equal(again.attribute(train, query), S)
    other = TensorDataset(query.tensors[0].flip(-1), query.tensors[1])  # a dataset never seen: computed and stored
    m = again.signals(other)
    torch.testing.assert_close(m[1], _by_hand(model, d.state(1), d.stats(1), other, task), rtol=1e-5, atol=1e-6)


def test_augmentation_is_reproducible_and_differs_across_copies(bn_data):
    model, train, query = bn_data
    x = train.tensors[0][:8]
    cfg = DaunceConfig(augment="shift-flip", augment_shift=2)
    out = [augment_batch((x, None), cfg, augment_generator(0, k))[0] for k in (0, 0, 1)]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    assert not torch.equal(out[0], x)
    # each augmented image is a window of the zero-padded image, mirrored or not
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[0][i], w) or torch.equal(out[0][i], w.flip(-1)) for w in windows), i
    # flips only: every image is itself or its mirror, and some are mirrored
    flipped = shift_flip(x, 0, True, torch.Generator().manual_seed(3))
    same = [torch.equal(flipped[i], x[i]) for i in range(8)]
    assert all(s or torch.equal(flipped[i], x[i].flip(-1)) for i, s in enumerate(same)) and not all(same)
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        augment_batch((torch.zeros(4, 64), None), cfg, augment_generator(0, 0))
    # whole runs: the same seed gives the same copies; augmentation changes them; another seed changes the draws
    runs = [_fit(model, train, augment="shift-flip", augment_shift=2, seed=s) for s in (0, 0)]
    plain = _fit(model, train)
    for k in range(4):
        assert all(torch.equal(a, b) for a, b in zip(runs[0].state(k), runs[1].state(k))), k
        assert not torch.allclose(runs[0].state(k)[0], plain.state(k)[0]), k
    assert runs[0].config.live_base and not runs[0].per_copy_stats  # eval-mode BatchNorm, augmented inputs


def test_settings_are_checked(bn_data):
    model, _, _ = bn_data
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        DaunceConfig(batchnorm="batch")
    with pytest.raises(ValueError, match="augment must be one of"):
        DaunceConfig(augment="crop")
    with pytest.raises(ValueError, match=r"augment_shift \(pixels\) must be an integer >= 1"):
        DaunceConfig(augment_shift=0)
    with pytest.raises(ValueError, match="pass batchnorm='train' too"):
        Daunce(model, ClassificationTask(), DaunceConfig(train_mode=True), progress=False)
    d = Daunce(model, ClassificationTask(), DaunceConfig(train_mode=True, batchnorm="train"), progress=False)
    assert d.copies_batchnorm == "train"


def test_augmented_copies_do_not_use_shared_input_passes():
    """Each copy augments its own inputs: the shared-input trainer (one input for every copy) does not apply."""
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    cfg = dict(n_models=2, rho=0.1, damping=0.1, isotropic_noise=False, optimizer="sgd", lr=0.05, max_steps=2)
    ok, why, _ = stacked.check(ModelContext(plain, ClassificationTask()), DaunceConfig(**cfg), train)
    assert ok, why
    ok, why, _ = stacked.check(ModelContext(plain, ClassificationTask()), DaunceConfig(**cfg, augment="flip"), train)
    assert not ok and why.startswith("augment='flip': each copy augments its own inputs")


def test_augmentation_draws_follow_each_copy_when_stopped_copies_leave_a_vmap_block():
    """With the stopping test, stopped copies leave the vmap block's working tensors; each copy still takes its own
    augmentation draws, so both trainers stop every copy at the same step with the same weights (measured: the
    steps 1, 2, 12, 14, 60 (cap), 2; weights within 3e-8)."""
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 3))
    cfg = DaunceConfig(n_models=6, rho=0.3, damping=0.5, isotropic_noise=False, optimizer="sgd", lr=0.3, momentum=0.5,
                       max_steps=60, tol=0.8, augment="shift", augment_shift=1)
    runs = {}
    for t in ("sequential", "vmap"):
        runs[t] = Daunce(net, ClassificationTask(), cfg, progress=False, trainer=t, vmap_block=6)
        with pytest.warns(RuntimeWarning, match="max_steps"):
            runs[t].fit(train)
    s, v = runs["sequential"], runs["vmap"]
    assert v.trainer_used == "vmap" and len(set(s.copy_steps.values())) >= 4  # copies stop at different steps
    assert s.copy_steps == v.copy_steps and s.copy_converged == v.copy_converged
    for k in range(6):
        for a, b in zip(s.state(k), v.state(k)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
