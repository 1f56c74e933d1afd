"""The LLM's LDS pieces on a tiny Llama with LoRA: kronfluence's EK-FAC on the adapters against an EK-FAC built
here by hand (and against the exact damped Fisher influence), and the LDS ground truth of subset fine-tunes (cached
one file per retrain, the same whatever the worker count) read by the package's LDS and noise ceiling."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import default_collate

from daunce import exact, llm, metrics
from daunce.experiments import groundtruth
from daunce.experiments import removal as rm

EXAMPLES = [{"prompt": f"What is {i} plus {i % 5}?", "response": f"{i} plus {i % 5} is {i + i % 5}, of course."}
            for i in range(12)]
RECIPE = dict(epochs=3, lr=2e-2, batch_size=2)


@pytest.fixture(scope="module")
def tiny_lora():
    """A one-layer split of a tiny Llama with LoRA adapters, its seeded initial adapters, and the bottom features."""
    model, tok = llm.tiny_llama(seed=0, num_layers=2)
    top = llm.add_lora(llm.split_model(model, 1), r=4, alpha=8, seed=0)
    return top, llm.trainable_state(top), llm.BottomFeatures(model, tok, 1, 64)


def hand_built_ekfac(model, train) -> torch.Tensor:
    """EK-FAC of the empirical Fisher of the mean response NLL on the LoRA layers, built here without kronfluence:
    per layer the eigenvectors of the token-summed input covariance A and output-gradient covariance S (padding
    left out), the eigenvalues re-fitted as the mean over examples of the squared gradient in that basis; as a
    ``(d, d)`` block-diagonal matrix in the order of the model's trainable parameters."""
    names = llm.lora_linear_names(model)
    modules = dict(model.named_modules())
    task = llm.CausalLMTask()
    inputs, out_grads, hooks = {}, {}, []
    for n in names:
        def forward_hook(module, args, out, n=n):
            inputs[n] = args[0].detach()
            out.register_hook(lambda g, n=n: out_grads.__setitem__(n, g.detach()))
        hooks.append(modules[n].register_forward_hook(forward_hook))
    A, S, grads = dict.fromkeys(names, 0), dict.fromkeys(names, 0), {n: [] for n in names}
    try:
        for i in range(len(train)):
            batch = default_collate([train[i]])
            task.loss(task.outputs(model, batch), batch).sum().backward()
            T = int(batch["attention_mask"].sum())
            for n in names:
                a, g = inputs[n][0, :T].double(), out_grads[n][0, :T].double()
                A[n], S[n] = A[n] + a.T @ a, S[n] + g.T @ g
                grads[n].append(g.T @ a)   # this example's gradient of the layer's weight, (out, in)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    blocks = {}
    for n in names:
        QA, QS = torch.linalg.eigh(A[n])[1], torch.linalg.eigh(S[n])[1]
        lam = (QS.T @ torch.stack(grads[n]) @ QA).pow(2).mean(0)
        Q = torch.kron(QS, QA)   # the weight flattened row by row
        blocks[n + ".weight"] = Q @ torch.diag(lam.reshape(-1)) @ Q.T
    return torch.block_diag(*[blocks[n] for n, p in model.named_parameters() if p.requires_grad])


def test_kronfluence_ekfac_on_the_adapters_is_the_hand_built_ekfac_influence(tiny_lora):
    """kronfluence's EK-FAC on the LoRA layers (empirical Fisher) equals the damped influence function with an
    EK-FAC built by hand, with the package's sign (a query that is a training example's twin ranks that example
    first); it agrees in rank with the exact damped Fisher influence; the sampled Fisher is seeded; the model is left
    as it was."""
    top, init, feats = tiny_lora
    tr, q = feats(EXAMPLES[:10]), feats(EXAMPLES[10:] + EXAMPLES[:2])   # queries 2 and 3: twins of training 0 and 1
    with torch.no_grad():   # a generic trained-looking point (fresh adapters have lora_B = 0)
        g = torch.Generator().manual_seed(1)
        for p in top.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    before = llm.trainable_state(top)
    rows = llm.ekfac_damping_grid(top, tr, q, grid=(1e-4, 1e-3), empirical_fisher=True, batch_size=4)
    assert all(torch.equal(v, llm.trainable_state(top)[k]) for k, v in before.items())
    Gi = llm.per_example_gradients(top, tr, proj_dim=None).double()
    Gq = llm.per_example_gradients(top, q, proj_dim=None).double()
    C = hand_built_ekfac(top, tr)
    for r in rows:
        S = r["scores"].double()
        assert S.shape == (10, 4)
        ref = exact.influence(top, None, tr, q, damping=r["damping"], train_grads=Gi, query_grads=Gq, curvature=C)
        assert (S - ref).abs().max() < 1e-4 * ref.abs().max()
        assert [int(S[:, 2].argmax()), int(S[:, 3].argmax())] == [0, 1]
        fisher = exact.influence(top, None, tr, q, form="fisher", damping=r["damping"], train_grads=Gi,
                                 query_grads=Gq)
        assert spearmanr(S.flatten(), fisher.flatten()).correlation > 0.7
    sampled = [llm.ekfac_scores(top, tr, q, damping=1e-3, batch_size=4, seed=0) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    assert spearmanr(sampled[0].flatten(), rows[1]["scores"].flatten()).correlation > 0.8
    with pytest.raises(ValueError, match="ekfac_scores: the model has no LoRA"):
        llm.ekfac_scores(llm.split_model(llm.tiny_llama(seed=0, num_layers=2)[0], 1), tr, q)
    llm.load_trainable_state(top, init)


def test_lds_ground_truth_is_cached_per_retrain_and_does_not_depend_on_the_worker_count(tiny_lora, tmp_path):
    """Subset fine-tunes with theta0's recipe: one file per (subset, seed), bit for bit the same with 1 and 2
    workers; a rerun retrains nothing, more subsets train only the new ones, a folder of other subsets is refused;
    the second seed only on the first n_repeat subsets; the model's adapters are restored."""
    top, init, feats = tiny_lora
    tr, q = feats(EXAMPLES), feats(EXAMPLES[:3])
    subsets = groundtruth.half_subsets(len(tr), 4, seed=0)
    llm.load_trainable_state(top, init)
    before = llm.trainable_state(top)
    runs = {w: rm.lds_ground_truth(top, init, tr, q, subsets, RECIPE, n_repeat=2, batch=8, workdir=tmp_path / f"w{w}",
                                   workers=w) for w in (1, 2)}
    assert all(torch.equal(v, llm.trainable_state(top)[k]) for k, v in before.items())
    nll = runs[2]["nll"]
    assert torch.equal(runs[1]["nll"].nan_to_num(-1), nll.nan_to_num(-1))   # bit for bit
    assert nll.shape == (4, 2, 3) and runs[2]["trained"] == 6 == len(list((tmp_path / "w2" / "gt").glob("m*.pt")))
    assert torch.isnan(nll[2:, 1]).all() and torch.isfinite(nll[:2]).all() and torch.isfinite(nll[:, 0]).all()
    assert not torch.equal(nll[0, 0], nll[0, 1])   # the second seed orders the minibatches differently
    torch.testing.assert_close(runs[2]["outputs"], -torch.stack([nll[:2].mean(1), nll[2:, 0]]).reshape(4, 3))
    assert torch.equal(runs[2]["repeats"], -nll[:2])
    # subset 0, seed 0 by hand: theta0's recipe from the initial adapters on the subset, seed 1000 * 0 + 0
    llm.load_trainable_state(top, init)
    llm.finetune(top, None, tr.subset(subsets[0].nonzero().squeeze(1)), seed=0, progress=False, **RECIPE)
    torch.testing.assert_close(nll[0, 0], llm.response_nll(top, None, q, 8), rtol=1e-6, atol=1e-6)
    llm.load_trainable_state(top, init)

    again = rm.lds_ground_truth(top, init, tr, q, subsets, RECIPE, n_repeat=2, batch=8, workdir=tmp_path / "w2")
    assert again["trained"] == 0 and torch.equal(again["nll"].nan_to_num(-1), nll.nan_to_num(-1))
    more = groundtruth.half_subsets(len(tr), 5, seed=0)   # the first 4 are the same
    grown = rm.lds_ground_truth(top, init, tr, q, more, RECIPE, n_repeat=2, batch=8, workdir=tmp_path / "w2")
    assert grown["trained"] == 1 and torch.equal(grown["nll"][:4].nan_to_num(-1), nll.nan_to_num(-1))
    with pytest.raises(ValueError, match=r"m0000_s0\.pt holds a retrain on another subset"):
        rm.lds_ground_truth(top, init, tr, q, groundtruth.half_subsets(len(tr), 4, seed=1), RECIPE, n_repeat=2,
                            batch=8, workdir=tmp_path / "w2")
    with pytest.raises(ValueError, match="LDS retrains of another run.*recipe"):
        rm.lds_ground_truth(top, init, tr, q, subsets, dict(RECIPE, epochs=1), batch=8, workdir=tmp_path / "w2")
    with pytest.raises(ValueError, match="n_repeat must lie in"):
        rm.lds_ground_truth(top, init, tr, q, subsets, RECIPE, n_repeat=5)
    with pytest.raises(ValueError, match="subset 1 holds no training example"):
        rm.lds_ground_truth(top, init, tr, q, torch.stack([subsets[0], torch.zeros(len(tr), dtype=torch.bool)]),
                            RECIPE)


def test_llm_lds_end_to_end_ranks_ekfac_above_its_negation(tiny_lora, tmp_path):
    """The LLM LDS from end to end on the tiny model: ground truth on 8 half-subsets (3 with a second seed), theta0 by
    the same recipe, kronfluence's EK-FAC scores at theta0; the LDS of the scores (package sign: positive = helpful)
    is positive, above that of their negation; a query's NLL is lower after the subsets that hold its twin; the
    noise ceiling comes from the repeated subsets."""
    top, init, feats = tiny_lora
    tr, q = feats(EXAMPLES), feats(EXAMPLES[:6])   # query j is training example j's twin
    subsets = groundtruth.half_subsets(len(tr), 8, seed=0)
    gt = rm.lds_ground_truth(top, init, tr, q, subsets, RECIPE, n_repeat=3, batch=8, workdir=tmp_path, workers=1)
    holds_twin = subsets[:, :6].numpy()
    good = gt["outputs"].numpy()
    assert sum(good[holds_twin[:, j], j].mean() > good[~holds_twin[:, j], j].mean() for j in range(6)) >= 5
    llm.load_trainable_state(top, init)
    llm.finetune(top, None, tr, seed=0, progress=False, **RECIPE)   # theta0
    S = llm.ekfac_scores(top, tr, q, damping=1e-3, batch_size=4)
    llm.load_trainable_state(top, init)
    res, neg = metrics.lds(S, gt["outputs"], gt["subsets"]), metrics.lds(-S, gt["outputs"], gt["subsets"])
    assert res.per_query.shape == (6,) and res.mean > 0.3 and res.mean > neg.mean
    ceiling = metrics.noise_ceiling(gt["repeats"])
    assert ceiling["n_seeds"] == 2 and -1 <= ceiling["between_seeds"] <= 1 and np.isfinite(ceiling["of_mean"])
