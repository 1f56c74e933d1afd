"""``LocalLoRABackend``: the black-box backend protocol served by a local transformers + peft model."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..engines import DEFAULT_MEMORY_BYTES, multiadapter
from ..engines.context import ModelContext
from ..store import atomic_save
from .runner import Example, check_examples, examples_fingerprint


class LocalLoRABackend:
    """The backend protocol served by a local transformers + peft model (SmolLM2-135M-Instruct by
    default, via ``daunce.llm``).

    ``fine_tune`` resets the LoRA adapters (a fresh initialisation seeded by ``seed``, or the adapters of
    a given ``init_state`` such as theta0's), trains them on the examples with ``daunce.llm.finetune`` and
    saves the adapter weights to ``workdir/adapters/<model_id>.pt``. The id is a hash of (examples,
    seed, settings), so asking again for the same fine-tune loads the stored adapter instead of
    training. ``log_likelihoods`` loads an adapter and returns each response's summed log-likelihood
    (``daunce.llm.response_log_likelihood``). One peft model is kept and its adapters swapped.
    ``log_likelihoods_many`` scores several models at once: blocks of their adapters loaded side by side
    into the same peft model and every batch evaluated under all of them in one forward pass (peft's
    mixed-adapter batches, ``daunce.engines.multiadapter``).

    Args:
        model, tokenizer: the base model (a plain causal LM, without adapters; it is copied, not
            modified) and its tokenizer; ``None`` loads SmolLM2-135M-Instruct with ``daunce.llm.load_smollm2``.
        workdir: where adapters are stored.
        lora: keyword arguments of ``daunce.llm.add_lora`` (r, alpha, targets).
        train: keyword arguments of ``daunce.llm.finetune`` (epochs, lr, batch_size, max_length).
        init_state: adapter weights to start every fine-tune from (``daunce.llm.trainable_state`` of a
            model with the same adapters); ``None`` starts from the base model (fresh adapters, B = 0).
        eval_batch_size, max_length: for the log-likelihood passes.
        dataset: optional ``examples -> TextDataset`` used instead of plain tokenisation for every
            fine-tune and log-likelihood pass, e.g. ``daunce.llm.BottomFeatures`` when ``model`` is the top
            part of a split model (``daunce.llm.split_model``): the provider then runs only the layers
            that carry adapters, the same function at a fraction of the cost.
        adapter_block: adapters per pass of ``log_likelihoods_many``; ``None`` chooses it from
            ``adapter_memory`` (bytes of activations one pass may use).
    """

    def __init__(self, model=None, tokenizer=None, *, workdir, lora: Optional[dict] = None,
                 train: Optional[dict] = None, init_state: Optional[dict] = None, eval_batch_size: int = 16,
                 max_length: int = 128, dataset: Optional[Callable] = None, adapter_block: Optional[int] = None,
                 adapter_memory: float = DEFAULT_MEMORY_BYTES):
        from .. import llm

        self.adapter_block, self.adapter_memory = multiadapter.checked_block_options(adapter_block, adapter_memory)
        self._engine: Optional[multiadapter.MultiAdapterPass] = None

        self._llm = llm
        if model is None:
            model, tokenizer = llm.load_smollm2()
        else:
            model = copy.deepcopy(model)
        self.tokenizer = tokenizer
        self.workdir = Path(workdir)
        (self.workdir / "adapters").mkdir(parents=True, exist_ok=True)
        self.lora = dict(lora or {})
        self.train = dict(train or {})
        self.train.setdefault("progress", False)
        self.init_state = init_state
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.dataset = dataset
        self.n_trained = 0
        config = getattr(model, "config", None)
        self.name = str(getattr(config, "name_or_path", "") or type(model).__name__)
        self.n_layers = getattr(config, "num_hidden_layers", None)
        self.model = llm.add_lora(model, seed=0, **self.lora)
        self._loaded: Optional[str] = None

    def __repr__(self):
        return f"LocalLoRABackend(workdir={str(self.workdir)!r}, lora={self.lora}, train={self.train})"

    def identity(self) -> str:
        init = None
        if self.init_state is not None:
            h = hashlib.sha1()
            for k in sorted(self.init_state):
                h.update(k.encode())
                h.update(self.init_state[k].detach().cpu().float().numpy().tobytes())
            init = h.hexdigest()[:12]
        train = {k: v for k, v in self.train.items() if k != "progress"}
        ident = {"local": self.name, "lora": self.lora, "train": train, "init": init}
        if self.dataset is not None:  # a split model: its layer count is part of what it computes
            ident["layers"] = self.n_layers
        return json.dumps(ident, sort_keys=True)

    def _data(self, examples):
        return self.dataset(list(examples)) if self.dataset is not None else list(examples)

    def _path(self, model_id: str) -> Path:
        return self.workdir / "adapters" / f"{model_id}.pt"

    def _reset(self, seed: int) -> None:
        """Adapters to their starting point: ``init_state``, or a fresh initialisation seeded by ``seed``."""
        if self.init_state is not None:
            self._llm.load_trainable_state(self.model, self.init_state)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for module in self.model.modules():
                    if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                        module.reset_lora_parameters("default", True)
        self._loaded = None

    def fine_tune(self, examples: Sequence[Example], seed: int) -> str:
        examples = check_examples(examples)
        key = json.dumps({"data": examples_fingerprint(examples), "seed": int(seed), "id": self.identity()})
        model_id = "lora-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        if self._path(model_id).exists():
            return model_id
        self._reset(seed)
        self._llm.finetune(self.model, self.tokenizer, self._data(examples), seed=seed, **self.train)
        state = {k: v.cpu() for k, v in self._llm.trainable_state(self.model).items()}
        atomic_save(state, self._path(model_id))
        self.n_trained += 1
        self._loaded = model_id
        return model_id

    def _adapter(self, model_id: str) -> dict:
        path = self._path(model_id)
        if not path.exists():
            raise KeyError(f"unknown model id {model_id!r} (no adapter at {path})")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load(self, model_id: str):
        """The peft model with ``model_id``'s adapters loaded (eval mode)."""
        if self._loaded != model_id:
            self._llm.load_trainable_state(self.model, self._adapter(model_id))
            self._loaded = model_id
        self.model.eval()
        return self.model

    def log_likelihoods(self, model_id: str, examples: Sequence[Example]) -> np.ndarray:
        model = self.load(model_id)
        ll = self._llm.response_log_likelihood(model, self.tokenizer, self._data(examples),
                                               batch_size=self.eval_batch_size, max_length=self.max_length)
        return torch.as_tensor(ll).double().cpu().numpy()

    def response_lengths(self, examples: Sequence[Example]) -> np.ndarray:
        """``(n,)`` number of response tokens of each example (the tokens its log-likelihood sums over)."""
        examples = check_examples(examples)
        ds = self._data(examples) if self.dataset is not None else self._llm.TextDataset(self.tokenizer, examples,
                                                                                        self.max_length)
        return ds.n_response_tokens.double().cpu().numpy()

    @torch.no_grad()
    def _adapter_engine(self) -> multiadapter.MultiAdapterPass:
        """The multi-adapter engine over this backend's peft model (signal: summed response NLL)."""
        if self._engine is None:
            ctx = ModelContext(self.model, self._llm.CausalLMTask(signal="sum"), self.eval_batch_size,
                               copy_model=False)
            self._engine = multiadapter.MultiAdapterPass(ctx)
        return self._engine

    def log_likelihoods_many(self, model_ids: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
        """``(K, n)``: ``log_likelihoods(model_ids[k], examples)`` for every k (equal up to float rounding),
        with blocks of the models' adapters evaluated together in mixed-adapter forward passes (the
        engine ``daunce.engines.multiadapter`` that ``Daunce.signals`` uses)."""
        ids = list(model_ids)
        if not ids:
            raise ValueError("model_ids is empty")
        examples = check_examples(examples)
        states = [self._adapter(m) for m in ids]  # unknown ids fail here, before any work
        ds = self._data(examples) if self.dataset is not None else self._llm.TextDataset(self.tokenizer, examples,
                                                                                        self.max_length)
        engine = self._adapter_engine()
        block = engine.block_size(ds, len(ids), self.adapter_block, self.adapter_memory)
        out = np.empty((len(ids), len(ds)))
        for s in range(0, len(ids), block):
            out[s : s + block] = -engine.signals(states[s : s + block], ds).numpy()
        return out
