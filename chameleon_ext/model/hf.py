"""A local Hugging Face model behind the :class:`~chameleon_ext.model.gpt.GPT` interface used
for domain embeddings (its base model, no LM head), and the checks that its weights match its
config. transformers is an optional dependency, imported when a model is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import ChameleonUserError
from .gpt import check_layer, state_dict_sha256

__all__ = ["HFCausalLM", "HF_MODEL_FILES", "load_hf_model", "HF_DROPPED_HEADS", "HF_UNUSED_MISSING",
           "check_hf_loading_info"]


class _StopForward(Exception):
    """Raised by the hook at the pooled layer: ends the forward pass, carrying its input."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("forward pass stopped at the pooled layer")
        self.hidden = hidden


class HFCausalLM(nn.Module):
    """A local Hugging Face model behind the :class:`GPT` interface used for embeddings.

    Holds the BASE model (no LM head: embeddings never need logits). Exposes
    ``hidden_states(idx, layer, attention_mask)``, ``default_embedding_layer``, ``n_layer``,
    ``content_hash`` and a ``config`` with ``vocab_size``, ``n_layer``, ``n_embd`` and
    ``block_size``.

    ``hidden_states(idx, layer)`` equals ``outputs.hidden_states[layer]`` of a full forward
    with ``output_hidden_states=True``, but runs only the blocks before ``layer``: in Hugging
    Face's convention ``hidden_states[i]`` is the input of block ``i``, so a forward pre-hook
    on that block takes its input and ends the pass (blocks ``layer..n-1``, the final norm and
    every other stored state are never computed). ``layer == n_layer`` is the base model's
    ``last_hidden_state`` (final norm applied, as the last entry of ``hidden_states``). This
    works for any architecture whose blocks sit in one ``nn.ModuleList`` of ``n_layer``
    modules (GPT-2, Llama, Mistral, BERT, ...); otherwise the full forward is run.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        c = hf_model.config
        n_layer = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
        n_embd = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
        block = (getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
                 or getattr(c, "n_ctx", None) or 2048)
        self.config = _HFShape(vocab_size=int(c.vocab_size), n_layer=int(n_layer),
                               n_embd=int(n_embd), block_size=int(block))
        self.blocks = _find_blocks(hf_model, self.config.n_layer)
        if hasattr(c, "use_cache"):
            c.use_cache = False  # no key/value cache for a single pass
        # The tokenizer the proxy expects (a tokenizer_record), set by whoever loads it.
        self.tokenizer_record: Optional[dict] = None

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def default_embedding_layer(self) -> int:
        return (self.config.n_layer + 1) // 2

    @property
    def content_hash(self) -> str:
        return state_dict_sha256(self.hf.state_dict())

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        raise ChameleonUserError(
            "this Hugging Face proxy is loaded for embeddings only (its base model, without an LM head)"
        )

    def hidden_states(self, idx: torch.Tensor, layer: Optional[int] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``outputs.hidden_states[layer]``: ``[B, T, H]`` (0 = embedding output), computed
        with the blocks before ``layer`` only."""
        n = self.config.n_layer
        if layer is None:
            layer = self.default_embedding_layer
        layer = check_layer(layer, n)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the plain causal path, no mask to build
        if layer == n:
            return self.hf(input_ids=idx, attention_mask=attention_mask).last_hidden_state
        if self.blocks is None:  # no block list found: the full forward with every state
            out = self.hf(input_ids=idx, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[layer]

        def stop(module, args, kwargs):
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = self.blocks[layer].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.hf(input_ids=idx, attention_mask=attention_mask)
        except _StopForward as done:
            return done.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"the Hugging Face model's forward pass never reached block {layer}")


def _find_blocks(hf_model: nn.Module, n_layer: int) -> Optional[nn.ModuleList]:
    """The model's list of transformer blocks: the first ``nn.ModuleList`` of ``n_layer``
    modules (``h`` in GPT-2, ``layers`` in Llama, ``encoder.layer`` in BERT), or None."""
    for _, module in hf_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layer:
            return module
    return None


@dataclass
class _HFShape:
    vocab_size: int
    n_layer: int
    n_embd: int
    block_size: int


# Files that make up a Hugging Face model folder's weights and config; a --proxy pointing at
# one of them is a folder passed by its file.
HF_MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json", "generation_config.json")


def load_hf_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                  torch_dtype: Optional[torch.dtype] = None) -> HFCausalLM:
    """Wrap the base model (no LM head) of the Hugging Face model saved in the local folder
    ``path`` (no network access): ``AutoModel`` loads the shared trunk of a causal LM
    checkpoint as well as an encoder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ChameleonUserError(f"model path {path!r} is not a folder holding a Hugging Face model")
    try:
        import transformers  # optional dependency, imported lazily on purpose
    except ImportError as exc:
        raise ChameleonUserError(
            f"loading the Hugging Face model at {path!r} needs the optional package "
            "'transformers' (pip install transformers)"
        ) from exc
    kw = {} if torch_dtype is None else {"dtype": torch_dtype}
    # Every tensor is accounted for: transformers fills a missing or wrongly shaped tensor with a
    # random one and carries on (a config.json of one architecture beside the weights of another
    # loads as a random model), so the load report decides here, and transformers' own printed
    # report, which would read as if the load were fine, is silenced.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf, info = transformers.AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                          ignore_mismatched_sizes=True, **kw)
    except Exception as exc:
        raise ChameleonUserError(f"could not load a Hugging Face model from {path!r}: "
                                 f"{' '.join(str(exc).split())}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_hf_loading_info(info, path, type(hf).__name__)
    return HFCausalLM(hf.eval()).to(map_location)


# Parts the hidden states never use. Heads a checkpoint stores and the base model leaves out on
# purpose (embeddings need no logits): GPT-2/Llama's lm_head, GPT-NeoX's embed_out, BERT's
# pretraining heads. And BERT's pooler, which a checkpoint saved without it leaves random in
# BertModel: it reads only the last layer's first position, after every hidden state.
HF_DROPPED_HEADS = ("lm_head.", "embed_out.", "cls.")
HF_UNUSED_MISSING = ("pooler.",)


def check_hf_loading_info(info: dict, path: str, model_class: str, shown: int = 12) -> None:
    """Raise naming the tensors when a Hugging Face load (``output_loading_info=True``) left any
    tensor missing (randomly initialised; but :data:`HF_UNUSED_MISSING`), found one the
    architecture does not have (other than a dropped head, :data:`HF_DROPPED_HEADS`), or one of
    another shape."""

    def names(items) -> str:
        items = sorted(items)
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    missing = [str(k) for k in info.get("missing_keys") or () if not str(k).startswith(HF_UNUSED_MISSING)]
    unexpected = [str(k) for k in info.get("unexpected_keys") or () if not str(k).startswith(HF_DROPPED_HEADS)]
    mismatched = [f"{k[0]} ({tuple(k[1])} in the file, {tuple(k[2])} in {model_class})" if isinstance(k, tuple)
                  else str(k) for k in info.get("mismatched_keys") or ()]
    errors = [" ".join(str(e).split()) for e in info.get("error_msgs") or ()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) of {model_class} missing from the weights: {names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the weights that {model_class} does not have: "
                        f"{names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of another shape: {names(mismatched)}")
    if errors:
        problems.append(f"load errors: {names(errors)}")
    if problems:
        raise ChameleonUserError(
            f"the Hugging Face model at {path!r} does not match its config.json ({'; '.join(problems)}); "
            "loaded as it is, the model would hold random tensors or leave stored ones unused: check that "
            "config.json and the weights belong to the same model")
