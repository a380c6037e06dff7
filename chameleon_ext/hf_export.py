"""A trained chameleon_ext GPT as a Hugging Face GPT-2 folder (``chameleon export-model``).

The project's :class:`~chameleon_ext.model.GPT` is GPT-2's architecture, so the export is a
renaming plus one layout change, no new maths:

==============================  ===========================================  ===============
chameleon_ext.model.GPT         transformers GPT2LMHeadModel                 note
==============================  ===========================================  ===============
wte / wpe                       transformer.wte / transformer.wpe            learned positions
blocks.i.ln_1, ln_2, ln_f       transformer.h.i.ln_1, ln_2, transformer.ln_f  eps 1e-5, pre-LN
blocks.i.attn.c_attn (Linear)   transformer.h.i.attn.c_attn (Conv1D)         weight transposed
blocks.i.attn.c_proj            transformer.h.i.attn.c_proj                  weight transposed
blocks.i.mlp.c_fc / c_proj      transformer.h.i.mlp.c_fc / c_proj            weight transposed
lm_head (tied to wte)           lm_head (tie_word_embeddings = true)         not stored twice
==============================  ===========================================  ===============

GPT-2's ``Conv1D`` stores ``[in, out]`` where ``nn.Linear`` stores ``[out, in]``; q, k, v are
concatenated in the same order along the output dimension in both. The MLP's tanh-approximate
GELU is ``gelu_new``; attention is scaled by ``1/sqrt(head_dim)`` in both
(``scale_attn_weights``), with no per-layer scaling and no upcast reordering.

What the GPT-2 config cannot express is refused, never approximated: a model config field this
module does not know (a future rotary embedding, bias-free layers, an untied head, ...), a
parameter name or shape outside the table above, an untied ``lm_head`` or a LayerNorm other
than GPT-2's. When ``transformers`` is importable, the converted model is also run against the
original on a fixed batch before anything is written, and a logit difference beyond
``VERIFY_ATOL`` is an error: a silent mismatch in any part of the mapping cannot reach a folder.

Tokenizer. The byte tokenizer (ids 0..255 = UTF-8 bytes, 256 = end of text) is written as a
``tokenizers`` byte-level BPE with the 256 byte symbols at ids 0..255, no merges, and
``<|endoftext|>`` at 256; ``split_special_tokens`` is on so a literal "<|endoftext|>" in text is
encoded as its bytes, exactly as :class:`~chameleon_ext.data.tokenizer.ByteTokenizer` does. A
Hugging Face tokenizer folder is re-saved as it is.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import fields
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from .errors import ChameleonUserError
from .io import (check_writable_folder, recover_folder, remove_stale_temps, staged_folder, write_bytes,
                 write_json, write_text)

__all__ = ["export_hf", "gpt2_config", "gpt2_state_dict", "byte_tokenizer_json", "VERIFY_ATOL", "EOS_TEXT"]

EOS_TEXT = "<|endoftext|>"
LAYER_NORM_EPS = 1e-5
VERIFY_ATOL = 1e-4  # float32 logits of the same maths in two implementations
# GPTConfig fields the GPT-2 config expresses; any other field changes the architecture.
_KNOWN_CONFIG_FIELDS = {"vocab_size", "n_layer", "n_head", "n_embd", "block_size", "dropout"}
# Files export_hf writes (the folder may already hold them from an earlier export).
_OWN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "tokenizer.model", "spiece.model", "vocab.txt"}

PathLike = Union[str, "os.PathLike[str]"]


# -- model -----------------------------------------------------------------------------------


def _load_gpt(model_or_path):
    from .model import GPT, load_model

    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path)
    else:
        model = model_or_path
    if not isinstance(model, GPT):
        raise ChameleonUserError(
            f"export_hf: expected a chameleon_ext GPT or the path of its model.pt/ckpt.pt, got "
            f"{type(model).__name__} (a Hugging Face model is already in Hugging Face format)")
    return model


def _check_architecture(model) -> None:
    """Refuse anything GPT-2's config cannot express (see the module docstring)."""
    cfg = model.config
    extra = {f.name for f in fields(cfg)} - _KNOWN_CONFIG_FIELDS
    if extra:
        values = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in sorted(extra))
        raise ChameleonUserError(
            f"export_hf: the model config has fields the GPT-2 architecture cannot express ({values}); "
            "export would give a different model, so it is refused")
    if model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr():
        raise ChameleonUserError("export_hf: lm_head is not tied to the token embedding (GPT-2 ties them)")
    if model.lm_head.bias is not None:
        raise ChameleonUserError("export_hf: lm_head has a bias, which GPT-2 does not have")
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            if module.eps != LAYER_NORM_EPS or module.weight is None or module.bias is None:
                raise ChameleonUserError(
                    f"export_hf: {name} is LayerNorm(eps={module.eps}, affine weight and bias: "
                    f"{module.weight is not None}/{module.bias is not None}); GPT-2 uses eps 1e-5 with both")
        elif name.endswith(("ln_1", "ln_2", "ln_f")):
            raise ChameleonUserError(f"export_hf: {name} is a {type(module).__name__}, GPT-2 uses LayerNorm")


def _expected_shapes(cfg) -> Dict[str, tuple]:
    """chameleon_ext parameter name -> shape, for the architecture in the module table."""
    H, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes = {"wte.weight": (V, H), "wpe.weight": (T, H), "ln_f.weight": (H,), "ln_f.bias": (H,),
              "lm_head.weight": (V, H)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        shapes.update({
            b + "ln_1.weight": (H,), b + "ln_1.bias": (H,), b + "ln_2.weight": (H,), b + "ln_2.bias": (H,),
            b + "attn.c_attn.weight": (3 * H, H), b + "attn.c_attn.bias": (3 * H,),
            b + "attn.c_proj.weight": (H, H), b + "attn.c_proj.bias": (H,),
            b + "mlp.c_fc.weight": (4 * H, H), b + "mlp.c_fc.bias": (4 * H,),
            b + "mlp.c_proj.weight": (H, 4 * H), b + "mlp.c_proj.bias": (H,),
        })
    return shapes


def gpt2_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts (contiguous CPU copies;
    ``lm_head.weight`` left out, as it is tied to ``transformer.wte.weight``)."""
    _check_architecture(model)
    sd = model.state_dict()
    expected = _expected_shapes(model.config)
    unknown = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd))
    if unknown or missing:
        raise ChameleonUserError(
            f"export_hf: the model's parameters do not match GPT-2's (unexpected {unknown[:5]}, missing "
            f"{missing[:5]}); export would give a different model, so it is refused")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ChameleonUserError(f"export_hf: {name} has shape {tuple(sd[name].shape)}, GPT-2 needs {shape}")
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            hf_name = f"transformer.h.{i}.{rest}"
            if rest.endswith("weight") and t.dim() == 2:  # nn.Linear [out, in] -> Conv1D [in, out]
                t = t.t()
        else:
            hf_name = "transformer." + name
        out[hf_name] = t.contiguous().clone()
    return out


def gpt2_config(model, bos_eos_id: int) -> dict:
    """config.json for GPT2LMHeadModel with the same shape and maths as ``model``."""
    cfg = model.config
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd, as the project's MLP
        "activation_function": "gelu_new",  # tanh-approximate GELU
        "resid_pdrop": float(cfg.dropout),
        "embd_pdrop": float(cfg.dropout),
        "attn_pdrop": float(cfg.dropout),
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": bos_eos_id,
        "eos_token_id": bos_eos_id,
        "use_cache": True,
        "dtype": dtype,
    }


# -- tokenizer -------------------------------------------------------------------------------


def _byte_symbols() -> list:
    """The printable character GPT-2's byte-level BPE uses for each byte 0..255: printable
    Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ... in byte
    order (so no symbol is whitespace or a control character)."""
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
                 | set(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def byte_tokenizer_json() -> str:
    """tokenizer.json of a byte-level BPE with the byte tokenizer's ids: byte b -> id b, no
    merges, ``<|endoftext|>`` -> 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    vocab[EOS_TEXT] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: it would only cut the text into words, and without merges the ids are the
    # bytes either way.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    return tok.to_str(pretty=True)


def _byte_tokenizer_files(block_size: int) -> Dict[str, str]:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TEXT,
        "eos_token": EOS_TEXT,
        "unk_token": None,
        "model_max_length": block_size,
        # A literal "<|endoftext|>" in text is its 13 bytes, as in ByteTokenizer.encode.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    special = {"bos_token": EOS_TEXT, "eos_token": EOS_TEXT}
    return {
        "tokenizer.json": byte_tokenizer_json() + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _hf_tokenizer_files(tokenizer) -> Dict[str, bytes]:
    """The files of a Hugging Face tokenizer, as ``save_pretrained`` writes them."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="chameleon-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
    return files


def _tokenizer_files(tokenizer, model):
    """(files to write, the end-of-text id) for the tokenizer the model was trained with."""
    from .data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

    tok = load_tokenizer("byte" if tokenizer is None else tokenizer)
    V = model.config.vocab_size
    if isinstance(tok, ByteTokenizer):
        if V < tok.vocab_size:
            raise ChameleonUserError(
                f"export_hf: the model has vocab_size {V}, the byte tokenizer needs {tok.vocab_size}: the model "
                "was trained with another tokenizer; pass it (tokenizer=FOLDER / --tokenizer FOLDER)")
        return _byte_tokenizer_files(model.config.block_size), tok.eos_id
    if isinstance(tok, HFTokenizer):
        if V < tok.vocab_size:
            raise ChameleonUserError(
                f"export_hf: the tokenizer at {tok.path!r} has {tok.vocab_size} ids but the model only "
                f"{V}: it is not the tokenizer the model was trained with")
        return _hf_tokenizer_files(tok), tok.eos_id
    raise ChameleonUserError(
        f"export_hf: cannot write a Hugging Face tokenizer for {type(tok).__name__}; pass 'byte' or a local "
        "Hugging Face tokenizer folder")


# -- verification and writing ----------------------------------------------------------------


def _verify(model, hf_sd: Dict[str, torch.Tensor], config: dict) -> Optional[float]:
    """Run the converted weights in transformers' GPT2LMHeadModel next to ``model`` (float32,
    eval mode, a fixed batch); return the largest logit difference, or None without
    transformers. A difference beyond VERIFY_ATOL is an error."""
    try:
        import transformers
    except ImportError:
        return None
    hf_cfg = transformers.GPT2Config(
        **{k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")})
    hf = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in hf_sd.items()}, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    if missing or unexpected:
        raise ChameleonUserError(f"export_hf: transformers' GPT-2 does not take these weights (missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]})")
    ours = copy.deepcopy(model).float().to("cpu").eval()
    g = torch.Generator().manual_seed(0)
    T = min(ours.config.block_size, 32)
    idx = torch.randint(0, ours.config.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        want = ours(idx)[0]
        got = hf(input_ids=idx).logits
    diff = float((want - got).abs().max())
    if not diff <= VERIFY_ATOL:
        raise ChameleonUserError(
            f"export_hf: transformers' GPT-2 gives logits up to {diff:.3g} away from the model's (allowed "
            f"{VERIFY_ATOL:g}); the architectures differ, so the export is refused")
    return diff


def _check_out_dir(out_dir: str) -> str:
    recover_folder(os.path.abspath(out_dir))  # an earlier export killed mid-swap: its old folder back first
    out_dir = check_writable_folder(out_dir, "Hugging Face output folder")
    # The whole folder is replaced (staged_folder), so any file but the export's own, hidden
    # ones included, would be lost: refused. (Temp files of killed writers are removed first.)
    remove_stale_temps(out_dir)
    foreign = sorted(n for n in os.listdir(out_dir) if n not in _OWN_FILES)
    if foreign:
        raise ChameleonUserError(
            f"Hugging Face output folder {out_dir!r} holds other files ({foreign[:5]}); transformers might load "
            "them instead, and a new export replaces the whole folder, so choose an empty folder")
    return out_dir


def export_hf(model_or_path, out_dir: PathLike, tokenizer=None, verify: bool = True) -> dict:
    """Write ``model_or_path`` (a :class:`~chameleon_ext.model.GPT`, or a ``model.pt``/``ckpt.pt``
    path) as a Hugging Face GPT-2 folder ``out_dir``: ``config.json``, ``model.safetensors`` and
    the tokenizer files, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)``.

    Args:
        tokenizer: what the model was trained with: None or ``"byte"`` (the default, as in
            training), a local Hugging Face tokenizer folder, or a tokenizer object.
        verify: compare the converted model's logits with the original's before writing (needs
            ``transformers``; skipped without it).

    Returns:
        ``{"out_dir", "files", "max_logit_diff"}``; ``max_logit_diff`` is None when not verified.

    Raises:
        ChameleonUserError: an architecture GPT-2 cannot express, a tokenizer that does not fit
            the model, logits that differ, or a folder that holds other files.
    """
    model = _load_gpt(model_or_path)
    hf_sd = gpt2_state_dict(model)
    tok_files, eos_id = _tokenizer_files(tokenizer, model)
    config = gpt2_config(model, eos_id)
    diff = _verify(model, hf_sd, config) if verify else None

    from safetensors.torch import save as safetensors_bytes

    weights = safetensors_bytes(hf_sd, metadata={"format": "pt"})
    out_dir = _check_out_dir(os.fspath(out_dir))
    # The files go to a new folder beside out_dir that then takes its place in one step:
    # transformers reads no manifest, so a run killed midway must not leave new files beside
    # old ones (a new config.json with the old weights and tokenizer).
    with staged_folder(out_dir, "Hugging Face output folder") as staged:
        names = [os.path.basename(write_json(os.path.join(staged, "config.json"), config, "Hugging Face config")),
                 os.path.basename(write_bytes(os.path.join(staged, "model.safetensors"), weights,
                                              "Hugging Face weights"))]
        for name, data in tok_files.items():
            path = os.path.join(staged, name)
            write = write_text if isinstance(data, str) else write_bytes
            names.append(os.path.basename(write(path, data, "tokenizer file")))
    return {"out_dir": out_dir, "files": [os.path.join(out_dir, n) for n in names], "max_logit_diff": diff}
