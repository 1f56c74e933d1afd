"""The black-box backend protocol over OpenAI's API (or any OpenAI-compatible server), with the official SDK.

* ``start_fine_tune`` writes the examples as JSONL, uploads it (``files.create``, purpose
  ``"fine-tune"``) and creates a fine-tuning job (``fine_tuning.jobs.create`` with ``seed`` and the
  supervised method's hyperparameters); it returns the job id at once, so ``BlackBoxDaunce`` can store
  it before anything else can go wrong.
* ``wait_fine_tune`` polls the job (``fine_tuning.jobs.retrieve``) with a growing interval until it
  succeeds (returns ``fine_tuned_model``) or fails / is cancelled (raises ``FineTuneFailed``).
* ``log_likelihoods`` reads the log-likelihood of given text with the legacy completions endpoint:
  ``prompt = context + continuation``, ``echo=True``, ``logprobs=1``, ``max_tokens=0``. The server
  returns every prompt token's log-probability and its character offset; the response's
  log-likelihood is the sum over the tokens that start at or after ``len(context)`` (lm-eval's
  convention for ``loglikelihood`` requests).

Which models can do this: the fine-tunable *completion* models (``babbage-002``, ``davinci-002``) and
their fine-tunes, and self-hosted OpenAI-compatible servers (vLLM, llama.cpp's server, ...) that
implement ``echo`` with ``logprobs``. Chat models (``gpt-4o-mini``, ``gpt-3.5-turbo``, ...) can be
fine-tuned (``data_format="chat"`` writes ``{"messages": [...]}`` lines) but cannot be scored: the
chat completions endpoint returns log-probabilities only of tokens the model *generates*, never of
given text (no ``echo``), so the log-likelihood of a fixed response is not available from it. With
``data_format="chat"`` ``log_likelihoods`` still calls the completions endpoint, which only a
self-hosted server serving the fine-tuned chat model will answer.

Reliability: the SDK client retries rate limits (429), server errors (5xx), timeouts and dropped
connections with exponential backoff honouring ``Retry-After`` (``max_retries``); every request has a
``timeout``. The API key is handed to the SDK client only: it is never stored on this object, never in
its ``repr``, never written to the work folder or logged.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


class FineTuneFailed(RuntimeError):
    """A fine-tuning job ended as ``failed`` or ``cancelled`` (or did not finish in time)."""

    def __init__(self, job_id: str, status: str, message: str = ""):
        super().__init__(f"fine-tuning job {job_id} {status}" + (f": {message}" if message else ""))
        self.job_id, self.status, self.message = job_id, status, message


def response_log_likelihood_from_echo(context: str, tokens: Sequence[str], token_logprobs: Sequence,
                                      text_offset: Sequence[int], count_only: bool = False) -> float:
    """lm-eval's rule: sum the log-probabilities of the tokens that start at or after ``len(context)``
    (``count_only``: their number, the response's length in tokens).

    ``tokens``, ``token_logprobs``, ``text_offset`` are the completions endpoint's echoed ``logprobs``
    (the first token's log-probability is ``None``: it has no left context). A token that straddles the
    boundary (starts inside the context) counts as context, as in lm-eval.
    """
    if not (len(tokens) == len(token_logprobs) == len(text_offset)):
        raise ValueError("echoed logprobs have mismatched lengths")
    start = 0
    while start < len(text_offset) and text_offset[start] < len(context):
        start += 1
    if start == len(text_offset):
        raise ValueError("no echoed token starts after the context: the continuation is empty or the server "
                         "did not echo the prompt")
    vals = token_logprobs[start:]
    if count_only:
        return float(len(vals))
    if any(v is None for v in vals):
        raise ValueError("the server returned no log-probability for a continuation token")
    return float(sum(vals))


class OpenAIBackend:
    """Fine-tune and score through the OpenAI API (``Backend`` protocol of ``daunce.blackbox``).

    Args:
        base_model: the model to fine-tune (``"davinci-002"``, ``"babbage-002"``, or a chat model with
            ``data_format="chat"``, or whatever a self-hosted server offers).
        client: an ``openai.OpenAI`` client to use; otherwise one is built from ``api_key`` (default: the
            ``OPENAI_API_KEY`` environment variable, read by the SDK), ``base_url``, ``timeout``, ``max_retries``.
        hyperparameters: the supervised method's hyperparameters, e.g. ``{"n_epochs": 3,
            "batch_size": 8, "learning_rate_multiplier": 2}``; ``None`` leaves the server's "auto".
        data_format: ``"completion"`` writes ``{"prompt", "completion"}`` lines (completion models),
            ``"chat"`` writes ``{"messages": [user, assistant]}`` lines.
        prompt_suffix, completion_prefix, completion_suffix: how an example becomes text. The context is
            ``prompt + prompt_suffix``, the continuation ``completion_prefix + response + completion_suffix``
            (OpenAI's recommendations for the legacy format: a fixed separator after the prompt, a
            leading space and a stop sequence in the completion). Scoring uses the same rendering.
        suffix: the fine-tuned model's name suffix.
        poll_interval, max_poll_interval, backoff: polling starts every ``poll_interval`` seconds and grows
            by ``backoff`` per poll up to ``max_poll_interval``. job_timeout: give up waiting (seconds).
        score_batch_size: prompts per completions request.
    """

    def __init__(self, base_model: str = "davinci-002", *, client=None, api_key: Optional[str] = None,
                 base_url: Optional[str] = None, timeout: float = 120.0, max_retries: int = 6,
                 hyperparameters: Optional[dict] = None, data_format: str = "completion",
                 prompt_suffix: str = "\n\n###\n\n", completion_prefix: str = " ", completion_suffix: str = "\n",
                 suffix: Optional[str] = "daunce", poll_interval: float = 10.0, max_poll_interval: float = 120.0,
                 backoff: float = 1.5, job_timeout: Optional[float] = None, score_batch_size: int = 20):
        if data_format not in ("completion", "chat"):
            raise ValueError(f"data_format must be 'completion' or 'chat', got {data_format!r}")
        if client is None:
            import openai

            client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.client = client
        self.base_model = base_model
        self.hyperparameters = dict(hyperparameters) if hyperparameters else None
        self.data_format = data_format
        self.prompt_suffix, self.completion_prefix = prompt_suffix, completion_prefix
        self.completion_suffix = completion_suffix
        self.suffix = suffix
        self.poll_interval, self.max_poll_interval, self.backoff = poll_interval, max_poll_interval, backoff
        self.job_timeout = job_timeout
        self.score_batch_size = score_batch_size
        self.requests = {"files.create": 0, "jobs.create": 0, "jobs.retrieve": 0, "completions.create": 0}

    def __repr__(self):  # never the key (nor the client, which holds it)
        return (f"OpenAIBackend(base_model={self.base_model!r}, base_url={str(self.client.base_url)!r}, "
                f"data_format={self.data_format!r}, hyperparameters={self.hyperparameters})")

    def identity(self) -> str:
        """What decides a fine-tune besides its data and seed (stored in the work folder's manifest)."""
        return json.dumps({"openai": self.base_model, "base_url": str(self.client.base_url),
                           "hyperparameters": self.hyperparameters, "format": self.data_format,
                           "render": [self.prompt_suffix, self.completion_prefix, self.completion_suffix]},
                          sort_keys=True)

    # ----------------------------------------------------------------------------- rendering
    def render(self, example: dict) -> tuple[str, str]:
        """``(context, continuation)`` of an example: the text a fine-tune learns and scoring reads."""
        return (example["prompt"] + self.prompt_suffix,
                self.completion_prefix + example["response"] + self.completion_suffix)

    def jsonl(self, examples: Sequence[dict]) -> bytes:
        """The fine-tuning file: one JSON object per line."""
        lines = []
        for ex in examples:
            if self.data_format == "chat":
                obj = {"messages": [{"role": "user", "content": ex["prompt"]},
                                    {"role": "assistant", "content": ex["response"]}]}
            else:
                context, continuation = self.render(ex)
                obj = {"prompt": context, "completion": continuation}
            lines.append(json.dumps(obj, ensure_ascii=False))
        return ("\n".join(lines) + "\n").encode()

    # ---------------------------------------------------------------------------- fine-tuning
    def start_fine_tune(self, examples: Sequence[dict], seed: int) -> str:
        """Upload the examples and create the job; returns the job id (the job runs on the server)."""
        self.requests["files.create"] += 1
        f = self.client.files.create(file=("train.jsonl", io.BytesIO(self.jsonl(examples))), purpose="fine-tune")
        kw = {}
        if self.hyperparameters:
            kw["method"] = {"type": "supervised", "supervised": {"hyperparameters": self.hyperparameters}}
        if self.suffix:
            kw["suffix"] = self.suffix
        self.requests["jobs.create"] += 1
        job = self.client.fine_tuning.jobs.create(model=self.base_model, training_file=f.id, seed=int(seed), **kw)
        log.info("fine-tuning job %s created (%d examples, seed %d)", job.id, len(examples), seed)
        return job.id

    def wait_fine_tune(self, job_id: str) -> str:
        """Poll the job until it ends; return the fine-tuned model's id or raise ``FineTuneFailed``."""
        t0 = time.monotonic()
        interval = self.poll_interval
        while True:
            self.requests["jobs.retrieve"] += 1
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            if job.status == "succeeded":
                if not job.fine_tuned_model:
                    raise FineTuneFailed(job_id, "succeeded", "the job has no fine_tuned_model")
                return job.fine_tuned_model
            if job.status in ("failed", "cancelled"):
                err = getattr(job, "error", None)
                msg = getattr(err, "message", None) or ""
                raise FineTuneFailed(job_id, job.status, msg)
            if self.job_timeout is not None and time.monotonic() - t0 > self.job_timeout:
                raise FineTuneFailed(job_id, "timed out", f"still {job.status} after {self.job_timeout:.0f} s")
            log.debug("job %s is %s; next poll in %.1f s", job_id, job.status, interval)
            time.sleep(interval)
            interval = min(self.max_poll_interval, interval * self.backoff)

    def fine_tune(self, examples: Sequence[dict], seed: int) -> str:
        return self.wait_fine_tune(self.start_fine_tune(examples, seed))

    # -------------------------------------------------------------------------------- scoring
    def log_likelihoods(self, model_id: str, examples: Sequence[dict]) -> np.ndarray:
        """``(n,)`` summed log-probability of each response given its prompt, under ``model_id``."""
        return self._echo(model_id, examples, count_only=False)

    def response_lengths(self, examples: Sequence[dict]) -> np.ndarray:
        """``(n,)`` tokens of each response (the tokens ``log_likelihoods`` sums over), read from the base model's
        echoed prompt: the tokenizer, not the fine-tune, decides them."""
        return self._echo(self.base_model, examples, count_only=True)

    def _echo(self, model_id: str, examples: Sequence[dict], count_only: bool) -> np.ndarray:
        out = np.empty(len(examples), dtype=np.float64)
        for s in range(0, len(examples), self.score_batch_size):
            chunk = examples[s : s + self.score_batch_size]
            rendered = [self.render(ex) for ex in chunk]
            self.requests["completions.create"] += 1
            resp = self.client.completions.create(model=model_id, prompt=[c + r for c, r in rendered], echo=True,
                                                  logprobs=1, max_tokens=0, temperature=0.0)
            choices = sorted(resp.choices, key=lambda ch: ch.index)
            if len(choices) != len(chunk):
                raise ValueError(f"the server answered {len(choices)} choices for {len(chunk)} prompts")
            for j, (ch, (context, _)) in enumerate(zip(choices, rendered)):
                lp = ch.logprobs
                if lp is None or lp.tokens is None:
                    raise ValueError("the completions endpoint returned no echoed logprobs: this model/server "
                                     "cannot score given text (chat-only models cannot)")
                out[s + j] = response_log_likelihood_from_echo(context, lp.tokens, lp.token_logprobs, lp.text_offset,
                                                               count_only)
        return out
