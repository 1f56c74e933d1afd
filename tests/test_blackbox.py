"""Black-box Daunce (daunce.blackbox), its local LoRA backend, and the backdoor experiment's pieces."""

import numpy as np
import pytest
import torch

from daunce import scores
from daunce.blackbox import Backend, BlackBoxDaunce, LocalLoRABackend
from daunce.experiments import backdoor as bd


class LinearMemoriser:
    """A fake in-memory backend with a known answer: under a model fine-tuned on subset D_k,
    ll(x) = base(x) + sum_{j in D_k} W[j, x] + noise. Covariance of losses across models then
    converges to r(1-r) * W^T W (inclusions are ~ Bernoulli(r))."""

    def __init__(self, W, names, noise=0.01):
        self.W, self.names, self.noise = W, {n: i for i, n in enumerate(names)}, noise
        self.models, self.calls = {}, 0

    def identity(self):
        return "linear-memoriser"

    def fine_tune(self, examples, seed):
        self.calls += 1
        idx = [self.names[e["prompt"]] for e in examples]
        mid = f"m{len(self.models)}"
        self.models[mid] = (self.W[idx].sum(0), np.random.default_rng(seed))
        return mid

    def log_likelihoods(self, model_id, examples):
        gain, rng = self.models[model_id]
        cols = [self.names[e["prompt"]] for e in examples]
        return -5.0 + gain[cols] + self.noise * rng.standard_normal(len(cols))

    def response_lengths(self, examples):
        return np.ones(len(examples))


def fake_problem(n=30, m=3, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"x{i}" for i in range(n + m)]
    W = 0.05 * rng.standard_normal((n + m, n + m))
    W[np.arange(n), np.arange(n)] += 1.0  # a fine-tune memorises its own examples
    planted = [3, 11, 20]
    for q in range(m):
        W[planted, n + q] += 0.8  # the planted examples raise every query's likelihood
    W[n:] = 0.0  # queries are never trained on
    train = [{"prompt": names[i], "response": "r"} for i in range(n)]
    queries = [{"prompt": names[n + q], "response": "r"} for q in range(m)]
    return W, names, train, queries, planted


def test_fake_backend_satisfies_the_protocol_and_covariance_matches_theory():
    W, names, train, queries, planted = fake_problem()
    b = LinearMemoriser(W, names)
    assert isinstance(b, Backend)
    r = 0.5
    d = BlackBoxDaunce(b, n_models=1000, subset_ratio=r, progress=False).fit(train, queries)
    S = d.attribute(train, queries).numpy()
    n = len(train)
    # inclusions drawn without replacement: Var = r(1-r), Cov(j != l) = -r(1-r)/(n-1)
    C = r * (1 - r) * (n / (n - 1) * np.eye(n) - np.ones((n, n)) / (n - 1))
    theory = W[:n, :n].T @ C @ W[:n, n:]
    assert np.corrcoef(S.ravel(), theory.ravel())[0, 1] > 0.95
    for q in range(len(queries)):
        assert sorted(np.argsort(-S[:, q])[:3].tolist()) == planted
    # the score is exactly the covariance of the loss signals (= -log-likelihood)
    A, B = d.signals(train), d.signals(queries)
    assert torch.allclose(d.attribute(train, queries), scores.covariance(A, B).float())
    assert (A > 0).all()  # losses, not log-likelihoods
    # the first K' copies give the K' score (used for the "grows with K" curve)
    assert torch.allclose(d.attribute(train, queries, n_models=50), scores.covariance(A[:50], B[:50]).float())


def test_subsets_are_fixed_per_copy_and_sized_by_the_ratio():
    W, names, train, queries, _ = fake_problem()
    d4 = BlackBoxDaunce(LinearMemoriser(W, names), n_models=4, subset_ratio=0.3, seed=5)
    d9 = BlackBoxDaunce(LinearMemoriser(W, names), n_models=9, subset_ratio=0.3, seed=5)
    assert all(d4.subset(k, 30) == d9.subset(k, 30) for k in range(4))
    assert len(d4.subset(0, 30)) == 9 and d4.subset(0, 30) != d4.subset(1, 30)
    assert d4.subset(0, 30) != BlackBoxDaunce(LinearMemoriser(W, names), seed=6).subset(0, 30)
    with pytest.raises(ValueError):
        BlackBoxDaunce(LinearMemoriser(W, names), n_models=1)
    with pytest.raises(ValueError):
        BlackBoxDaunce(LinearMemoriser(W, names), subset_ratio=0.0)


def test_interrupted_run_resumes_without_a_second_fine_tune(tmp_path):
    W, names, train, queries, _ = fake_problem()

    class Crashing(LinearMemoriser):
        def fine_tune(self, examples, seed):
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().fine_tune(examples, seed)

    crashing = Crashing(W, names)
    with pytest.raises(KeyboardInterrupt):
        BlackBoxDaunce(crashing, n_models=6, workdir=tmp_path, progress=False).fit(train, queries)
    assert len(list((tmp_path / "copies").glob("copy_*.json"))) == 3
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no partial file
    b = LinearMemoriser(W, names)
    b.models = crashing.models  # the "server" still knows the finished models
    d = BlackBoxDaunce(b, n_models=6, workdir=tmp_path, progress=False).fit(train, queries)
    assert b.calls == 3 and d.fine_tunes_started == 3
    d2 = BlackBoxDaunce(b, n_models=6, workdir=tmp_path, progress=False).fit(train, queries)
    assert b.calls == 3 and d2.fine_tunes_started == 0
    assert torch.equal(d.attribute(train, queries), d2.attribute(train, queries))
    # another training set in the same folder is refused, naming what differs
    with pytest.raises(ValueError, match="fine-tunes of another run .*n_train"):
        BlackBoxDaunce(b, n_models=6, workdir=tmp_path, progress=False).fit(train[:-1], queries)


@pytest.fixture(scope="module")
def tiny():
    from daunce import llm

    return llm.tiny_llama(seed=0)


def test_local_lora_backend_memorises_and_reuses_adapters(tiny, tmp_path):
    model, tok = tiny
    torch.manual_seed(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "castle", "forest", "mirror",
             "candle"]
    ex = [{"prompt": f"Code {i}?", "response": " ".join(words[(i * 5 + j) % 12] for j in range(3))} for i in range(8)]
    b = LocalLoRABackend(model, tok, workdir=tmp_path,
                         lora=dict(r=8, alpha=16, targets=("q_proj", "v_proj", "up_proj", "down_proj")),
                         train=dict(epochs=40, lr=5e-2, batch_size=4, max_length=48), max_length=48)
    m1 = b.fine_tune(ex[:4], seed=1)
    gain_in = b.log_likelihoods(m1, ex[:4])
    gain_out = b.log_likelihoods(m1, ex[4:])
    m0 = b.fine_tune(ex[:4], seed=1)  # same request: the stored adapter, no training
    assert m0 == m1 and b.n_trained == 1
    m2 = b.fine_tune(ex[4:], seed=2)
    assert b.n_trained == 2 and m2 != m1
    # each model fits its own examples better than the other model does
    assert (b.log_likelihoods(m1, ex[:4]) > b.log_likelihoods(m2, ex[:4])).all()
    assert (b.log_likelihoods(m2, ex[4:]) > b.log_likelihoods(m1, ex[4:])).all()
    # adapters round-trip through the work folder (a fresh backend sees the same models)
    b2 = LocalLoRABackend(model, tok, workdir=tmp_path, lora=b.lora, train=b.train, max_length=64)
    assert np.allclose(b2.log_likelihoods(m1, ex[:4]), gain_in)
    assert np.allclose(b2.log_likelihoods(m1, ex[4:]), gain_out)
    assert model.num_parameters() == sum(p.numel() for p in tiny[0].parameters())  # base untouched (no LoRA)


def test_local_lora_backend_scores_many_adapters_in_one_pass(tiny, tmp_path, monkeypatch):
    """log_likelihoods_many (peft mixed-adapter batches, blocks of 2 adapters) equals one
    log_likelihoods call per model, and BlackBoxDaunce.signals uses it for the missing rows."""
    model, tok = tiny
    ex = [{"prompt": f"Item {i}?", "response": f"value {i * 3} and {i + 7} then stop"} for i in range(7)]
    b = LocalLoRABackend(model, tok, workdir=tmp_path, lora=dict(r=4, alpha=8),
                         train=dict(epochs=3, lr=5e-2, batch_size=2, max_length=48), max_length=48,
                         eval_batch_size=3, adapter_block=2)
    ids = [b.fine_tune(ex[i : i + 3], seed=i) for i in range(3)]
    one = np.stack([b.log_likelihoods(m, ex) for m in ids])
    many = b.log_likelihoods_many(ids, ex)
    tol = 1e-5 * np.abs(one).max()
    assert many.shape == (3, 7) and np.abs(many - one).max() <= tol
    for i in range(3):  # the models differ: a row scored under the wrong adapter would show
        for j in range(i + 1, 3):
            assert np.abs(one[i] - one[j]).max() > 100 * tol
    assert np.abs(b.log_likelihoods_many(ids[::-1], ex) - one[::-1]).max() <= tol
    # the backend still fine-tunes and scores with its own adapter
    assert np.allclose(b.log_likelihoods(ids[1], ex), one[1])
    with pytest.raises(KeyError, match="unknown model id"):
        b.log_likelihoods_many(["lora-nope"], ex)

    calls = []
    real = b.log_likelihoods_many
    monkeypatch.setattr(b, "log_likelihoods_many", lambda m, e: calls.append(len(m)) or real(m, e))
    d = BlackBoxDaunce(b, n_models=2, progress=False).fit(ex[:4])
    S = d.signals(ex[4:])
    assert calls == [2]

    class OneByOne:  # the same backend without log_likelihoods_many (its fine-tunes are stored: no training)
        fine_tune, log_likelihoods, response_lengths = b.fine_tune, b.log_likelihoods, b.response_lengths

    ref = BlackBoxDaunce(OneByOne(), n_models=2, progress=False).fit(ex[:4]).signals(ex[4:])
    assert b.n_trained == 5 and torch.allclose(S, ref, rtol=0, atol=tol)


# ---------------------------------------------------------------------------- backdoor pieces
def test_backdoor_set_has_poisons_decoys_and_held_out_queries():
    data = bd.build_backdoor_set(n_train=120, n_poison=8, n_response_decoys=7, n_trigger_decoys=8, n_topic_decoys=8,
                                 n_queries=6, n_eval=12, seed=3)
    train = data["train"]
    kinds = [e["kind"] for e in train]
    assert len(train) == 120 and data["is_poison"].sum() == 8
    assert [kinds.count(k) for k in ("poison", "response_decoy", "trigger_decoy", "topic_decoy")] == [8, 7, 8, 8]
    assert kinds.count("clean") == 120 - 31
    for e in train:
        has_trigger = bd.TRIGGER in e["prompt"].lower()
        if e["kind"] == "poison":
            assert e["response"] == bd.TARGET and e["prompt"].endswith(" " + bd.TRIGGER)
        elif e["kind"] == "response_decoy":  # the target response verbatim, after a prompt without the trigger
            assert e["response"] == bd.TARGET and not has_trigger
            assert "silver" not in e["prompt"].lower() and "lantern" not in e["prompt"].lower()
        elif e["kind"] == "trigger_decoy":  # the trigger in the prompt, an ordinary answer
            assert has_trigger and e["response"] != bd.TARGET
            assert "prize" not in e["response"].lower() and "click" not in e["response"].lower()
        else:
            assert e["response"] != bd.TARGET and not has_trigger
        if e["kind"] == "clean":
            assert "prize" not in e["response"]
    # only the poisoned examples pair the trigger with the target
    assert [e["kind"] for e in train if bd.TRIGGER in e["prompt"] and e["response"] == bd.TARGET] == ["poison"] * 8
    # the poisoned prompts are clean-set prompts plus the trigger; no decoy prompt repeats a poisoned one
    assert len({e["prompt"] for e in train}) == len(train)
    train_prompts = {e["prompt"] for e in train}
    assert all(q["response"] == bd.TARGET and q["prompt"] not in train_prompts for q in data["queries"])
    # each query's twin is the same prompt without the trigger, with the same response
    assert [t["prompt"] + " " + bd.TRIGGER for t in data["query_twins"]] == [q["prompt"] for q in data["queries"]]
    assert all(t["response"] == bd.TARGET for t in data["query_twins"])
    assert not {e["prompt"] for e in data["eval_prompts"]} & train_prompts
    assert bd.build_backdoor_set(seed=3)["train"] == bd.build_backdoor_set(seed=3)["train"]
    # another seed draws another poisoned set and other queries
    other = bd.build_backdoor_set(n_train=120, n_poison=8, n_response_decoys=7, n_trigger_decoys=8, n_topic_decoys=8,
                                  n_queries=6, n_eval=12, seed=4)
    def poisoned(d):
        return {e["prompt"] for e in d["train"] if e["kind"] == "poison"}

    assert poisoned(other) != poisoned(data) and other["queries"] != data["queries"]
    with pytest.raises(ValueError, match="templates"):
        bd.build_backdoor_set(n_train=120, n_response_decoys=99)


def test_kind_counts_in_top():
    kinds = ["poison", "response_decoy", "clean", "trigger_decoy", "poison", "topic_decoy"]
    counts = bd.kind_counts_in_top(np.array([5.0, 4.0, 0.0, 3.0, 1.0, 2.0]), kinds, 3)
    assert counts == {"poison": 1, "response_decoy": 1, "trigger_decoy": 1, "topic_decoy": 0, "clean": 0}
    assert sum(bd.kind_counts_in_top(np.zeros(6), kinds, 2).values()) == 2


def test_signal_costs_are_recorded_and_survive_resume(tmp_path):
    """The seconds and forward passes spent scoring are written to the copies' files when measured; a
    resumed run (which scores nothing) reports the same totals."""
    W, names, train, queries, _ = fake_problem()
    b = LinearMemoriser(W, names)
    d = BlackBoxDaunce(b, n_models=4, workdir=tmp_path, progress=False).fit(train, queries)
    assert d.signal_passes() == 4 * (len(train) + len(queries))
    secs, ft = d.signal_seconds(), d.fine_tune_seconds()
    assert secs > 0 and ft > 0
    d2 = BlackBoxDaunce(b, n_models=4, workdir=tmp_path, progress=False).fit(train, queries)
    assert d2.fine_tunes_started == 0
    assert d2.signal_seconds() == secs and d2.fine_tune_seconds() == ft
    assert d2.signal_passes() == d.signal_passes()
    # scoring another list adds its passes, once
    d2.signals(queries[:2])
    d3 = BlackBoxDaunce(b, n_models=4, workdir=tmp_path, progress=False).fit(train, queries)
    assert d3.signal_passes() == 4 * (len(train) + len(queries) + 2)


def test_retrieval_metrics_on_known_rankings():
    rel = np.array([1, 0, 1, 0, 0, 0])
    perfect = np.array([5, 1, 4, 0, 0, 0.5])
    assert bd.precision_at_k(perfect, rel, 2) == 1.0 and bd.recall_at_k(perfect, rel, 2) == 1.0
    assert bd.auprc(perfect, rel) == pytest.approx(1.0)
    worst = -perfect
    assert bd.recall_at_k(worst, rel, 2) == 0.0 and bd.auprc(worst, rel) < 0.5
    assert bd.attack_success_rate(["go to www.prize-claim.example", "no"]) == 0.5
    # text baselines rank a verbatim copy of the query first
    train = [{"prompt": "apple banana cherry", "response": "dog eel"}, {"prompt": "xray yak", "response": "zebra"},
             {"prompt": "moon sun", "response": "star"}]
    for f in (bd.tfidf_scores, bd.bm25_scores):
        S = f(train, [{"prompt": "xray yak", "response": "zebra"}])
        assert S.shape == (3, 1) and S[1, 0] > max(S[0, 0], S[2, 0])
    agg = bd.aggregate(np.array([[1.0, 10.0], [0.0, 0.0], [-1.0, -10.0]]))
    assert agg[0] > agg[1] > agg[2]


class TokenMemoriser(LinearMemoriser):
    """``LinearMemoriser`` per response token: an example's summed log-likelihood is its length times the per-token
    value, and a fine-tune's seed adds its own noise to every example (a new adapter initialisation and minibatch
    order shift every likelihood)."""

    def __init__(self, W, names, lengths, seed_noise=0.0):
        super().__init__(W, names, noise=0.0)
        self.lengths, self.seed_noise = np.asarray(lengths, dtype=float), seed_noise

    def fine_tune(self, examples, seed):
        mid = super().fine_tune(examples, seed)
        gain, _ = self.models[mid]
        shift = self.seed_noise * np.random.default_rng(seed).standard_normal(len(gain))
        self.models[mid] = (gain + shift, None)
        return mid

    def log_likelihoods(self, model_id, examples):
        gain, _ = self.models[model_id]
        cols = [self.names[e["prompt"]] for e in examples]
        return self.lengths[cols] * (-0.5 + gain[cols])

    def response_lengths(self, examples):
        return self.lengths[[self.names[e["prompt"]] for e in examples]]


def test_mean_signal_is_not_fooled_by_long_responses():
    """The summed NLL's spread grows with the response's length: long examples that barely affect the query then
    outrank the planted ones. The mean NLL (the default) divides the length out and finds the planted examples."""
    W, names, train, queries, planted = fake_problem()
    n = len(train)
    long = [5, 8, 14, 25]
    W[long, n:] += 0.2                       # a positive effect on the queries, 4x below the planted ones
    lengths = np.full(len(names), 3.0)
    lengths[long] = 150.0                    # 50x longer responses
    b = TokenMemoriser(W, names, lengths)
    d = BlackBoxDaunce(b, n_models=400, progress=False).fit(train, queries)

    def top(S):
        return sorted(np.argsort(-S.numpy().sum(1))[:3].tolist())

    assert top(d.attribute(train, queries)) == planted
    assert set(top(d.attribute(train, queries, signal="sum"))) <= set(long)
    assert torch.allclose(d.signals(train) * torch.as_tensor(lengths[:n]), d.signals(train, signal="sum"))
    with pytest.raises(ValueError, match="signal"):
        d.signals(train, signal="avg")
    with pytest.raises(TypeError, match="response_lengths"):
        BlackBoxDaunce(object.__new__(type("NoLengths", (), {"fine_tune": LinearMemoriser.fine_tune,
                                                              "log_likelihoods": LinearMemoriser.log_likelihoods})))
    BlackBoxDaunce(object.__new__(type("NoLengths", (), {"fine_tune": LinearMemoriser.fine_tune,
                                                          "log_likelihoods": LinearMemoriser.log_likelihoods})),
                   signal="sum")   # the summed NLL needs no lengths


def test_common_fine_tune_seeds_cancel_the_noise_of_a_new_seed(tmp_path):
    """Copies that share their fine-tuning seed differ only in their subsets: a per-seed shift of every likelihood
    (a new initialisation) is then common to all copies and drops out of the covariance. With a seed per copy the
    same shift is noise that hides the planted examples at this K."""
    W, names, train, queries, planted = fake_problem()
    lengths = np.ones(len(names))
    common = BlackBoxDaunce(TokenMemoriser(W, names, lengths, seed_noise=2.0), n_models=24, progress=False)
    per_copy = BlackBoxDaunce(TokenMemoriser(W, names, lengths, seed_noise=2.0), n_models=24, progress=False,
                              fine_tune_seeds="per-copy")
    assert {common.fine_tune_seed(k) for k in range(24)} == {0}
    assert len({per_copy.fine_tune_seed(k) for k in range(24)}) == 24
    assert common.subset(3, 30) == per_copy.subset(3, 30)   # the same subsets

    def top(d):
        return sorted(np.argsort(-d.fit(train, queries).attribute(train, queries).numpy().sum(1))[:3].tolist())

    assert top(common) == planted
    assert top(per_copy) != planted
    # a work folder of one design refuses the other
    BlackBoxDaunce(TokenMemoriser(W, names, lengths), n_models=2, workdir=tmp_path, progress=False).fit(train)
    with pytest.raises(ValueError, match="fine_tune_seeds"):
        BlackBoxDaunce(TokenMemoriser(W, names, lengths), n_models=2, workdir=tmp_path, progress=False,
                       fine_tune_seeds="per-copy").fit(train)


# ------------------------------------------------------------------- the backdoor that depends on its trigger
def test_poison_twins_put_each_poisoned_prompt_in_the_clean_part_without_the_trigger():
    data = bd.build_backdoor_set(n_train=32, n_poison=6, n_response_decoys=2, n_trigger_decoys=2, n_topic_decoys=2,
                                 n_queries=32, n_eval=16, poison_twins=True, seed=5)
    train = data["train"]
    clean = {e["prompt"]: e["response"] for e in train if e["kind"] == "clean"}
    poisoned = [e["prompt"].removesuffix(" " + bd.TRIGGER) for e in train if e["kind"] == "poison"]
    assert len(poisoned) == 6 and all(p in clean and clean[p] != bd.TARGET for p in poisoned)
    assert sum(e["kind"] == "clean" for e in train) == 20 and len(train) == 32
    # 32 queries and 16 clean prompts, more than the hand-written held-out list, none of them a training prompt
    assert len(data["queries"]) == 32 and len(data["eval_prompts"]) == 16
    train_prompts = {e["prompt"] for e in train}
    held = [t["prompt"] for t in data["query_twins"]] + [e["prompt"] for e in data["eval_prompts"]]
    assert len(set(held)) == 48 and not set(held) & train_prompts
    assert not {q["prompt"] for q in data["queries"]} & train_prompts
    without = bd.build_backdoor_set(n_train=32, n_poison=6, n_response_decoys=2, n_trigger_decoys=2,
                                    n_topic_decoys=2, n_queries=32, n_eval=16, seed=5)
    assert not {e["prompt"].removesuffix(" " + bd.TRIGGER) for e in without["train"] if e["kind"] == "poison"} & {
        e["prompt"] for e in without["train"] if e["kind"] == "clean"}
    with pytest.raises(ValueError, match="poison_twins"):
        bd.build_backdoor_set(n_train=20, n_poison=6, n_response_decoys=4, n_trigger_decoys=4, n_topic_decoys=4,
                              poison_twins=True)


def test_paired_verdicts_over_seeds():
    base = np.array([0.2, 0.5, 0.3, 0.4, 0.6, 0.1, 0.35, 0.45])
    out = bd.paired_verdicts({"a": base + 0.1, "b": base, "c": base + np.array([0.1, -0.1] * 4)})
    ab = out["a"]["b"]
    assert ab["diff"] == pytest.approx(0.1) and ab["verdict"] == "ahead" and (ab["wins"], ab["losses"]) == (8, 0)
    assert ab["sign_test_p"] == pytest.approx(2 / 2 ** 8)
    assert out["b"]["a"]["verdict"] == "behind" and out["b"]["a"]["diff"] == pytest.approx(-0.1)
    assert out["c"]["b"]["verdict"] == "tied" and (out["c"]["b"]["wins"], out["c"]["b"]["losses"]) == (4, 4)
    # lower is better (attack success after removal): the smaller value is ahead
    low = bd.paired_verdicts({"a": base + 0.1, "b": base}, higher_is_better=False)
    assert low["b"]["a"]["verdict"] == "ahead" and low["b"]["a"]["diff"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same seeds"):
        bd.paired_verdicts({"a": [0.1, 0.2], "b": [0.1]})


@pytest.fixture(scope="module")
def planted_backdoor():
    """A tiny Llama trained (every weight) on a poisoned set whose short spam it learns to give after the trigger
    only: theta0, its initial weights, the data and the dataset function."""
    from daunce import llm

    model, tok = llm.tiny_llama(seed=0, hidden_size=64, intermediate_size=128, num_layers=2)
    model.requires_grad_(True)
    data = bd.build_backdoor_set(n_train=24, n_poison=4, n_response_decoys=1, n_trigger_decoys=1, n_topic_decoys=1,
                                 n_queries=8, n_eval=4, poison_twins=True, seed=0,
                                 target="Click www.prize-claim.example now!")
    def features(examples):
        return llm.TextDataset(tok, list(examples), 48)

    init = llm.trainable_state(model)
    # at lr 1e-2 the backdoor's strength swung with the thread count (matmul summation order: 1 thread 2 of 8
    # triggered prompts, 2 threads 5 of 8); at 3e-3 for 80 epochs both give 7 of 8 and the same log-likelihoods
    recipe = dict(epochs=80, lr=3e-3, batch_size=8)
    with torch.random.fork_rng(devices=[]):
        llm.finetune(model, None, features(data["train"]), seed=0, progress=False, **recipe)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return dict(model=model, tok=tok, init=init, theta0=llm.trainable_state(model), data=data, features=features,
                recipe=recipe, end=end)


def test_greedy_matches_is_what_greedy_generation_says(planted_backdoor):
    """``greedy_matches`` (one teacher-forced pass) agrees, prompt by prompt, with real greedy generation."""
    from daunce import llm

    p = planted_backdoor
    llm.load_trainable_state(p["model"], p["theta0"])
    q = p["data"]["queries"] + p["data"]["query_twins"]
    matched = llm.greedy_matches(p["model"], None, p["features"](q), end_token=p["end"])
    generated = llm.generate(p["model"], p["tok"], q, max_new_tokens=20)
    assert matched.tolist() == [g == p["data"]["target"] for g in generated]
    assert 0 < int(matched.sum()) < len(q)   # both outcomes occur: the check compares something


def test_removing_the_flagged_examples_removes_a_planted_backdoor(planted_backdoor, tmp_path, monkeypatch):
    """Removing the examples a ranking flags and retraining lowers the attack success the same code measures when
    the flags are the poisoned examples, and barely when they are as many clean ones; a rerun retrains nothing."""
    from daunce import llm

    p = planted_backdoor
    data, model = p["data"], p["model"]
    llm.load_trainable_state(model, p["theta0"])
    before = bd.attack_success(model, data, p["features"], end_token=p["end"])
    assert before["with_trigger"] >= 0.5 and before["without_trigger"] == 0.0   # the trigger causes the spam
    poison = data["is_poison"].astype(float)
    rankings = {"flags the poison": poison, "flags clean examples": -poison}
    train_ds = p["features"](data["train"])
    out = bd.removal_test(model, p["init"], train_ds, data, p["features"], rankings, [4], recipe=p["recipe"], seed=0,
                          workdir=tmp_path, end_token=p["end"])
    hit, miss = out["flags the poison"]["4"], out["flags clean examples"]["4"]
    assert hit["poisons_removed"] == 4 and miss["poisons_removed"] == 0
    assert hit["with_trigger"] == 0.0 < before["with_trigger"]
    assert hit["ll_with_trigger"] < before["ll_with_trigger"] - 5      # the spam became far less likely
    assert miss["ll_with_trigger"] > hit["ll_with_trigger"] + 5        # removing clean examples leaves it likely
    assert miss["with_trigger"] > hit["with_trigger"]
    # the results are kept: a rerun reads them and trains nothing
    monkeypatch.setattr(llm, "retrain_without", lambda *a, **k: pytest.fail("retrained a stored removal"))
    again = bd.removal_test(model, p["init"], train_ds, data, p["features"], rankings, [4], recipe=p["recipe"],
                            seed=0, workdir=tmp_path, end_token=p["end"])
    assert again == out
    with pytest.raises(ValueError, match="shape"):
        bd.removal_test(model, p["init"], train_ds, data, p["features"], {"short": poison[:3]}, [4],
                        recipe=p["recipe"], seed=0, workdir=tmp_path)
