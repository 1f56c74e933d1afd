"""Chat examples as token batches.

Examples are dicts ``{"prompt": str, "response": str, ...}`` (an optional ``"system"`` field becomes
the system turn). ``encode`` applies the tokenizer's chat template and masks the prompt: only the
response tokens carry loss (labels ``IGNORE`` = -100 elsewhere). ``TextDataset`` holds the encoded
examples, padded to one length, for ``CausalLMTask`` and ``Daunce``.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

IGNORE = -100


def example_text(example: dict) -> str:
    """An example as plain text, prompt and response on two lines (what text-similarity baselines read)."""
    return f"{example['prompt']}\n{example['response']}"


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def prompt_messages(example: dict) -> list[dict]:
    """Chat messages of an example's prompt (an optional ``"system"`` field becomes the system turn)."""
    msgs = []
    if example.get("system"):
        msgs.append({"role": "system", "content": example["system"]})
    msgs.append({"role": "user", "content": example["prompt"]})
    return msgs


def encode_one(tokenizer, example: dict, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, truncated on the right to ``max_length``.

    The prompt is the chat template up to and including the assistant header; labels are ``-100``
    there and equal to the input ids on the response (its end-of-turn token included).
    """
    msgs = prompt_messages(example)
    p_ids = _chat_ids(tokenizer, msgs, add_generation_prompt=True)
    full = _chat_ids(tokenizer, msgs + [{"role": "assistant", "content": example["response"]}], False)
    n_prompt = 0
    for a, b in zip(p_ids, full):  # tokenizers may merge across the boundary: use the common prefix
        if a != b:
            break
        n_prompt += 1
    full = full[:max_length]
    labels = [IGNORE] * min(n_prompt, len(full)) + full[n_prompt:]
    if not any(t != IGNORE for t in labels):
        raise ValueError(f"example with prompt {example['prompt'][:60]!r}... has no response token within "
                         f"max_length={max_length} (prompt = {n_prompt} tokens); raise max_length or shorten it")
    return full, labels


def encode(tokenizer, examples: Sequence[dict], max_length: int, pad_to: Optional[int] = None) -> dict:
    """Tokenise examples with the chat template: ``{"input_ids", "attention_mask", "labels"}``, each
    ``(N, T)`` long tensors, right-padded to ``T`` = the longest example (or ``pad_to``).

    ``labels`` is ``-100`` on the prompt (system and user turns, assistant header) and on padding,
    so only the response tokens carry loss.
    """
    pairs = [encode_one(tokenizer, ex, max_length) for ex in examples]
    T = pad_to or max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    N = len(pairs)
    input_ids = torch.full((N, T), pad, dtype=torch.long)
    attention = torch.zeros((N, T), dtype=torch.long)
    labels = torch.full((N, T), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        L = min(len(ids), T)
        input_ids[i, :L] = torch.tensor(ids[:L])
        attention[i, :L] = 1
        labels[i, :L] = torch.tensor(lab[:L])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class TextDataset(Dataset):
    """A map-style dataset of encoded examples; item i is a dict of ``(T,)`` tensors
    (``input_ids``, ``attention_mask``, ``labels``, ``index``), all padded to one length ``T`` (the
    longest example, at most ``max_length``) so batches of any items stack with ``default_collate``.
    ``CausalLMTask`` trims each batch to its longest example before running the model.
    """

    def __init__(self, tokenizer, examples: Sequence[dict], max_length: int = 256):
        self.examples = list(examples)
        self.max_length = max_length
        self.enc = encode(tokenizer, self.examples, max_length)

    def with_features(self, features: torch.Tensor) -> "TextDataset":
        """A copy whose items also carry ``inputs_embeds`` ``(T, h)``: cached hidden states of a frozen
        bottom part of the model (see ``split_model``); ``CausalLMTask`` then feeds them to the top part."""
        new = copy.copy(self)
        new.enc = dict(self.enc)
        if features.shape[:2] != self.enc["input_ids"].shape:
            raise ValueError(f"features {tuple(features.shape)} do not match the tokens "
                             f"{tuple(self.enc['input_ids'].shape)}")
        new.enc["inputs_embeds"] = features
        return new

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.enc.items()} | {"index": torch.tensor(i)}

    def subset(self, indices) -> "TextDataset":
        """The examples at ``indices``, keeping this dataset's padded length (and features)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        new = copy.copy(self)
        new.examples = [self.examples[int(i)] for i in idx]
        new.enc = {k: v[idx] for k, v in self.enc.items()}
        return new

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` number of tokens of each example (its attention mask): evaluation passes batch examples of
        similar length together (``ModelContext.index_batches``), so a batch pads less."""
        return self.enc["attention_mask"].sum(1)

    @property
    def n_response_tokens(self) -> torch.Tensor:
        """``(N,)`` number of loss-carrying tokens per example."""
        return (self.enc["labels"][:, 1:] != IGNORE).sum(1)


def batches(dataset: Dataset, batch_size: int, order: Optional[torch.Tensor] = None):
    """Collated batches of a ``TextDataset`` in ``order`` (default: index order)."""
    from torch.utils.data import default_collate

    idx = order if order is not None else torch.arange(len(dataset))
    for s in range(0, len(idx), batch_size):
        yield default_collate([dataset[int(i)] for i in idx[s : s + batch_size]])


def prompt_length(tokenizer, example: dict) -> int:
    """Number of prompt tokens (chat template and assistant header included)."""
    return len(_chat_ids(tokenizer, prompt_messages(example), add_generation_prompt=True))


def fitting(tokenizer, examples: Sequence[dict], max_length: int, min_response: int = 32) -> list[dict]:
    """The examples whose prompt leaves at least ``min_response`` response tokens within ``max_length``."""
    return [e for e in examples if prompt_length(tokenizer, e) <= max_length - min_response]
