"""Baseline wrappers (dattri, kronfluence): scores with Daunce's sign convention on a planted case, the
EK-FAC shim against kronfluence, and the damping translation."""

import copy
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from daunce.experiments import baselines


@pytest.mark.parametrize("method", [m for m in baselines.METHODS if m != "if-ekfac-stock"])
def test_planted_duplicate_is_helpful(digits_lr, method):
    """A query that duplicates a training example: that example must get a high positive score."""
    model, train, _ = digits_lr
    x, y = train.tensors
    planted = torch.arange(0, 300, 30)[:8]
    query = TensorDataset(x[planted], y[planted])
    S, _ = baselines.run(method, model, train, query, damping=1e-2,
                         checkpoints=[{"state": model.state_dict(), "lr": 1.0}])
    assert S.shape == (len(train), len(planted))
    self_scores = S[planted, torch.arange(len(planted))]
    assert (self_scores > 0).all(), self_scores
    # the duplicate ranks in the top 5% of its query's scores, on average
    ranks = [(S[:, j] > S[p, j]).float().mean().item() for j, p in enumerate(planted)]
    assert np.mean(ranks) < 0.05, ranks


@pytest.mark.parametrize("method", baselines.TRAIN_SIGNAL_METHODS)
def test_margin_on_the_training_side_finds_the_planted_duplicate_too(digits_lr, method):
    """train_signal="margin" reaches the library (other scores than the loss) and keeps the sign and the ranking."""
    model, train, _ = digits_lr
    x, y = train.tensors
    planted = torch.arange(0, 300, 30)[:8]
    query = TensorDataset(x[planted], y[planted])
    kw = dict(damping=1e-2, checkpoints=[{"state": model.state_dict(), "lr": 1.0}])
    S, _ = baselines.run(method, model, train, query, train_signal="margin", **kw)
    S_loss, _ = baselines.run(method, model, train, query, **kw)
    assert torch.isfinite(S).all() and not torch.allclose(S, S_loss)
    self_scores = S[planted, torch.arange(len(planted))]
    assert (self_scores > 0).all(), self_scores
    ranks = [(S[:, j] > S[p, j]).float().mean().item() for j, p in enumerate(planted)]
    assert np.mean(ranks) < 0.05, ranks


def test_margin_on_the_training_side_is_refused_where_it_would_change_the_curvature(digits_lr):
    model, train, query = digits_lr
    for method in ("if-ekfac", "kronfluence-ekfac-ef"):
        with pytest.raises(ValueError, match="train_signal"):
            baselines.run(method, model, train, query, train_signal="margin")


def test_grid_runs_every_damping_once(digits_lr):
    model, train, query = digits_lr
    rows = baselines.run_grid("if-ekfac", model, train, query, grid=(1e-3, 1e-1))
    assert [r["damping"] for r in rows] == [1e-3, 1e-1]
    assert not torch.allclose(rows[0]["scores"], rows[1]["scores"])     # the damping reached the library
    assert [r["damping"] for r in baselines.run_grid("grad-dot", model, train, query, grid=(1e-3, 1e-1))] == [None]


def test_library_damping_puts_every_method_on_one_scale():
    assert baselines.library_damping("if-lissa", 0.5, 100) == pytest.approx(0.5 / baselines.LISSA["scaling"])
    assert baselines.library_damping("trak", 0.5, 100) == pytest.approx(50.0)
    assert baselines.library_damping("if-cg", 0.5, 100) == 0.5


def _tiny_linear():
    torch.manual_seed(0)
    n, p, c = 200, 6, 3
    x = torch.randn(n, p)
    y = (x @ torch.randn(p, c) + 0.5 * torch.randn(n, c)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(p, c))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-3 * sum((w ** 2).sum() for w in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    query = TensorDataset(torch.randn(20, p), torch.randint(0, c, (20,)))
    return model, TensorDataset(x, y), query


def _kronfluence_empirical_fisher(model, train, query, damping):
    """kronfluence's EK-FAC with the empirical Fisher and the cross-entropy as measurement (the second
    implementation the shim is checked against)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    m = prepare_model(copy.deepcopy(model), CE())
    with tempfile.TemporaryDirectory() as d:
        an = Analyzer("t", m, CE(), cpu=True, disable_tqdm=True, output_dir=d)
        an.fit_all_factors("f", train, per_device_batch_size=len(train), overwrite_output_dir=True,
                           factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
        an.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=len(query),
                                   per_device_train_batch_size=len(train), overwrite_output_dir=True,
                                   score_args=ScoreArguments(damping_factor=damping))
        return an.load_pairwise_scores("s")["all_modules"].T


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ekfac_shim_corrects_dattris_defects():
    """dattri 0.3.0's EK-FAC disagrees with kronfluence's empirical-Fisher EK-FAC on a tiny linear model
    (eigenvectors used as rows, weight and bias misaligned); the shim agrees with it, scale included."""
    from dattri.algorithm import IFAttributorEKFAC
    from dattri.task import AttributionTask
    from torch.func import functional_call
    from torch.utils.data import DataLoader

    from daunce.experiments.dattri_ekfac import corrected_ekfac

    model, train, query = _tiny_linear()

    def loss(params, data):
        x, y = data
        if x.ndim == 1:
            x, y = x[None], y[None]
        return F.cross_entropy(functional_call(model, params, (x,)), y.long())

    damping = 1e-2
    reference = _kronfluence_empirical_fisher(model, train, query, damping).flatten()
    scores = {}
    for name, cls in [("stock", IFAttributorEKFAC), ("shim", corrected_ekfac())]:
        att = cls(task=AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict()), device="cpu",
                  damping=damping)
        att.cache(DataLoader(train, batch_size=len(train)))
        with torch.no_grad():
            scores[name] = att.attribute(DataLoader(train, batch_size=len(train)),
                                         DataLoader(query, batch_size=len(query))).flatten()
    corr = {k: torch.corrcoef(torch.stack([v, reference]))[0, 1].item() for k, v in scores.items()}
    assert corr["stock"] < 0.9, corr                                   # the defect, shown
    assert corr["shim"] > 0.999, corr                                  # the correction
    assert torch.allclose(scores["shim"], reference, rtol=1e-3, atol=1e-4 * reference.abs().max())


def test_run_cached_reads_back_scores_and_seconds(digits_lr, tmp_path, monkeypatch):
    """A rerun reads the grid (scores and the seconds first measured) from the cache instead of running it."""
    model, train, query = digits_lr
    first = baselines.run_cached("grad-dot", model, train, query, cache_dir=tmp_path, grid=(1e-3,), timeout=300)

    def fail(*a, **k):
        raise AssertionError("ran again")

    monkeypatch.setattr(baselines, "run_isolated", fail)
    again = baselines.run_cached("grad-dot", model, train, query, cache_dir=tmp_path, grid=(1e-3,), timeout=300)
    assert again[0]["seconds"] == first[0]["seconds"] and torch.equal(again[0]["scores"], first[0]["scores"])
    with pytest.raises(AssertionError, match="ran again"):  # another query set is another cache entry
        baselines.run_cached("grad-dot", model, train, TensorDataset(*[t[:5] for t in query.tensors]),
                             cache_dir=tmp_path, grid=(1e-3,), timeout=300)


def test_a_grid_cut_short_runs_only_its_missing_values_on_the_next_call(digits_lr, tmp_path, monkeypatch):
    """A grid the time cap cut short keeps its finished values; the next call runs the values it lacks (not the whole
    grid again) and stores the grid complete, in the grid's order."""
    model, train, query = digits_lr
    grid, calls = (1e-4, 1e-3, 1e-2), []

    def fake(method, model, train, query, *, grid, **kw):
        calls.append(list(grid))
        cut = len(calls) == 1   # the first call runs out of time after its first two values
        vals = grid[:2] if cut else grid
        return [{"damping": d, "seconds": 1.0, "scores": torch.full((2, 2), d), "grid_complete": not cut,
                 "grid_error": "no complete grid within 1 s" if cut else None} for d in vals]

    monkeypatch.setattr(baselines, "run_isolated", fake)
    first = baselines.run_cached("grad-dot", model, train, query, cache_dir=tmp_path, grid=grid, timeout=1)
    assert [r["damping"] for r in first] == [1e-4, 1e-3] and not any(r["grid_complete"] for r in first)
    second = baselines.run_cached("grad-dot", model, train, query, cache_dir=tmp_path, grid=grid, timeout=1)
    assert calls == [list(grid), [1e-2]]
    assert [r["damping"] for r in second] == list(grid) and all(r["grid_complete"] and r["grid_error"] is None
                                                               for r in second)
    third = baselines.run_cached("grad-dot", model, train, query, cache_dir=tmp_path, grid=grid)
    assert len(calls) == 2 and all(torch.equal(a["scores"], b["scores"]) for a, b in zip(third, second))  # read back


def test_kronfluence_covers_the_cnns_convolutions():
    """dattri's EK-FAC sees nn.Linear only; kronfluence's EK-FAC, the CNN's curvature baseline, tracks the
    convolutions as well."""
    from kronfluence.analyzer import prepare_model
    from kronfluence.module.utils import get_tracked_module_names
    from kronfluence.task import Task

    from daunce.experiments import models

    class CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    cnn = models.seeded(models.small_cnn, 0, 1, 10, 8, 28)
    kinds = {n: type(m).__name__ for n, m in cnn.named_modules()}
    tracked = get_tracked_module_names(prepare_model(cnn, CE()))
    assert sorted(kinds[n] for n in tracked) == ["Conv2d", "Conv2d", "Linear"], tracked


def test_cpu_device_changes_nothing(digits_lr):
    """``device="cpu"`` (and any spelling of it) gives the scores of the call without it, bit for bit."""
    model, train, query = digits_lr
    S, _ = baselines.run("grad-dot", model, train, query)
    for device in ("cpu", torch.device("cpu")):
        S_dev, _ = baselines.run("grad-dot", model, train, query, device=device)
        assert S_dev.device.type == "cpu" and S_dev.dtype == torch.float32
        assert torch.equal(S, S_dev)
    assert [p.device.type for p in model.parameters()] == ["cpu", "cpu"]  # the caller's model is not moved
    with pytest.raises(ValueError, match="device must be"):
        baselines.run("grad-dot", model, train, query, device="tpu-bogus")


def test_settings_key_of_the_cpu_is_the_key_before_the_device_knob(digits_lr):
    """Existing caches stay valid: the CPU's key is the hash the key was before ``device`` existed."""
    import hashlib
    import json

    from daunce.store import fingerprint

    model, train, query = digits_lr
    grid = (1e-3, 1e-1)
    h = hashlib.sha1(json.dumps({"method": "if-cg", "grid": list(grid), "lissa": baselines.LISSA,
                                 "cg": baselines.CG_ITERATIONS, "arnoldi": baselines.ARNOLDI,
                                 "trak": baselines.TRAK_PROJ_DIM, "train": fingerprint(train),
                                 "query": fingerprint(query)}, sort_keys=True).encode())
    for v in model.state_dict().values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    before = h.hexdigest()[:12]
    assert baselines.settings_key("if-cg", model, train, query, grid) == before
    assert baselines.settings_key("if-cg", model, train, query, grid, device="cpu") == before
    assert baselines.settings_key("if-cg", model, train, query, grid, device=torch.device("cpu")) == before


def test_spawned_child_returns_the_grid(digits_lr):
    """The path ``run_isolated`` takes on CUDA (a spawned child that gets its arguments as one pickle), run here on
    the CPU: the same rows as ``run_grid``."""
    import multiprocessing as mp

    model, train, query = digits_lr
    payload, why = baselines._spawn_payload(("grad-dot", model, train, query, {"grid": (1e-3,), "device": "cpu"}))
    assert why is None
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=baselines._spawned_child, args=(child, payload))
    p.start()
    child.close()
    assert parent.poll(120), "no answer from the spawned child"
    kind, row = parent.recv()
    assert kind == "row", row
    assert parent.recv() == ("done", None)
    p.join()
    expected = baselines.run_grid("grad-dot", model, train, query, grid=(1e-3,))[0]["scores"]
    assert torch.equal(torch.from_numpy(row["scores"]), expected)


def test_spawn_payload_refuses_what_a_spawned_process_cannot_load(digits_lr, monkeypatch):
    import sys

    model, train, query = digits_lr
    Local = type("Local", (torch.nn.Module,), {"__module__": "__main__", "forward": lambda self, x: x})
    monkeypatch.setattr(sys.modules["__main__"], "Local", Local, raising=False)  # picklable here, not in a child
    payload, why = baselines._spawn_payload(("grad-dot", torch.nn.Sequential(Local()), train, query, {}))
    assert payload is None and "__main__" in why
    payload, why = baselines._spawn_payload(("grad-dot", model, train, query, {"f": lambda: 0}))
    assert payload is None and why


def test_run_here_has_run_isolateds_rows(digits_lr):
    """The in-process fallback of ``run_isolated`` (CUDA with arguments a spawned process cannot get)."""
    model, train, query = digits_lr
    with pytest.warns(UserWarning, match="in this process"):
        rows = baselines._run_here("grad-dot", model, train, query, {"grid": (1e-3,), "device": "cpu"}, "a test")
    assert [(r["damping"], r["grid_complete"], r["grid_error"]) for r in rows] == [(None, True, None)]
    assert torch.equal(rows[0]["scores"], baselines.run("grad-dot", model, train, query)[0])
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="grad-dot: ValueError"):
        baselines._run_here("grad-dot", model, train, query, {"grid": (1e-3,), "device": "tpu-bogus"}, "a test")
