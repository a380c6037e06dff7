"""The GPT proxy and base models (:mod:`.gpt`), their file (:mod:`.files`), and a local Hugging
Face model behind the same interface for embeddings (:mod:`.hf`). Every public name is
importable from ``chameleon_ext.model``."""

from .files import check_same_config, check_state_dict, load_model, save_model
from .gpt import (GPT, MODEL_FORMAT, GPTConfig, attention_mask_4d, autocast, check_layer, next_token_loss,
                  state_dict_sha256)
from .hf import HF_DROPPED_HEADS, HF_MODEL_FILES, HF_UNUSED_MISSING, HFCausalLM, check_hf_loading_info, load_hf_model

__all__ = [
    "GPTConfig",
    "GPT",
    "HFCausalLM",
    "load_hf_model",
    "load_model",
    "save_model",
    "state_dict_sha256",
    "autocast",
    "next_token_loss",
    "check_same_config",
    "check_state_dict",
    "check_layer",
    "attention_mask_4d",
    "check_hf_loading_info",
    "MODEL_FORMAT",
    "HF_MODEL_FILES",
    "HF_DROPPED_HEADS",
    "HF_UNUSED_MISSING",
]
