"""daunce.llm.metagradient_scores, the metagradient reference: the exact derivative of each query's loss through
the fine-tune with respect to the training examples' weights, checked against central finite differences of
``finetune`` itself (AdamW and SGD), its sign checked against the fine-tune's own response to up-weighting."""

import pytest
import torch
from test_llm import EXAMPLES

from daunce import llm

TRAIN = EXAMPLES   # tests/test_llm.py's toy instruction set
QUERIES = [{"prompt": "What is 3+3?", "response": "It is 6."},
           {"prompt": "Say hello in Spanish.", "response": "Hola!"}]


@pytest.fixture
def float64_llama(monkeypatch):
    """A tiny Llama in float64 throughout, LoRA adapters as ``add_lora`` initialises them (B = 0). transformers'
    RMSNorm rounds to float32 whatever the model's dtype, which puts ~1e-9 noise into every fine-tune and swamps
    finite differences; here it computes in the input's dtype."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    base, tok = llm.tiny_llama(seed=0, num_layers=2)
    model = llm.add_lora(base.double(), r=4, alpha=8, seed=0)
    return model, tok


@pytest.mark.parametrize("recipe", [
    dict(optimizer="adamw", lr=1e-2, weight_decay=0.01),
    dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
], ids=["adamw", "sgd"])
def test_metagradient_matches_finite_differences_of_finetune(float64_llama, recipe):
    """S(i, q) = -d l_q(theta_T) / d w_i equals central differences of the actual fine-tune in w_i (relative error
    below 1e-4 over the (6, 2) matrix; measured 7e-6 for AdamW and 1e-9 for SGD at h = 1e-6). Two epochs of
    batches of 4 (a partial batch each epoch), weight decay, SGD's momentum, AdamW from B = 0 (zero gradients of
    the A matrices at the first step). The metagradient's own fine-tune also lands where ``finetune`` does."""
    model, tok = float64_llama
    recipe = dict(recipe, epochs=2, batch_size=4, seed=1)
    train, queries = llm.TextDataset(tok, TRAIN, 48), llm.TextDataset(tok, QUERIES, 48)
    init = llm.trainable_state(model)
    S = llm.metagradient_scores(model, None, train, queries, **recipe)
    assert S.shape == (len(TRAIN), len(QUERIES)) and S.dtype == torch.float64
    theta_T = llm.trainable_state(model)

    def query_loss(w):
        llm.load_trainable_state(model, init)
        llm.finetune(model, None, train, weights=w, progress=False, **recipe)
        return llm.response_nll(model, None, queries)

    one = torch.ones(len(TRAIN), dtype=torch.float64)
    query_loss(one)
    for k, v in llm.trainable_state(model).items():
        assert torch.allclose(theta_T[k], v, rtol=0, atol=1e-12), k
    h = 1e-6   # AdamW's map is curved enough in w that h = 1e-5 leaves a 7e-4 truncation error (seed 1)
    fd = torch.stack([-(query_loss(one + h * e) - query_loss(one - h * e)) / (2 * h)
                      for e in torch.eye(len(TRAIN), dtype=torch.float64)])
    rel = float((S - fd).norm() / fd.norm())
    assert rel < 1e-4, f"metagradient vs finite differences: relative error {rel:.2e}\n{S}\n{fd}"
    assert fd.abs().max() > 1e-4   # the weights move the query losses: the comparison is not of zeros


def test_metagradient_sign_upweighting_a_copy_of_the_query_helps(tiny_lora):
    """A query that repeats training example 2: up-weighting example 2 in the real fine-tune lowers the query's
    loss and removing it raises it, and the reference scores example 2 positive (helpful) and highest of all,
    the orientation of the package's other scores (``top_k_removal`` removes it first). Batching the queries'
    adjoints (``query_chunk``) changes nothing."""
    model, tok = tiny_lora
    recipe = dict(epochs=3, lr=5e-3, batch_size=2, seed=0)
    train, queries = llm.TextDataset(tok, TRAIN, 48), llm.TextDataset(tok, [TRAIN[2], QUERIES[0]], 48)
    init = llm.trainable_state(model)
    S = llm.metagradient_scores(model, None, train, queries, **recipe)
    llm.load_trainable_state(model, init)   # both queries through each step in one batched product: the same matrix
    torch.testing.assert_close(llm.metagradient_scores(model, None, train, queries, query_chunk=2, **recipe), S,
                               rtol=1e-5, atol=1e-9)

    def query_loss(w):
        llm.load_trainable_state(model, init)
        llm.finetune(model, None, train, weights=w, progress=False, **recipe)
        return llm.response_nll(model, None, queries)[0]

    w = torch.ones(len(TRAIN))
    base = query_loss(w)
    up = query_loss(w.index_fill(0, torch.tensor([2]), 2.0))
    removed = query_loss(w.index_fill(0, torch.tensor([2]), 0.0))
    assert up < base < removed
    assert S[2, 0] > 0 and int(S[:, 0].argmax()) == 2
    assert int(llm.top_k_removal(S[:, :1], 1)[0]) == 2
    # to first order removing example 2 raises the query loss by S[2, 0]; a weight change of 1 is not small, so
    # within a factor of 2 (measured: 0.0146 against 0.0097)
    assert 0.5 < float(removed - base) / float(S[2, 0]) < 2


@pytest.fixture
def tiny_lora():
    base, tok = llm.tiny_llama(seed=0, num_layers=2)
    return llm.add_lora(base, r=4, alpha=8, seed=0), tok


def test_finetune_weights_of_one_are_the_plain_fine_tune_and_bad_weights_are_named(tiny_lora):
    model, tok = tiny_lora
    train = llm.TextDataset(tok, TRAIN, 48)
    init = llm.trainable_state(model)
    llm.finetune(model, None, train, epochs=1, batch_size=4, lr=1e-2, progress=False)
    plain = llm.trainable_state(model)
    llm.load_trainable_state(model, init)
    llm.finetune(model, None, train, epochs=1, batch_size=4, lr=1e-2, progress=False, weights=torch.ones(6))
    assert all(torch.equal(plain[k], v) for k, v in llm.trainable_state(model).items())
    with pytest.raises(ValueError, match=r"weights must have shape \(6,\), one per example, got \(5,\)"):
        llm.finetune(model, None, train, epochs=1, progress=False, weights=torch.ones(5))
    with pytest.raises(ValueError, match="momentum=0.9 is an SGD setting"):
        llm.metagradient_scores(model, None, train, train, epochs=1, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        llm.finetune(model, None, train, epochs=1, progress=False, optimizer="adam")


def test_step_batches_is_an_epochwise_permutation():
    plan = llm.step_batches(10, epochs=2, batch_size=4, seed=3)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(plan[:3]).tolist()) == list(range(10)) == sorted(torch.cat(plan[3:]).tolist())
    assert torch.equal(torch.cat(plan), torch.cat(llm.step_batches(10, epochs=2, batch_size=4, seed=3)))
    assert not torch.equal(torch.cat(plan), torch.cat(llm.step_batches(10, epochs=2, batch_size=4, seed=4)))
    assert [llm.lr_factor(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def _bergson_magic_scores(model, train, queries, plan, *, optimizer, lr, momentum):
    """bergson's MAGIC (``Trainer.train`` with a checkpoint per step, then ``Trainer.backward`` once per query) on
    the same fine-tune: the training rows laid out in ``plan``'s order with ``doc_ids`` pointing at their weight,
    per-example mean losses summed over the batch (``sum_of_means``, B times ``batch_loss``: so lr / B for SGD and
    eps * B for AdamW give the same steps), the same linear decay. Returns ``-dl_q/dw``, ``(n_train, n_query)``."""
    import functools
    import tempfile

    import torchopt
    from bergson.magic.data_stream import DataStream
    from bergson.magic.trainer import BackwardState, Trainer
    from bergson.utils.math import weighted_causal_lm_ce
    from datasets import Dataset
    from torchopt.pytree import tree_iter

    B, total = len(plan[0]), len(plan)

    def tokens(ds, i):
        L = int(ds.enc["attention_mask"][i].sum())
        return ds.enc["input_ids"][i, :L].tolist(), ds.enc["labels"][i, :L].tolist()

    rows = [int(i) for idx in plan for i in idx]
    hf = Dataset.from_dict({"input_ids": [tokens(train, i)[0] for i in rows],
                            "labels": [tokens(train, i)[1] for i in rows], "doc_ids": rows})
    model.base_model.model.loss_function = functools.partial(weighted_causal_lm_ce, reduction="sum_of_means")
    if optimizer == "sgd":
        opt = torchopt.sgd(lambda c: lr * (1 - c / total) / B, momentum=momentum)
    else:   # bergson's default eps_root: its backward through sqrt(v) at v = 0 is NaN without one
        opt = torchopt.adamw(lambda c: lr * (1 - c / total), eps=1e-8 * B, eps_root=1e-17, weight_decay=0.0)
    trainer, state = Trainer.initialize(model, opt)
    stream = DataStream(hf, B, device="cpu", input_key="input_ids", weight_shape=(len(train),))
    stream.weights.data = stream.weights.data.double()
    out = []
    with tempfile.TemporaryDirectory() as ck:
        state = trainer.train(state, stream, save_dir=ck, save_mode="all", inplace=True)
        final = state.to("cpu")   # backward loads the earlier checkpoints into the state it is given
        for q in range(len(queries)):
            ids, lab = tokens(queries, q)
            state = final.to("cpu")
            with state.activate(model) as p:
                loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss
                grads = {k: g.detach() for k, g in zip(p, torch.autograd.grad(loss, list(p.values())))}
            opt_grads = [torch.zeros_like(b) for b in tree_iter(state.opt_state)
                         if isinstance(b, torch.Tensor) and b.is_floating_point()]
            stream.requires_grad = True
            bwd = trainer.backward(ck, stream, BackwardState(grads, opt_grads, torch.zeros_like(stream.weights)),
                                   state, cleanup=False, inplace=False, save_mode="all")
            out.append(-bwd.weight_grads.detach().double())
    return torch.stack(out, 1)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_metagradient_matches_bergson_magic(float64_llama, optimizer):
    """Where bergson is installed (it is not a dependency): its MAGIC gives the same matrix on the same fine-tune
    (relative difference below 1e-6 for SGD, measured 4e-8; below 1e-3 for AdamW, measured 2.5e-4: torchopt, which
    bergson's AdamW is, computes the bias corrections 1 - beta^t in float32 from an integer step count, so its
    trajectory lands 2e-5 (relative) away from torch's AdamW in float64 after 4 steps)."""
    pytest.importorskip("bergson.magic.trainer")
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tok = float64_llama
    lr, momentum = (1e-2, 0.0) if optimizer == "adamw" else (0.1, 0.9)
    recipe = dict(epochs=2, batch_size=3, lr=lr, seed=0, optimizer=optimizer, momentum=momentum)
    train, queries = llm.TextDataset(tok, TRAIN, 48), llm.TextDataset(tok, QUERIES, 48)
    theirs = copy.deepcopy(model)
    S = llm.metagradient_scores(model, None, train, queries, **recipe)
    plan = llm.step_batches(len(TRAIN), epochs=2, batch_size=3, seed=0)
    with sdpa_kernel(SDPBackend.MATH):   # no double backward through the fused CPU attention kernels
        Sb = _bergson_magic_scores(theirs, train, queries, plan, optimizer=optimizer, lr=lr, momentum=momentum)
    rel = float((S - Sb).norm() / Sb.norm())
    assert rel < (1e-3 if optimizer == "adamw" else 1e-6), f"daunce vs bergson: relative difference {rel:.2e}"


@pytest.mark.parametrize("eps,smooth", [(1e-3, True), (1e-8, False)])
def test_metagradient_predicts_removals_only_when_adamw_is_smooth(float64_llama, eps, smooth):
    """The metagradient as a linear datamodel: its Pearson correlation with the query-loss change of removing each
    training example in turn (6 x 2 pairs) is above 0.9 with AdamW's eps = 1e-3 (measured 0.97) and below 0.8 with
    torch's eps = 1e-8 (measured 0.49), where components of the gradient near 0 make the fine-tune's response to
    the weights step-like (see daunce.llm.metagradient)."""
    model, tok = float64_llama
    recipe = dict(epochs=2, batch_size=4, lr=1e-2, seed=1, eps=eps)
    train, queries = llm.TextDataset(tok, TRAIN, 48), llm.TextDataset(tok, QUERIES, 48)
    init = llm.trainable_state(model)
    S = llm.metagradient_scores(model, None, train, queries, **recipe)

    def query_loss(w):
        llm.load_trainable_state(model, init)
        llm.finetune(model, None, train, weights=w, progress=False, **recipe)
        return llm.response_nll(model, None, queries)

    one = torch.ones(len(TRAIN), dtype=torch.float64)
    base = query_loss(one)
    removal = torch.stack([query_loss(one - e) - base for e in torch.eye(len(TRAIN), dtype=torch.float64)])
    r = float(torch.corrcoef(torch.stack([S.flatten(), removal.flatten()]))[0, 1])
    assert (r > 0.9) if smooth else (r < 0.8), f"eps={eps}: Pearson {r:.2f}"
