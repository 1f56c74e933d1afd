"""The OpenAI backend, for real over HTTP against an OpenAI-compatible server started by the tests."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer, tokenize  # noqa: E402

from daunce.blackbox import BlackBoxDaunce  # noqa: E402
from daunce.blackbox.openai import FineTuneFailed, OpenAIBackend, response_log_likelihood_from_echo  # noqa: E402

KEY = "sk-test-secret-0123456789abcdef"


def backend_for(server, **kw):
    kw.setdefault("poll_interval", 0.001)
    kw.setdefault("max_poll_interval", 0.005)
    kw.setdefault("max_retries", 4)
    kw.setdefault("timeout", 10.0)
    return OpenAIBackend("davinci-002", api_key=KEY, base_url=server.base_url, **kw)


def planted_set(n=24, n_planted=3, seed=0):
    """Clean examples of random words; ``n_planted`` share a rare phrase -> fixed response."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    train = []
    for _ in range(n):
        p = " ".join(rng.choice(words, 5))
        r = " ".join(rng.choice(words, 5))
        train.append({"prompt": f"say {p}", "response": r})
    planted = list(rng.choice(n, n_planted, replace=False))
    for i in planted:
        train[i] = {"prompt": train[i]["prompt"] + " zq zx", "response": "alpha beta gamma delta"}
    query = [{"prompt": "say something zq zx", "response": "alpha beta gamma delta"}]
    return train, query, sorted(int(i) for i in planted)


def test_echo_rule_sums_only_the_continuation():
    context, cont = "Q: hi\n\n###\n\n", " there you go\n"
    toks, offs = tokenize(context + cont)
    lps = [None] + [-(i + 1.0) for i in range(len(toks) - 1)]
    got = response_log_likelihood_from_echo(context, toks, lps, offs)
    want = sum(lp for lp, o in zip(lps, offs) if o >= len(context))
    assert got == pytest.approx(want) and got < 0
    # a token that straddles the boundary belongs to the context (lm-eval)
    assert response_log_likelihood_from_echo("ab", ["a", "bc", "d"], [None, -1.0, -2.0], [0, 1, 3]) == -2.0
    with pytest.raises(ValueError):
        response_log_likelihood_from_echo("abcd", ["ab", "cd"], [None, -1.0], [0, 2])


def test_blackbox_over_http_finds_planted_examples_and_resumes_without_refitting(tmp_path):
    train, query, planted = planted_set()
    with FakeOpenAIServer(api_key=KEY) as server:
        d = BlackBoxDaunce(backend_for(server), n_models=12, subset_ratio=0.5, workdir=tmp_path, progress=False)
        S = d.fit(train, query).attribute(train, query)[:, 0]
        assert S.shape == (len(train),)
        top = sorted(np.argsort(-S.numpy())[: len(planted)].tolist())
        assert top == planted, (top, planted, S)
        assert (S[planted] > 0).all()  # helpful = positive
        assert server.counts["POST /v1/fine_tuning/jobs"] == 12
        assert server.counts["POST /v1/files"] == 12
        # every file uploaded was the right subset, in the legacy prompt/completion format
        lines = server.files["file-0"]
        assert set(lines[0]) == {"prompt", "completion"} and lines[0]["prompt"].endswith("\n\n###\n\n")
        assert len(lines) == len(d.subset(0, len(train)))
        before = dict(server.counts)
        # a second run on the same work folder: no upload, no job, no scoring request
        d2 = BlackBoxDaunce(backend_for(server), n_models=12, subset_ratio=0.5, workdir=tmp_path, progress=False)
        S2 = d2.fit(train, query).attribute(train, query)[:, 0]
        assert dict(server.counts) == before
        assert d2.fine_tunes_started == 0
        assert np.allclose(S2.numpy(), S.numpy())
        # growing K pays only for the new fine-tunes
        d3 = BlackBoxDaunce(backend_for(server), n_models=14, subset_ratio=0.5, workdir=tmp_path, progress=False)
        d3.fit(train, query)
        assert server.counts["POST /v1/fine_tuning/jobs"] == 14 and d3.fine_tunes_started == 2


def test_interrupted_while_a_job_runs_resumes_polling_that_job(tmp_path):
    train, query, _ = planted_set(n=10, n_planted=1)

    class Interrupt(Exception):
        pass

    with FakeOpenAIServer(api_key=KEY) as server:
        b = backend_for(server)
        wait = b.wait_fine_tune
        b.wait_fine_tune = lambda job_id: (_ for _ in ()).throw(Interrupt())  # crash while jobs run
        d = BlackBoxDaunce(b, n_models=3, workdir=tmp_path, progress=False)
        with pytest.raises(Interrupt):
            d.fit(train, query)
        recs = [json.loads((tmp_path / "copies" / f"copy_{k:04d}.json").read_text()) for k in range(3)]
        assert all(r["job_id"].startswith("ftjob-") and r.get("model_id") is None for r in recs)
        assert server.counts["POST /v1/fine_tuning/jobs"] == 3
        b.wait_fine_tune = wait
        d2 = BlackBoxDaunce(backend_for(server), n_models=3, workdir=tmp_path, progress=False)
        d2.fit(train, query)
        assert server.counts["POST /v1/fine_tuning/jobs"] == 3  # no job created twice
        assert d2.fine_tunes_started == 0
        assert {server.jobs[r["job_id"]]["status"] for r in recs} == {"succeeded"}
        assert d2.signals(train).shape == (3, len(train))


def test_retries_on_429_and_5xx_and_gives_up_eventually(tmp_path):
    train, query, _ = planted_set(n=8, n_planted=1)
    with FakeOpenAIServer(api_key=KEY) as server:
        server.inject("/v1/files", 429, times=2)
        server.inject("/v1/fine_tuning/jobs/", 503, times=1)
        server.inject("/v1/completions", 500, times=1)
        b = backend_for(server)
        model = b.fine_tune(train, seed=1)
        ll = b.log_likelihoods(model, train)
        assert ll.shape == (8,) and np.all(ll < 0)
        assert server.counts["POST /v1/files"] == 3  # two 429s, then success
        assert server.counts["POST /v1/completions"] == 2
        server.inject("/v1/completions", 500, times=100)
        b1 = backend_for(server, max_retries=1)
        n0 = server.counts["POST /v1/completions"]
        with pytest.raises(openai.InternalServerError):
            b1.log_likelihoods(model, train[:2])
        assert server.counts["POST /v1/completions"] - n0 == 2  # one try + one retry


def test_failed_job_raises_and_is_not_recorded_as_a_model(tmp_path):
    train, query, _ = planted_set(n=8, n_planted=1)
    with FakeOpenAIServer(api_key=KEY, fail_seeds={7}) as server:
        b = backend_for(server)
        with pytest.raises(FineTuneFailed) as e:
            b.fine_tune(train, seed=7)
        assert e.value.status == "failed" and "training failed" in str(e.value)
        # a wrong key is refused (401), not retried forever
        bad = OpenAIBackend("davinci-002", api_key="sk-wrong", base_url=server.base_url, max_retries=3)
        with pytest.raises(openai.AuthenticationError):
            bad.fine_tune(train, seed=1)


def test_fine_tuned_model_scores_its_training_text_higher():
    train, _, _ = planted_set(n=12, n_planted=1)
    with FakeOpenAIServer(api_key=KEY) as server:
        b = backend_for(server)
        m = b.fine_tune(train[:6], seed=0)
        gain = b.log_likelihoods(m, train) - b.log_likelihoods("base", train)
        assert gain[:6].min() > gain[6:].max()  # memorised the examples it was trained on


def test_api_key_never_in_repr_logs_or_files(tmp_path, caplog, capsys):
    train, query, _ = planted_set(n=8, n_planted=1)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(api_key=KEY) as server:
        server.inject("/v1/completions", 429, times=1)
        b = backend_for(server)
        d = BlackBoxDaunce(b, n_models=2, workdir=tmp_path, progress=True)
        d.fit(train, query)
        text = repr(b) + repr(d) + str(b.identity()) + caplog.text
        out = capsys.readouterr()
        text += out.out + out.err
        for f in tmp_path.rglob("*"):
            if f.is_file():
                text += f.read_text()
        assert "davinci-002" in text  # the check looks at real content
        assert KEY not in text and KEY[-12:] not in text
