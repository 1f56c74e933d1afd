"""An OpenAI-compatible HTTP server for the tests (stdlib ``http.server`` in a thread, on 127.0.0.1).

Endpoints, as the official SDK calls them:

* ``POST /v1/files`` (multipart upload, purpose ``fine-tune``) -> a file object;
* ``POST /v1/fine_tuning/jobs`` -> a job in ``validating_files``; ``GET /v1/fine_tuning/jobs/{id}``
  moves it one step per poll: ``validating_files -> queued -> running -> succeeded`` (the training
  happens on the step to ``succeeded``) or ``failed`` for a job whose seed is in ``fail_seeds``;
* ``POST /v1/completions`` with ``echo=True, logprobs, max_tokens=0`` -> the prompt's tokens, their
  log-probabilities (the first is ``null``) and character offsets.

The "model" behind it is pluggable: ``trainer(examples, seed) -> model_id`` and
``scorer(model_id, text) -> (tokens, token_logprobs, text_offset)``. The default is ``BigramModels``,
a small deterministic fake: a fine-tune is the bigram counts of its training text, and a token's
log-probability grows with how often the bigram occurred in training; it memorises its training set,
which is what the attribution needs, and it runs in microseconds.

Faults: ``inject(path_prefix, status, times)`` answers the next ``times`` matching requests with that
status (429 carries ``retry-after-ms``), to test the client's retries. ``counts`` records every request
by ``"METHOD /route"``. Requests without the expected bearer key get 401.
"""

from __future__ import annotations

import email.parser
import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = re.compile(r"\s*\S+|\s+$")


def tokenize(text: str):
    """GPT-style pieces: each token carries its leading whitespace. Returns (tokens, offsets)."""
    toks, offs = [], []
    for m in TOKEN.finditer(text):
        toks.append(m.group())
        offs.append(m.start())
    return toks, offs


class BigramModels:
    """Fake fine-tuning: model = bigram counts of the training texts; p(t | s) = (1 + a c(s,t)) / (V + a c(s))."""

    def __init__(self, vocab: int = 5000, strength: float = 20.0):
        self.V, self.a = vocab, strength
        self.models = {"base": (Counter(), Counter())}

    def train(self, examples, seed):
        pair, single = Counter(), Counter()
        for ex in examples:
            toks, _ = tokenize(ex["prompt"] + ex["completion"])
            toks = [t.strip().lower() for t in toks]
            for s, t in zip(toks, toks[1:]):
                pair[(s, t)] += 1
                single[s] += 1
        model_id = f"ft:fake-bigram:{len(self.models)}:{seed}"
        self.models[model_id] = (pair, single)
        return model_id

    def score(self, model_id, text):
        if not model_id.startswith("ft:"):  # a base model's name (e.g. davinci-002): the untrained bigrams
            model_id = "base"
        pair, single = self.models[model_id]
        toks, offs = tokenize(text)
        words = [t.strip().lower() for t in toks]
        lps = [None] + [math.log((1 + self.a * pair[(s, t)]) / (self.V + self.a * single[s]))
                        for s, t in zip(words, words[1:])]
        return toks, lps, offs


class FakeOpenAIServer:
    STEPS = ("validating_files", "queued", "running")

    def __init__(self, *, api_key: str = "sk-test-secret", trainer=None, scorer=None, fail_seeds=()):
        if trainer is None or scorer is None:
            fake = BigramModels()
            trainer, scorer = fake.train, fake.score
        self.api_key = api_key
        self.trainer, self.scorer = trainer, scorer
        self.fail_seeds = set(fail_seeds)
        self.files: dict[str, list] = {}
        self.jobs: dict[str, dict] = {}
        self.counts: Counter = Counter()
        self.faults: list = []  # [path_prefix, status, remaining]
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, path_prefix: str, status: int, times: int = 1):
        self.faults.append([path_prefix, status, times])

    # ------------------------------------------------------------------------------- routes
    def _fault(self, path):
        with self.lock:
            for f in self.faults:
                if path.startswith(f[0]) and f[2] > 0:
                    f[2] -= 1
                    return f[1]
        return None

    def _job_view(self, job):
        keys = ("id", "object", "model", "status", "fine_tuned_model", "training_file", "seed", "created_at",
                "finished_at", "error", "hyperparameters", "result_files", "organization_id", "trained_tokens",
                "validation_file", "method")
        return {k: job.get(k) for k in keys}

    def create_file(self, headers, body):
        msg = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        fields = {}
        for part in msg.get_payload():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True)
        if fields.get("purpose", b"").decode() != "fine-tune":
            return 400, {"error": {"message": "purpose must be fine-tune"}}
        lines = [json.loads(line) for line in fields["file"].decode().splitlines() if line.strip()]
        fid = f"file-{len(self.files)}"
        self.files[fid] = lines
        return 200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": int(time.time()),
                     "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"}

    def create_job(self, req):
        if req.get("training_file") not in self.files:
            return 400, {"error": {"message": "unknown training_file"}}
        jid = f"ftjob-{len(self.jobs)}"
        self.jobs[jid] = {"id": jid, "object": "fine_tuning.job", "model": req["model"], "status": self.STEPS[0],
                          "fine_tuned_model": None, "training_file": req["training_file"], "seed": req.get("seed", 0),
                          "created_at": int(time.time()), "finished_at": None, "error": None,
                          "hyperparameters": None, "result_files": [], "organization_id": "org-test",
                          "trained_tokens": None, "validation_file": None, "method": req.get("method"), "_step": 0}
        return 200, self._job_view(self.jobs[jid])

    def retrieve_job(self, jid):
        job = self.jobs.get(jid)
        if job is None:
            return 404, {"error": {"message": f"no job {jid}"}}
        with self.lock:
            if job["status"] in self.STEPS:
                job["_step"] += 1
                if job["_step"] < len(self.STEPS):
                    job["status"] = self.STEPS[job["_step"]]
                elif job["seed"] in self.fail_seeds:
                    job["status"] = "failed"
                    job["error"] = {"code": "invalid_training_file", "message": "training failed", "param": None}
                else:
                    job["fine_tuned_model"] = self.trainer(self.files[job["training_file"]], job["seed"])
                    job["status"] = "succeeded"
                    job["finished_at"] = int(time.time())
        return 200, self._job_view(job)

    def completions(self, req):
        if not req.get("echo") or req.get("max_tokens") != 0 or req.get("logprobs") is None:
            return 400, {"error": {"message": "this server only scores text: echo=True, max_tokens=0, logprobs"}}
        prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
        choices = []
        for i, text in enumerate(prompts):
            try:
                toks, lps, offs = self.scorer(req["model"], text)
            except KeyError:
                return 404, {"error": {"message": f"model {req['model']} does not exist"}}
            choices.append({"index": i, "text": text, "finish_reason": "length",
                            "logprobs": {"tokens": toks, "token_logprobs": lps, "text_offset": offs,
                                         "top_logprobs": None}})
        return 200, {"id": "cmpl-0", "object": "text_completion", "created": int(time.time()), "model": req["model"],
                     "choices": choices}

    # ------------------------------------------------------------------------------ handler
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, status, obj, extra=()):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method):
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                route = re.sub(r"/ftjob-\d+", "/{id}", path)
                with server.lock:
                    server.counts[f"{method} {route}"] += 1
                if self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                status = server._fault(path)
                if status is not None:
                    return self._send(status, {"error": {"message": f"injected {status}"}},
                                      [("retry-after-ms", "5")] if status == 429 else [])
                if method == "POST" and path == "/v1/files":
                    return self._send(*server.create_file(self.headers, body))
                if method == "POST" and path == "/v1/fine_tuning/jobs":
                    return self._send(*server.create_job(json.loads(body)))
                if method == "GET" and path.startswith("/v1/fine_tuning/jobs/"):
                    return self._send(*server.retrieve_job(path.rsplit("/", 1)[1]))
                if method == "POST" and path == "/v1/completions":
                    return self._send(*server.completions(json.loads(body)))
                return self._send(404, {"error": {"message": f"no route {method} {path}"}})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

        return Handler
