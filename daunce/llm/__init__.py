"""Language models for Daunce: loading, chat encoding, LoRA fine-tuning and the causal-LM task.

Examples are dicts ``{"prompt": str, "response": str, ...}``; only the response tokens carry loss.
``CausalLMTask`` is the ``daunce.Task`` for their batches: loss and signal are the mean NLL of the
response tokens (higher = worse), outputs are the last hidden states (the frozen LM head is applied
inside the loss).

Modules, in the order data flows through them:

* ``models``: ``load_smollm2`` (offline), ``load_hub_model``, ``tiny_llama`` (tests); ``add_lora``,
  ``trainable_state`` / ``load_trainable_state`` (the adapters).
* ``layers``: ``backbone_and_head``, ``truncate_layers``, ``split_model`` / ``bottom_features`` (run
  only the top layers on cached features of the frozen bottom), ``BottomFeatures`` (those features per
  distinct example, computed once).
* ``data``: ``encode`` (chat template, prompt masked), ``TextDataset``, ``batches``, ``prompt_length``,
  ``fitting``, ``example_text``.
* ``task``: ``CausalLMTask``, ``response_token_losses``.
* ``training``: ``finetune`` (theta0's recipe, optionally with per-example weights; its pieces ``step_batches``,
  ``lr_factor``, ``make_optimizer``, ``batch_loss``), ``response_nll``, ``response_log_likelihood``,
  ``greedy_matches``, ``generate``, ``Timer``.
* ``gradients``: ``per_example_gradients`` (LoRA, optionally projected), ``gradient_if_scores``,
  ``gradient_dot_scores``, ``gradient_cosine_scores``, ``logra_scores`` (dattri's LoGra), ``ekfac_scores`` /
  ``ekfac_damping_grid`` (kronfluence's EK-FAC on the adapters), ``lora_linear_names``.
* ``metagradient``: ``metagradient_scores``, the exact derivative of each query's loss through the fine-tune with
  respect to the training examples' weights (MAGIC's reference).
* ``embeddings``: ``sentence_embeddings`` / ``embedding_scores`` (all-MiniLM-L6-v2, loaded once).
* ``removal``: ``top_k_removal``, ``keep_mask``, ``retrain_without`` (the removal evaluation).

Every name is re-exported here: ``from daunce import llm; llm.load_smollm2()``.
"""

from .data import (
    IGNORE,
    TextDataset,
    batches,
    encode,
    encode_one,
    example_text,
    fitting,
    prompt_length,
    prompt_messages,
)
from .embeddings import embedding_scores, minilm, minilm_dir, sentence_embeddings
from .gradients import (
    ekfac_damping_grid,
    ekfac_scores,
    gradient_cosine_scores,
    gradient_dot_scores,
    gradient_if_scores,
    logra_scores,
    lora_linear_names,
    per_example_gradients,
)
from .layers import BottomFeatures, backbone_and_head, base_model, bottom_features, split_model, truncate_layers
from .metagradient import metagradient_scores
from .models import (
    MLP_TARGETS,
    SMOLLM2_GGUF,
    add_lora,
    load_hub_model,
    load_smollm2,
    load_trainable_state,
    smollm2_tokenizer,
    tiny_llama,
    trainable_state,
)
from .removal import keep_mask, retrain_without, top_k_removal
from .task import CausalLMTask, response_token_losses
from .training import (
    Timer,
    batch_loss,
    finetune,
    generate,
    greedy_matches,
    lr_factor,
    make_optimizer,
    response_log_likelihood,
    response_nll,
    step_batches,
)

__all__ = [
    "IGNORE", "MLP_TARGETS", "SMOLLM2_GGUF", "BottomFeatures", "CausalLMTask", "TextDataset", "Timer", "add_lora",
    "backbone_and_head", "base_model", "batch_loss", "batches", "bottom_features", "ekfac_damping_grid",
    "ekfac_scores", "embedding_scores", "encode", "encode_one", "example_text", "finetune", "fitting", "generate",
    "gradient_cosine_scores", "gradient_dot_scores", "gradient_if_scores", "greedy_matches", "keep_mask",
    "logra_scores", "load_hub_model", "load_smollm2", "load_trainable_state", "lora_linear_names", "lr_factor",
    "make_optimizer", "metagradient_scores", "minilm", "minilm_dir", "per_example_gradients", "prompt_length",
    "prompt_messages", "response_log_likelihood",
    "response_nll", "response_token_losses", "retrain_without", "sentence_embeddings", "smollm2_tokenizer",
    "split_model", "step_batches", "tiny_llama", "top_k_removal", "trainable_state", "truncate_layers",
]
