"""daunce.llm and daunce.experiments.textdata: response masking, the linear term through hidden states, the
frozen-bottom split, resumable Daunce runs on a causal LM, and the paper profile's data loaders."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import daunce
from daunce import llm
from daunce.experiments import textdata
from daunce.objectives import linear_term

EXAMPLES = [
    {"prompt": "What is 2+2?", "response": "It is 4."},
    {"prompt": "Name a colour, please.", "response": "Blue is a colour that many people like."},
    {"prompt": "Say hello in French.", "response": "Bonjour!"},
    {"prompt": "Count to three.", "response": "One, two, three."},
    {"prompt": "What is the capital of Italy?", "response": "Rome is the capital of Italy."},
    {"prompt": "Give a synonym of big.", "response": "Large."},
]


@pytest.fixture(scope="module")
def tiny():
    model, tok = llm.tiny_llama(seed=0, num_layers=2)
    return model, tok


def lora_model(model, seed=0, scale=0.05):
    """A LoRA model whose adapters are random and non-zero (so theta0 is a generic point)."""
    import copy

    pm = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return pm


def test_response_mask(tiny):
    model, tok = tiny
    enc = llm.encode(tok, EXAMPLES, 64)
    for i, ex in enumerate(EXAMPLES):
        lab = enc["labels"][i]
        resp = tok.decode(lab[lab != llm.IGNORE])
        assert resp.startswith(ex["response"])  # exactly the response (and its end-of-turn token)
        assert ex["prompt"] not in resp
        n_prompt = llm.prompt_length(tok, ex)
        assert (lab[:n_prompt] == llm.IGNORE).all() and (lab[n_prompt] != llm.IGNORE)
        assert (lab[enc["attention_mask"][i] == 0] == llm.IGNORE).all()  # padding carries no loss

    # prompt tokens carry no loss: the loss gradient w.r.t. the hidden states that predict prompt
    # tokens is exactly zero, and changing a prompt's labels does not change the loss
    pm = lora_model(model)
    task = llm.CausalLMTask()
    ds = llm.TextDataset(tok, EXAMPLES, 64)
    batch = default_collate([ds[i] for i in range(len(ds))])
    h = task.outputs(pm, batch).detach().requires_grad_(True)
    loss = task.loss(h, batch)
    (g,) = torch.autograd.grad(loss.sum(), h)
    predicts_loss = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_loss[:, :-1] = batch["labels"][:, 1:] != llm.IGNORE
    assert g[~predicts_loss].abs().max() == 0
    assert g[predicts_loss].abs().sum() > 0
    # and it equals transformers' own masked cross-entropy, example by example
    with torch.no_grad():
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i in range(len(ds)):
        ref = torch.nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=llm.IGNORE)
        assert torch.allclose(loss[i], ref, atol=1e-5)


def _flat_grad(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def test_linear_term_through_hidden_states_is_parameter_linear_term(tiny):
    """grad0^T (h(theta) - h0) == grad_l(theta0)^T (theta - theta0) + O(|Delta|^2), with equal gradients at theta0."""
    model, tok = tiny
    pm = lora_model(model).double()  # float64: the second-order check needs small steps
    task = llm.CausalLMTask()
    ds = llm.TextDataset(tok, EXAMPLES, 64)
    dn = daunce.Daunce(pm, task, daunce.DaunceConfig(n_models=2), progress=False, trainer="sequential")
    cache = dn.base_cache(ds)  # hidden states, dl/dhidden and loss at theta0, as Daunce caches them
    work = dn.context.model
    params = dn.context.params
    theta0 = [p.detach().clone() for p in params]
    batch = default_collate([ds[i] for i in range(len(ds))])

    # the exact parameter gradient of each example's loss at theta0
    grads = [_flat_grad(task.loss(task.outputs(work, batch), batch)[i], params) for i in range(len(ds))]
    # the gradient of the hidden-state linear term at theta0 equals it exactly
    for i in range(len(ds)):
        lin = linear_term(task.outputs(work, batch), cache["outputs"], cache["grad"])[i]
        assert torch.allclose(_flat_grad(lin, params), grads[i], rtol=1e-8, atol=1e-12)

    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    flat_dir = torch.cat([d.reshape(-1) for d in direction])
    errs = []
    for t in (1e-2, 5e-3, 2.5e-3):
        with torch.no_grad():
            for p, p0, d in zip(params, theta0, direction):
                p.copy_(p0 + t * d)
            lin = linear_term(task.outputs(work, batch), cache["outputs"], cache["grad"])
        param_form = torch.stack([gi @ (t * flat_dir) for gi in grads])
        errs.append((lin - param_form).abs().max().item())
        assert (lin - param_form).abs().max() < 0.2 * param_form.abs().max()
    # second order: halving Delta divides the difference by about 4
    assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0, errs


def test_split_model_matches_full_model(tiny):
    """Top layers fed the cached bottom features == the full model with LoRA on the top layer."""
    model, tok = tiny
    import copy

    full = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=0)
    top = llm.add_lora(llm.split_model(model, 1), r=4, alpha=8, seed=0)
    # the same random adapters on the last layer in both
    g = torch.Generator().manual_seed(5)
    top_params = {n: p for n, p in top.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in full.named_parameters():
            if not p.requires_grad:
                continue
            if ".layers.1." in n:
                v = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(v)
                top_params[n.replace(".layers.1.", ".layers.0.")].copy_(v)
            else:
                p.zero_()
    ds = llm.TextDataset(tok, EXAMPLES, 64)
    feats = llm.bottom_features(model, ds, 1)
    a = llm.response_nll(full, tok, ds)
    b = llm.response_nll(top, tok, ds.with_features(feats))
    assert torch.allclose(a, b, atol=1e-5)


def test_finetune_lowers_response_nll_and_is_seeded(tiny):
    model, tok = tiny
    import copy

    pm = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=0)
    init = llm.trainable_state(pm)
    before = llm.response_nll(pm, tok, EXAMPLES, max_length=64)
    llm.finetune(pm, tok, EXAMPLES, epochs=3, lr=1e-2, batch_size=2, seed=0, max_length=64, progress=False)
    after = llm.response_nll(pm, tok, EXAMPLES, max_length=64)
    assert after.mean() < before.mean() - 0.05
    s1 = llm.trainable_state(pm)
    llm.load_trainable_state(pm, init)
    llm.finetune(pm, tok, EXAMPLES, epochs=3, lr=1e-2, batch_size=2, seed=0, max_length=64, progress=False)
    assert all(torch.equal(s1[k], v) for k, v in llm.trainable_state(pm).items())
    ll = llm.response_log_likelihood(pm, tok, EXAMPLES, max_length=64)
    n_tok = llm.TextDataset(tok, EXAMPLES, 64).n_response_tokens.double()
    assert torch.allclose(-ll / n_tok, after * 0 + llm.response_nll(pm, tok, EXAMPLES, max_length=64))


def test_interrupted_run_resumes(tiny, tmp_path, monkeypatch):
    """Adapters and signals of finished copies survive a crash; the rerun trains only the rest and
    gives the same scores as an uninterrupted run."""
    model, tok = tiny
    pm = lora_model(model)
    task = llm.CausalLMTask()
    train = llm.TextDataset(tok, EXAMPLES[:4], 64)
    query = llm.TextDataset(tok, EXAMPLES[4:], 64)
    # damping and noise term explicit: the "auto" rule on LoRA weights has its own test (test_stopping)
    cfg = daunce.DaunceConfig(n_models=3, batch_size=2, lr=1e-2, rho=0.3, damping=1e-3, isotropic_noise=False)

    ref = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "ref", progress=False, trainer="sequential").fit(train, query)
    S_ref = ref.attribute(train, query)

    from daunce.engines import sequential

    real = sequential.train_copy

    def crash_on_copy_2(ctx, config, plan, *a, **k):
        if plan.k == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(ctx, config, plan, *a, **k)

    monkeypatch.setattr(sequential, "train_copy", crash_on_copy_2)
    with pytest.raises(KeyboardInterrupt):
        daunce.Daunce(pm, task, cfg, workdir=tmp_path / "run", progress=False, trainer="sequential").fit(train, query)
    monkeypatch.setattr(sequential, "train_copy", real)
    saved = sorted(p.name for p in (tmp_path / "run" / "copies").glob("copy_*.pt"))
    assert saved == ["copy_0000.pt", "copy_0001.pt"]
    rec = torch.load(tmp_path / "run" / "copies" / "copy_0001.pt", weights_only=True)
    n_lora = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert sum(s.numel() for s in rec["state"]) == n_lora  # the adapters
    assert len(rec["signals"]) == 2  # training and query signals

    again = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "run", progress=False, trainer="sequential")
    again.fit(train, query)
    assert again.trained_copies == [2]
    assert torch.allclose(again.attribute(train, query), S_ref, rtol=1e-4, atol=1e-9)


def test_instruction_following_responses_pass_and_violations_fail():
    exs = textdata.instruction_following(verify=True)  # every shipped response passes IFEval's checker
    assert len(exs) >= 300
    types = {e["instruction_id_list"][0] for e in exs}
    assert len(types) >= 10
    by_type = {}
    for e in exs:
        by_type.setdefault(e["instruction_id_list"][0], e)
    # a response that ignores the instruction fails it (the checkers are live, not rubber stamps)
    plain = "Hello, World. This is A plain answer, with commas"
    assert not textdata.check_instructions(by_type["change_case:english_lowercase"], plain)
    assert not textdata.check_instructions(by_type["punctuation:no_comma"], plain)
    assert not textdata.check_instructions(by_type["detectable_format:number_bullet_lists"], plain)
    train, query = textdata.split(exs, 50, 10, seed=0, group_key="topic")
    assert not ({e["topic"] for e in train} & {e["topic"] for e in query})


def test_split_by_topic_spreads_the_queries_over_held_out_topics():
    exs = [{"topic": f"t{t:02d}", "i": i} for t in range(32) for i in range(12)]
    train, query = textdata.split(exs, 40, 40, seed=1, group_key="topic", min_query_groups=16)
    q_topics = [e["topic"] for e in query]
    assert len(train) == len(query) == 40 and len(set(q_topics)) == 16
    assert sorted({q_topics.count(t) for t in set(q_topics)}) == [2, 3]   # dealt in turn: 40 = 8 x 3 + 8 x 2
    assert not {e["topic"] for e in train} & set(q_topics)
    train1, query1 = textdata.split(exs, 40, 40, seed=1, group_key="topic")   # no minimum: as few topics as hold 40
    assert len({e["topic"] for e in query1}) == 4 and not {e["topic"] for e in train1} & {e["topic"] for e in query1}
    assert len({e["topic"] for e in textdata.split(exs, 8, 3, group_key="topic", min_query_groups=16)[1]}) == 3
    with pytest.raises(ValueError, match="at least 32 groups .* only 32 groups"):
        textdata.split(exs, 8, 40, group_key="topic", min_query_groups=32)
    with pytest.raises(ValueError, match="example 2 has no 'topic' field"):
        textdata.split(exs[:2] + [{"i": 0}], 1, 1, group_key="topic")


def test_math_loaders_on_files(tmp_path):
    rec = [{"problem": "What is $1+1$?", "solution": "We add: $1+1=\\boxed{2}$.", "level": "Level 1",
            "type": "Algebra"},
           {"problem": "Simplify $\\frac{4}{8}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 2",
            "type": "Prealgebra"}]
    # the original release: <split>/<type>/<id>.json
    for i, r in enumerate(rec):
        p = tmp_path / "MATH" / "train" / r["type"].lower() / f"{i}.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(r))
    a = textdata.load_math(str(tmp_path / "MATH"))
    import pandas as pd

    pd.DataFrame(rec).to_parquet(tmp_path / "math.parquet")
    b = textdata.load_math(str(tmp_path / "math.parquet"))
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    c = textdata.load_math(str(tmp_path / "math.jsonl"))
    for out in (a, b, c):
        assert sorted(e["answer"] for e in out) == ["2", "\\frac{1}{2}"]
        assert {e["category"] for e in out} == {"Algebra", "Prealgebra"}
        assert all(e["prompt"].startswith(("What", "Simplify")) and "boxed" in e["response"] for e in out)


def test_ifeval_loader_on_files(tmp_path):
    rows = [{"key": 1000, "prompt": "Write a haiku about rain. Your entire response should be in English, "
                                    "and in all lowercase letters.",
             "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
            {"key": 1001, "prompt": "Describe a cat. Finish your response with this exact phrase Any other questions?",
             "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Any other questions?"}]},
            {"key": 1002, "prompt": "No response for this one.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}]}]
    import pandas as pd

    # parquet as the hub stores it: kwargs are dicts with every field, None where unused
    df = pd.DataFrame([dict(r, kwargs=[dict({"end_phrase": None, "num_words": None}, **k) for k in r["kwargs"]])
                       for r in rows])
    df.to_parquet(tmp_path / "ifeval.parquet")
    (tmp_path / "ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resp = [{"prompt": rows[0]["prompt"], "response": "soft rain on the roof"},
            {"prompt": rows[1]["prompt"], "response": "A cat purrs. Any other questions?"}]
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resp))
    for src in ("ifeval.jsonl", "ifeval.parquet"):
        exs = textdata.load_ifeval(str(tmp_path / src), responses=str(tmp_path / "responses.jsonl"))
        assert [e["key"] for e in exs] == [1000, 1001]
        assert exs[1]["kwargs"] == [{"end_phrase": "Any other questions?"}]
        assert all(textdata.check_instructions(e) for e in exs)
        assert not textdata.check_instructions(exs[1], "A cat purrs.")
    assert len(textdata.load_ifeval(str(tmp_path / "ifeval.jsonl"), require_response=False)) == 3


def test_baselines_shapes_and_signs(tiny):
    model, tok = tiny
    pm = lora_model(model)
    ds = llm.TextDataset(tok, EXAMPLES, 64)
    G = llm.per_example_gradients(pm, ds, proj_dim=16, seed=0)
    assert G.shape == (len(EXAMPLES), 16)
    S = llm.gradient_if_scores(G, G)
    assert S.shape == (6, 6) and (S.diagonal() > 0).all()  # an example helps itself
    E = llm.embedding_scores(EXAMPLES, EXAMPLES[:2])
    assert E.shape == (6, 2) and torch.allclose(E[[0, 1], [0, 1]], torch.ones(2), atol=1e-5)
    assert llm.top_k_removal(torch.tensor([[1.0], [3.0], [2.0]]), 2).tolist() == [1, 2]
    # full gradients: grad-dot is their inner product, grad-cos the same of the unit vectors
    Gf = llm.per_example_gradients(pm, ds, proj_dim=None)
    assert Gf.shape == (6, sum(p.numel() for p in pm.parameters() if p.requires_grad))
    dot, cos = llm.gradient_dot_scores(Gf, Gf[:2]), llm.gradient_cosine_scores(Gf, Gf[:2])
    norms = Gf.double().norm(dim=1)
    assert torch.allclose(dot.double(), Gf.double() @ Gf[:2].double().T, rtol=1e-6)
    assert torch.allclose(cos.double(), dot.double() / (norms[:, None] * norms[None, :2]), rtol=1e-5)
    assert torch.allclose(cos[[0, 1], [0, 1]], torch.ones(2), atol=1e-6)


def test_minilm_is_loaded_once_per_process(monkeypatch):
    """Every embedding call shares one cached MiniLM encoder: the weights are read from disk once."""
    import transformers

    loads = []
    real = transformers.AutoModel.from_pretrained

    def counting(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", counting)
    llm.minilm.cache_clear()
    first = llm.sentence_embeddings(["a first sentence", "and a second one"])
    llm.embedding_scores(EXAMPLES, EXAMPLES[:2])
    again = llm.sentence_embeddings(["a first sentence", "and a second one"])
    assert len(loads) == 1 and llm.minilm() is llm.minilm()
    assert first.shape == (2, 384) and torch.equal(first, again)
    assert torch.allclose(first.norm(dim=1), torch.ones(2), atol=1e-5)


def test_truncate_layers_keeps_the_first_layers(tiny):
    """A model cut to its first layer computes exactly that layer of the full model (then norm and head);
    in_place=False leaves the model whole, in_place=True cuts it."""
    import copy

    model, tok = tiny
    ds = llm.TextDataset(tok, EXAMPLES, 64)
    feats = llm.bottom_features(model, ds, 1)  # the output of the first layer, (N, T, h)
    cut = llm.truncate_layers(model, 1, in_place=False)
    assert len(model.model.layers) == 2 and len(cut.model.layers) == 1 and cut.config.num_hidden_layers == 1
    mask = ds.enc["attention_mask"].bool()
    with torch.no_grad():
        logits = cut(input_ids=ds.enc["input_ids"], attention_mask=ds.enc["attention_mask"]).logits
        ref = model.lm_head(model.model.norm(feats))
    assert torch.allclose(logits[mask], ref[mask], atol=1e-4)
    same = copy.deepcopy(model)
    assert llm.truncate_layers(same, 1) is same and len(same.model.layers) == 1
    with pytest.raises(ValueError, match="n_layers"):
        llm.truncate_layers(model, 3)


# ----------------------------------------------------------------- signals in mixed-adapter passes
def _lora_setting(tiny, setting):
    """(LoRA model with random non-zero adapters, train, query, every example) for the full model or
    for notebook 03's setting: LoRA on the top layer only, fed cached features of the layer below."""
    model, tok = tiny
    sets = [llm.TextDataset(tok, exs, 64) for exs in (EXAMPLES[:4], EXAMPLES[4:], EXAMPLES)]
    if setting == "full":
        return (lora_model(model), *sets)
    top = llm.add_lora(llm.split_model(model, 1), r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in top.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return (top, *[ds.with_features(llm.bottom_features(model, ds, 1)) for ds in sets])


@pytest.mark.parametrize("setting", ["full", "split"])
def test_multi_adapter_signals_equal_sequential(tiny, tmp_path, setting):
    """K = 4 copies evaluated together (peft mixed-adapter batches, blocks of 3 + 1) give the signals and
    scores of one pass per copy; the copies differ, so a row routed to the wrong adapter would show."""
    import shutil

    pm, train, query, every = _lora_setting(tiny, setting)
    task = llm.CausalLMTask()
    # large steps: copies far apart; explicit damping and noise term ("auto" would run proxy fine-tunes)
    cfg = daunce.DaunceConfig(n_models=4, batch_size=2, lr=0.1, rho=0.3, damping=1e-3, isotropic_noise=False)
    fitted = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "seq", progress=False, trainer="sequential").fit(train)
    shutil.copytree(tmp_path / "seq", tmp_path / "multi")
    seq = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "seq", progress=False, trainer="sequential",
                        signal_path="sequential")
    multi = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "multi", progress=False, trainer="sequential",
                          adapter_block=3, eval_batch_size=4, signal_path="multi-adapter")
    A, B = seq.signals(every), multi.signals(every)
    assert seq.signal_path_used == "sequential"
    assert multi.signal_path_used == "multi-adapter", multi.signal_path_reason
    assert "LoRA" in multi.signal_path_reason and multi.adapter_block_used == 3
    tol = 1e-5 * float(A.abs().max())
    assert float((A - B).abs().max()) <= tol
    # the copies' weights and signals differ by far more than the tolerance
    states = [fitted.state(k) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert max(float((a - b).abs().max()) for a, b in zip(states[i], states[j])) > 1e-3
            assert float((A[i] - A[j]).abs().max()) > 20 * tol, (i, j)
    # signals of copies routed in another order come back in that order
    from daunce.engines import multiadapter

    rev = multiadapter.MultiAdapterPass(multi.context).signals(states[::-1], every)
    assert float((rev - A.flip(0)).abs().max()) <= tol
    # scores: the query signals go through either path, the training signals were recorded by fit
    S_seq, S_multi = seq.attribute(train, query), multi.attribute(train, query)
    assert torch.allclose(S_multi, S_seq, rtol=1e-4, atol=1e-6 * float(S_seq.abs().max()))
    assert list(pm.peft_config) == ["default"]  # the model passed in has no extra adapters
    # the working model still trains and evaluates with its own adapter only
    work = multi.context.model
    assert [p for p in work.parameters() if p.requires_grad] == multi.context.params
    assert list(work.active_adapters) == ["default"]
    # "auto" on a CPU keeps one pass per copy (the multi-adapter pass measured no faster there) and says so
    auto = daunce.Daunce(pm, task, cfg, workdir=tmp_path / "seq", progress=False, trainer="sequential")
    shutil.rmtree(tmp_path / "seq" / "signals", ignore_errors=True)
    assert torch.allclose(auto.signals(every), A)
    assert auto.signal_path_used == "sequential" and "on a CPU" in auto.signal_path_reason


def test_multi_adapter_falls_back_without_lora(tiny):
    """Models whose trainable parameters are not (only) LoRA adapters keep the one-copy passes and say why;
    forcing the multi-adapter path on them is an error."""
    import copy

    model, tok = tiny
    train = llm.TextDataset(tok, EXAMPLES[:4], 64)
    query = llm.TextDataset(tok, EXAMPLES[4:], 64)
    # explicit settings: the test is about the signal path, and "auto" would resolve them with proxy fine-tunes
    cfg = daunce.DaunceConfig(n_models=2, batch_size=2, steps=1, lr=1e-2, rho=0.1, damping=1e-3, isotropic_noise=False)
    task = llm.CausalLMTask()

    plain = copy.deepcopy(model)
    plain.model.norm.weight.requires_grad_(True)  # no peft at all
    mixed = lora_model(model)
    mixed.base_model.model.model.norm.weight.requires_grad_(True)  # LoRA plus a non-LoRA parameter
    for m, why in ((plain, "not a peft PeftModel"), (mixed, "not a LoRA weight")):
        d = daunce.Daunce(m, task, cfg, progress=False, trainer="sequential").fit(train)
        S = d.signals(query)
        assert S.shape == (2, 2) and d.signal_path_used == "sequential"
        assert why in d.signal_path_reason, d.signal_path_reason
        forced = daunce.Daunce(m, task, cfg, progress=False, trainer="sequential", signal_path="multi-adapter")
        forced.store = d.store  # the copies d trained
        with pytest.raises(ValueError, match="signal_path='multi-adapter' cannot be used"):
            forced.signals(query)
    with pytest.raises(ValueError, match="signal_path"):
        daunce.Daunce(plain, task, cfg, signal_path="batched")
    with pytest.raises(ValueError, match="adapter_block"):
        daunce.Daunce(plain, task, cfg, adapter_block=0)
    with pytest.raises(ValueError, match="adapter_memory"):
        daunce.Daunce(plain, task, cfg, adapter_memory=-1)


def test_bottom_features_are_computed_once_per_example_and_match(tiny, tmp_path):
    """BottomFeatures: the same features as bottom_features on any list of examples (padding and order
    do not matter), each distinct example's bottom run once; a split-model backend fed them scores as
    the same adapters on the full model do."""
    import copy

    import numpy as np

    from daunce.blackbox import LocalLoRABackend

    model, tok = tiny
    feats = llm.BottomFeatures(model, tok, n_bottom=1, max_length=64)
    ds = feats(EXAMPLES)
    ref = llm.bottom_features(model, llm.TextDataset(tok, EXAMPLES, 64), 1)
    assert feats.computed == len(EXAMPLES) and torch.allclose(ds.enc["inputs_embeds"], ref, atol=1e-6)
    sub = [EXAMPLES[4], EXAMPLES[1]]  # another list (another padded length): nothing new to compute
    ds2 = feats(sub)
    ref2 = llm.bottom_features(model, llm.TextDataset(tok, sub, 64), 1)
    assert feats.computed == len(EXAMPLES) and torch.allclose(ds2.enc["inputs_embeds"], ref2, atol=1e-6)
    feats([{"prompt": "New one?", "response": "Yes."}])
    assert feats.computed == len(EXAMPLES) + 1
    # the black-box backend on the split model with these features == the full model with LoRA on the top layer
    lora = dict(r=4, alpha=8, targets=("q_proj", "v_proj"))
    split = LocalLoRABackend(llm.split_model(model, 1), tok, workdir=tmp_path / "split", lora=lora,
                             train=dict(epochs=2, lr=1e-2, batch_size=2, max_length=64), max_length=64, dataset=feats)
    mid = split.fine_tune(EXAMPLES[:4], seed=3)
    full = llm.add_lora(copy.deepcopy(model), seed=0, **lora)
    saved = torch.load(tmp_path / "split" / "adapters" / f"{mid}.pt")
    state = {k.replace(".layers.0.", ".layers.1."): v for k, v in saved.items()}
    llm.load_trainable_state(full, {k: state.get(k, torch.zeros_like(v)) for k, v in llm.trainable_state(full).items()})
    a = split.log_likelihoods(mid, EXAMPLES)
    b = llm.response_log_likelihood(full, tok, EXAMPLES, max_length=64).numpy()
    assert np.allclose(a, b, atol=1e-4) and np.allclose(split.log_likelihoods_many([mid], EXAMPLES)[0], a, atol=1e-4)
    assert "layers" in json.loads(split.identity())


def test_logra_through_dattri_runs_on_the_peft_model(tiny):
    """dattri's LoGra attributor on the LoRA adapters of a split peft model: it runs, leaves the model as it
    was, and agrees in sign with the exact damped gradient influence in the same adapter space."""
    import numpy as np

    model, tok = tiny
    ex = [{"prompt": f"What is {i} plus 3?", "response": f"{i} plus 3 is {i + 3}."} for i in range(12)]
    top = llm.add_lora(llm.split_model(model, 1), r=4, alpha=8, seed=0)
    with torch.no_grad():  # a trained-looking point (at a fresh adapter lora_B = 0)
        g = torch.Generator().manual_seed(1)
        for p in top.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    before = {k: v.clone() for k, v in llm.trainable_state(top).items()}
    feats = llm.BottomFeatures(model, tok, 1, 64)
    tr, q = feats(ex[:8]), feats(ex[8:])
    S = llm.logra_scores(top, tr, q, proj_dim=16, damping=1e-3, batch_size=4)
    assert S.shape == (8, 4) and torch.isfinite(S).all()
    assert all(torch.equal(v, llm.trainable_state(top)[k]) for k, v in before.items())
    ref = llm.gradient_if_scores(llm.per_example_gradients(top, tr, proj_dim=None),
                                 llm.per_example_gradients(top, q, proj_dim=None), damping=1e-3)
    assert np.corrcoef(S.flatten().numpy(), ref.flatten().numpy())[0, 1] > 0.3
    # a second call on another set: nothing of the first call is read back (dattri keeps metadata on disk)
    assert llm.logra_scores(top, feats(ex[:6]), q, proj_dim=16, damping=1e-3, batch_size=4).shape == (6, 4)
    # fresh adapters (lora_B = 0: every lora_A gradient is 0) run too, on the lora_B layers
    fresh = llm.add_lora(llm.split_model(model, 1), r=4, alpha=8, seed=0)
    assert torch.isfinite(llm.logra_scores(fresh, tr, q, proj_dim=16, batch_size=4)).all()
    with pytest.raises(ValueError, match="no LoRA"):
        llm.logra_scores(llm.split_model(model, 1), tr, q)


def test_removal_pieces_resume_and_remove_what_they_rank_first(tiny, tmp_path):
    """Notebook 03's removal test: theta0 per seed, a control that removes the highest-loss examples, random
    removal with a new draw per seed, retrains kept on disk (a rerun retrains nothing), and the
    (seeds x queries) table the two-level interval reads."""
    import copy

    from daunce.experiments import removal as rm
    from daunce.experiments.costs import CostLog

    model, tok = tiny
    pm = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=0)
    init = llm.trainable_state(pm)
    train, query = llm.TextDataset(tok, EXAMPLES, 64), llm.TextDataset(tok, EXAMPLES[:2], 64)
    data = {"s": dict(train=train, query=query)}
    recipe = dict(epochs=1, lr=1e-2, batch_size=2)
    costs = CostLog(tmp_path / "costs.json")
    states, qloss = rm.theta0_per_seed(pm, init, data["s"], recipe, [0, 1], work=tmp_path, costs=costs, name="s",
                                       batch=4)
    assert set(costs.get("theta0")) == {"s|0", "s|1"} and set(qloss) == {0, 1}
    llm.load_trainable_state(pm, states[0])
    loss = llm.response_nll(pm, None, train, 4)
    S = {"s": {"θ0 loss": rm.constant_scores(loss, len(query))}}
    assert S["s"]["θ0 loss"].shape == (len(train), 2)
    assert llm.top_k_removal(S["s"]["θ0 loss"], 2).tolist() == torch.argsort(loss, descending=True)[:2].tolist()
    kw = dict(path=tmp_path / "removal.json", batch=4)
    out = rm.run_removals(pm, init, data, S, ["θ0 loss", "random"], {"s": [2]}, [0, 1], recipe, {"s": qloss}, **kw)
    assert out.n_new == 4 and len(out) == 4
    assert out["s|random|2|0"]["removed"] != out["s|random|2|1"]["removed"]      # a new draw per seed
    assert out["s|θ0 loss|2|0"]["removed"] == out["s|θ0 loss|2|1"]["removed"]    # one ranking, several seeds
    table = out.table("s", "θ0 loss", 2, [0, 1])
    assert table.shape == (2, len(query)) and np.isfinite(table).all()
    again = rm.run_removals(pm, init, data, S, ["θ0 loss", "random"], {"s": [2]}, [0, 1], recipe, {"s": qloss}, **kw)
    assert again.n_new == 0
    assert np.array_equal(again.table("s", "random", 2, [0, 1]), out.table("s", "random", 2, [0, 1]))
    # each retraining seed removes by its own attribution draw ({seed: scores}): seed 0's set is the one retrained
    # above (kept), seed 1's is its own scores' top k (here the lowest-loss examples), retrained anew
    own = {"s": {"θ0 loss": {0: S["s"]["θ0 loss"], 1: -S["s"]["θ0 loss"]}}}
    per = rm.run_removals(pm, init, data, own, ["θ0 loss"], {"s": [2]}, [0, 1], recipe, {"s": qloss}, **kw)
    assert per.n_new == 1 and per["s|θ0 loss|2|0"]["removed"] == out["s|θ0 loss|2|0"]["removed"]
    assert per["s|θ0 loss|2|1"]["removed"] == torch.argsort(loss)[:2].tolist()


def test_copy_settings_give_heavy_ball_copies_that_pass_their_stopping_test(tiny, tmp_path):
    """Notebook 03's copies: the damping at d_lambda = K and the heavy-ball step from a short Lanczos run at theta0
    make full-batch LoRA copies reach the optimum of their perturbed objectives (the stopping test)."""
    import copy

    from daunce.experiments import removal as rm
    from daunce.experiments.costs import CostLog

    model, tok = tiny
    pm = llm.add_lora(copy.deepcopy(model), r=4, alpha=8, seed=0)
    train = llm.TextDataset(tok, EXAMPLES, 64)
    llm.finetune(pm, None, train, epochs=8, lr=2e-2, batch_size=3, seed=0, progress=False)   # theta0 near a minimum
    base = dict(variant="if", subset_ratio=0.5, rho=0.3, isotropic_noise=False, optimizer="sgd", tol=0.05,
                max_steps=300)
    K = 4
    st = rm.copy_settings(pm, llm.CausalLMTask(), train, base, K, work=tmp_path / "curv.json",
                          costs=CostLog(tmp_path / "costs.json"), name="s", batch=4)
    assert st["damping"] > 0 and 0 < st["momentum"] < 1 and st["lr"] > 0
    assert abs(st["d_lambda"] - K) < 1e-3 * K
    assert rm.copy_settings(pm, None, None, base, K, work=tmp_path / "curv.json", costs=None, name="s", batch=4) == st
    assert not st["at_floor"]
    # more copies than the curvature has directions (d_lambda < K at every damping): the damping stays at the
    # smallest curvature the heavy-ball step resolves instead of going to zero
    many = rm.copy_settings(pm, llm.CausalLMTask(), train, dict(base, variant="efim"), 10**6, work=tmp_path / "e.json",
                            costs=CostLog(tmp_path / "costs.json"), name="e", batch=4)
    floor = daunce.auto.MIN_CURVATURE_RATIO * daunce.auto.CURVATURE_SAFETY
    assert many["at_floor"] and many["damping"] == pytest.approx(floor * many["top_curvature"], rel=1e-6)
    cfg = daunce.DaunceConfig(n_models=K, damping=st["damping"], lr=st["lr"], momentum=st["momentum"], **base)
    dn = daunce.Daunce(pm, llm.CausalLMTask(), cfg, eval_batch_size=4, progress=False).fit(train)
    assert dn.n_unconverged == 0 and max(dn.copy_steps.values()) < 300
    # notebook 03's tuning candidates: the damping a multiple of the floor, the heavy-ball step set for it, the
    # copies kept (a second call trains none and returns the same scores)
    d = dict(train=train, query=llm.TextDataset(tok, EXAMPLES[:2], 64))
    S4, rec = rm.daunce_scores(pm, llm.CausalLMTask(), d, base, K, st, workdir=tmp_path / "x4", batch=4,
                               damping_factor=4)
    assert rec["damping"] == pytest.approx(4 * st["damping"]) and rec["copies_trained"] == K
    assert (rec["lr"], rec["momentum"]) == daunce.auto.heavy_ball(st["top_curvature"], 4 * st["damping"])
    assert S4.shape == (len(train), 2) and len(rec["steps"]) == len(rec["converged"]) == K
    S4b, again = rm.daunce_scores(pm, llm.CausalLMTask(), d, base, K, st, workdir=tmp_path / "x4", batch=4,
                                  damping_factor=4)
    assert again["copies_trained"] == 0 and torch.allclose(S4, S4b)
    assert rec["eligible"] and rec["stopped_at"] is None
    # grown in stages with the stop on: the same copies and scores as the set trained at once
    S4c, staged = rm.daunce_scores(pm, llm.CausalLMTask(), d, base, K, st, workdir=tmp_path / "x4s", batch=4,
                                   damping_factor=4, stop_unconverged=True)
    assert staged["copies_trained"] == K and staged["steps"] == rec["steps"] and torch.allclose(S4, S4c)
    # copies that cannot pass their test (2 steps): the set stops at its first stage, untrained copies left out
    capped = dict(base, max_steps=2)
    S, cut = rm.daunce_scores(pm, llm.CausalLMTask(), d, capped, K, st, workdir=tmp_path / "cap", batch=4,
                              damping_factor=4, stop_unconverged=True)
    assert S is None and cut["stopped_at"] == 2 and cut["copies_trained"] == 2 and not cut["eligible"]
    assert cut["converged"] == [False, False]
    S, full = rm.daunce_scores(pm, llm.CausalLMTask(), d, capped, K, st, workdir=tmp_path / "cap", batch=4,
                               damping_factor=4)   # without the stop: every copy, and not eligible
    assert S is not None and full["copies_trained"] == K - 2 and not full["eligible"] and full["stopped_at"] is None
    # a set whose only stage is K is scored, eligible or not (its copies are all trained)
    S, last = rm.daunce_scores(pm, llm.CausalLMTask(), d, capped, 2, st, workdir=tmp_path / "cap2", batch=4,
                               damping_factor=4, stop_unconverged=True)
    assert S is not None and last["stopped_at"] is None and not last["eligible"] and last["copies_trained"] == 2
