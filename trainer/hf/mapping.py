"""stagerun architectures <-> Hugging Face ``transformers`` architectures: config.json and tensor names, both ways.

Pure mapping, no I/O: :mod:`.export` and :mod:`.load` read and write the files. This module is the one namespace
of the mapping; its parts are :mod:`.architecture` (the architecture and config.json of an export),
:mod:`.tensors` (the tensor names and values) and :mod:`.config_check` (a config.json against ``spec.model``).

Which architecture a resolved ``ModelSpec`` becomes (docs/huggingface.md has the full table):

- ``norm: rmsnorm``, RoPE on every head dim -> ``LlamaForCausalLM``. ``qkvBias: true`` is written as Llama's
  ``attention_bias: true`` with an all-zero ``o_proj`` bias (Llama's flag also adds that bias; zero is exact).
- ``norm: rmsnorm`` with ``qkNorm: true`` -> ``Qwen3ForCausalLM`` (Llama plus per-head ``q_norm``/``k_norm``).
- ``norm: layernorm``, RoPE on any fraction -> ``StableLmForCausalLM`` (``partial_rotary_factor``,
  ``num_key_value_heads``, ``use_qkv_bias``). Its LayerNorms always have a bias: ``normBias: false`` is written
  as all-zero biases (exact).
- NormHead: the row normalisation is baked into ``lm_head.weight`` (inference-exact); with tied embeddings the
  export is untied (``tie_word_embeddings: false``), since the head is no longer the embedding.
- The embedding and head keep their padded rows: ``vocab_size`` in config.json is ``padded_vocab``.
- Refused (no native transformers class computes the same function): ALiBi (``spec.model.position``), RMSNorm
  with partial RoPE (``spec.model.rotaryFraction``: ``LlamaForCausalLM`` rotates every head dim), and LayerNorm
  with ``qkNorm`` (StableLM's per-head LayerNorms are another function).

Both layouts already agree where it matters: RoPE uses the Hugging Face rotate-half layout (no q/k permutation)
and grouped-query heads use ``repeat_kv``'s order (query head h reads kv head h // group).
"""

from __future__ import annotations

from .architecture import (
    ARCHITECTURES,
    INIT_PATH,
    LLAMA,
    MODEL_TYPES,
    QWEN3,
    STABLELM,
    HFMismatchError,
    UnsupportedArchitecture,
    export_problems,
    exports_tied,
    field,
    hf_architecture,
    hf_config,
)
from .config_check import check_hf_config, hf_model_type, hf_rope_theta, hf_rotary_factor, hf_tied, hf_vocab_size
from .tensors import COPY, NORMHEAD, UNIT_NORM_TOLERANCE, ZEROS, Entry, export_tensor, hf_entries

__all__ = [
    "ARCHITECTURES",
    "COPY",
    "INIT_PATH",
    "LLAMA",
    "MODEL_TYPES",
    "NORMHEAD",
    "QWEN3",
    "STABLELM",
    "UNIT_NORM_TOLERANCE",
    "ZEROS",
    "Entry",
    "HFMismatchError",
    "UnsupportedArchitecture",
    "check_hf_config",
    "export_problems",
    "export_tensor",
    "exports_tied",
    "field",
    "hf_architecture",
    "hf_config",
    "hf_entries",
    "hf_model_type",
    "hf_rope_theta",
    "hf_rotary_factor",
    "hf_tied",
    "hf_vocab_size",
]
