"""daunce.llm.metagradient_scores, the metagradient reference: the exact derivative of each query's loss through
the fine-tune with respect to the training examples' weights, checked against central finite differences of
``finetune`` itself (AdamW and SGD), its sign checked against the fine-tune's own response to up-weighting."""

import pytest
import torch

from daunce import llm

TRAIN = [
    {"prompt": "What is 2+2?", "response": "It is 4."},
    {"prompt": "Name a colour, please.", "response": "Blue is a colour that many people like."},
    {"prompt": "Say hello in French.", "response": "Bonjour!"},
    {"prompt": "Count to three.", "response": "One, two, three."},
    {"prompt": "What is the capital of Italy?", "response": "Rome is the capital of Italy."},
    {"prompt": "Give a synonym of big.", "response": "Large."},
]
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
    below 1e-4 over the (6, 2) matrix; measured 7e-6 for AdamW and 1e-9 for SGD at h = 1e-6). Two epochs of batches of 4 (a
    partial batch each epoch), weight decay, SGD's momentum, AdamW from B = 0 (zero gradients of the A matrices
    at the first step). The metagradient's own fine-tune also lands where ``finetune`` does."""
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
    the orientation of the package's other scores (``top_k_removal`` removes it first)."""
    model, tok = tiny_lora
    recipe = dict(epochs=3, lr=5e-3, batch_size=2, seed=0)
    train, queries = llm.TextDataset(tok, TRAIN, 48), llm.TextDataset(tok, [TRAIN[2], QUERIES[0]], 48)
    init = llm.trainable_state(model)
    S = llm.metagradient_scores(model, None, train, queries, **recipe)

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
