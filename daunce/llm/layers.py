"""The anatomy of a causal LM: decoder and head, keeping some of its layers, and cached features.

``backbone_and_head`` finds the decoder and the LM head under a peft wrapper. ``truncate_layers``
keeps the first (or the last) layers of a model. ``split_model`` and ``bottom_features`` split a
model at a layer: when LoRA adapters sit only on the top layers, the frozen bottom's output is
computed once and every fine-tune, perturbed copy and signal pass runs the top layers only.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import torch

from ..progress import progress_bar

if TYPE_CHECKING:
    from .data import TextDataset


def base_model(model):
    """The transformers causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model):
    """``(decoder, lm_head)`` of a (peft-wrapped) transformers causal LM; LoRA layers injected into
    the decoder stay active when it is called directly."""
    lm = base_model(model)
    head = lm.get_output_embeddings()
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    if head is None or decoder is None:
        raise TypeError(f"{type(lm).__name__} is not a causal LM with an output head")
    return decoder, head


def _decoder(model):
    decoder, _ = backbone_and_head(model)
    if not hasattr(decoder, "layers"):
        raise TypeError(f"{type(decoder).__name__} has no .layers list")
    return decoder


def truncate_layers(model, n_layers: int, *, top: bool = False, in_place: bool = True):
    """Keep ``n_layers`` decoder layers of a causal LM: the first ones, or the last ones with ``top=True``;
    the embeddings, final norm and LM head stay. The kept layers are renumbered from 0.

    ``in_place=True`` changes ``model`` and returns it; e.g. the first 6 of SmolLM2-135M's 30 layers make
    a cheaper, still pretrained LM for CPU runs (a forward pass costs about a quarter as much).
    ``in_place=False`` leaves ``model`` unchanged and returns a new, frozen model in eval mode (the
    transformers model, without a peft wrapper around it); only the kept layers are copied."""
    decoder = _decoder(model)
    layers = decoder.layers
    n = len(layers)
    if not 1 <= n_layers <= n:
        raise ValueError(f"n_layers must be in [1, {n}], got {n_layers}")
    kept = slice(n - n_layers, n) if top else slice(0, n_layers)
    decoder.layers = torch.nn.ModuleList(list(layers)[kept])
    if in_place:
        out = model
    else:
        try:
            out = copy.deepcopy(base_model(model))
        finally:
            decoder.layers = layers
    config = base_model(out).config
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[kept]
    for i, layer in enumerate(_decoder(out).layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = i
    if not in_place:
        out.requires_grad_(False)
        out.eval()
    return out


def split_model(model, n_top: int):
    """The top ``n_top`` decoder layers of a causal LM (with its final norm and head) as a model of
    its own, to be fed the cached input of layer ``L - n_top`` as ``inputs_embeds``.

    When LoRA adapters sit only on the top layers, everything below them is frozen, so its output
    can be computed once (``bottom_features``) and every fine-tune, perturbed copy and signal pass
    runs only the top layers: the same function of the adapters, at a fraction of the cost.
    Returns a new (frozen) model; the original is unchanged."""
    return truncate_layers(model, n_top, top=True, in_place=False)


class _Stop(Exception):
    pass


@torch.no_grad()
def bottom_features(model, dataset: TextDataset, n_bottom: int, batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """``(N, T, h)`` float32: the input of decoder layer ``n_bottom`` (the output of the first
    ``n_bottom`` layers) for every example of ``dataset``; zeros on padding. Stops the forward pass
    there, so it costs ``n_bottom`` layers."""
    decoder = _decoder(model)
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
        for s in progress_bar(range(0, N, batch_size), desc="bottom features", progress=progress, leave=False):
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



class BottomFeatures:
    """Examples -> ``TextDataset`` carrying the frozen bottom's features, each distinct example's
    features computed once (``bottom_features``) and kept, so that the many subsets and query lists
    of an experiment (theta0, K fine-tunes, signal passes, baselines) never run the bottom twice.

    ``model`` is the full causal LM, ``n_bottom`` the number of its layers below the adapters (the
    features feed ``split_model(model, L - n_bottom)``); ``n_bottom = 0`` gives the token embeddings.
    Features of real tokens do not depend on the padding (causal attention, right padding), so an
    example's cached features serve every list it appears in. ``computed`` counts the examples whose
    bottom was run.
    """

    def __init__(self, model, tokenizer, n_bottom: int, max_length: int, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.n_bottom, self.max_length, self.batch_size = int(n_bottom), int(max_length), int(batch_size)
        self._cache: dict[str, torch.Tensor] = {}
        self.computed = 0

    @staticmethod
    def key(example: dict) -> str:
        return json.dumps([example["prompt"], example["response"], example.get("system")])

    def __call__(self, examples) -> TextDataset:
        from .data import TextDataset

        ds = TextDataset(self.tokenizer, examples, self.max_length)
        keys = [self.key(e) for e in ds.examples]
        lengths = ds.enc["attention_mask"].sum(1).tolist()
        missing = sorted({keys.index(k) for k in keys if k not in self._cache})
        if missing:
            sub = ds.subset(missing)
            feats = bottom_features(self.model, sub, self.n_bottom, self.batch_size)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = feats[j, : lengths[i]].clone()
            self.computed += len(missing)
        N, T = ds.enc["input_ids"].shape
        out = None
        for i, k in enumerate(keys):
            f = self._cache[k]
            if out is None:
                out = torch.zeros(N, T, f.shape[-1])
            out[i, : f.shape[0]] = f
        return ds.with_features(out)
