"""Hugging Face interop: export checkpoints as ``transformers`` model folders, and start runs from HF weights.

- :mod:`.mapping`: stagerun architecture <-> ``LlamaForCausalLM`` / ``StableLmForCausalLM`` config and tensor names
  (and the refusals for architectures transformers cannot express natively);
- :mod:`.export`: ``stagerun export RUN_OR_CHECKPOINT --out DIR`` (:func:`export_checkpoint`, :func:`export_model`);
- :mod:`.load`: ``spec.model.init: {from: hf, path: ...}`` (:func:`load_hf_weights`);
- :mod:`.commands`: the ``export`` subcommand.

docs/huggingface.md describes what exports to what and why.
"""

from .mapping import HFMismatchError, UnsupportedArchitecture, check_hf_config, hf_architecture, hf_config

__all__ = ["HFMismatchError", "UnsupportedArchitecture", "check_hf_config", "hf_architecture", "hf_config"]
