"""A small GPT (the proxy and base models) plus save/load helpers and a Hugging Face adapter.

The architecture is GPT-2's: learned positional embeddings, pre-LayerNorm blocks with causal
self-attention (``torch.nn.functional.scaled_dot_product_attention``) and a GELU MLP, a final
LayerNorm, and an output projection tied to the input embedding.

Domain embeddings (docs/method.md, step 2) need the hidden state after the middle block.
:meth:`GPT.hidden_states` follows Hugging Face's ``output_hidden_states`` convention --
``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of block ``i``,
and the last entry ``hidden_states[n_layer]`` has the final LayerNorm applied -- but runs only
the blocks up to the requested layer. The reference picks ``hidden_states[len(hidden_states)
// 2]`` with ``len(hidden_states) == n_layer + 1``, i.e. layer ``(n_layer + 1) // 2``; that is
:attr:`GPT.default_embedding_layer` (equal to ``n_layer // 2`` only for even ``n_layer``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import operator
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import io
from .errors import ChameleonUserError

__all__ = [
    "GPTConfig",
    "GPT",
    "HFCausalLM",
    "load_hf_model",
    "load_model",
    "save_model",
    "state_dict_sha256",
]

MODEL_FORMAT = "chameleon_ext.gpt/1"

# name -> (n_layer, n_head, n_embd)
_PRESETS = {
    "tiny": (2, 2, 64),  # unit tests
    "small": (4, 4, 128),  # CPU demo
    "proxy": (6, 12, 768),  # the paper's proxy shape
    "base": (12, 12, 768),  # GPT-2 small shape
}


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (257 for the byte tokenizer).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``n_embd``.
        n_embd: hidden width H.
        block_size: maximum sequence length T (size of the positional embedding).
        dropout: dropout probability used in training mode (0 keeps training deterministic
            given the data order).
    """

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ChameleonUserError(f"GPTConfig.{name}: expected a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ChameleonUserError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ChameleonUserError(f"GPTConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")

    @classmethod
    def preset(cls, name: str, vocab_size: int, block_size: int, **overrides) -> "GPTConfig":
        """A named shape: ``tiny`` (2x64), ``small`` (4x128), ``proxy`` (6x768), ``base`` (12x768)."""
        if name not in _PRESETS:
            raise ChameleonUserError(
                f"model preset: unknown name {name!r}; expected one of {sorted(_PRESETS)}"
            )
        n_layer, n_head, n_embd = _PRESETS[name]
        kw = dict(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  block_size=block_size)
        kw.update(overrides)
        return cls(**kw)

    @staticmethod
    def preset_names() -> list[str]:
        return list(_PRESETS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ChameleonUserError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**dict(d))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, T, H]; attn_mask: None (plain causal) or bool [B, 1, T, T] (True = attend)."""
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=2)
        # [B, T, H] -> [B, n_head, T, H / n_head]
        q, k, v = (t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, H)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU, as in GPT-2 ("gelu_new" in Hugging Face)
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style causal language model.

    Args:
        config: the model shape.
        seed: seeds the parameter initialisation (a private generator; the global torch RNG is
            not touched), so ``GPT(cfg, seed=s)`` is reproducible.
    """

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ChameleonUserError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        # PyTorch's default initialisers draw from the global RNG; fork it so building a model
        # leaves the caller's random stream unchanged (all values are re-drawn below anyway).
        with torch.random.fork_rng(devices=[]):
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings
        self._init_weights(seed)
        # The tokenizer of the data the model learned from (a tokenizer_record), when known:
        # recorded in model.pt, checked before the model embeds or evaluates other data.
        self.tokenizer_record: Optional[dict] = None

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        # GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorm;
        # residual output projections scaled by 1/sqrt(2 n_layer) so the residual stream's
        # variance does not grow with depth.
        g = torch.Generator().manual_seed(int(seed))
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # tied weight appears once
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, resid_std, generator=g)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02, generator=g)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.zeros_(p)

    # -- properties ----------------------------------------------------------------------------

    @property
    def default_embedding_layer(self) -> int:
        """Reference's middle layer: ``len(hidden_states) // 2 == (n_layer + 1) // 2``."""
        return (self.config.n_layer + 1) // 2

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def content_hash(self) -> str:
        """sha256 of the state dict (names, dtypes, shapes, bytes); keys embedding caches.

        Computed on demand (the parameters may have changed since the last call); cost is one
        pass over the parameters.
        """
        return state_dict_sha256(self.state_dict())

    def hidden_module(self, layer: int) -> nn.Module:
        """The submodule whose output is :meth:`hidden_states` at ``layer`` during a plain
        :meth:`forward` (the trainer hooks it for callbacks that ask for a layer): the
        embedding dropout for 0, block ``layer`` for 1..n_layer-1, and the final LayerNorm
        for ``n_layer`` (Hugging Face's last hidden state has it applied)."""
        layer = _check_layer(layer, self.config.n_layer)
        if layer == 0:
            return self.drop
        if layer == self.config.n_layer:
            return self.ln_f
        return self.blocks[layer - 1]

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    # -- forward passes ------------------------------------------------------------------------

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ChameleonUserError(f"idx: expected token ids of shape [B, T], got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ChameleonUserError(
                f"idx: sequence length {T} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, H]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Next-token logits and (optionally) the mean cross-entropy loss.

        Args:
            idx: token ids ``[B, T]`` (int64), ``T <= block_size``.
            targets: next-token ids ``[B, T]``; positions equal to -1 are ignored.

        Returns:
            ``(logits [B, T, V], loss)``; ``loss`` is a float32 scalar, or None without targets.
        """
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, next_token_loss(logits, targets)

    def hidden_states(self, idx: torch.Tensor, layer: Optional[int] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden state after block ``layer`` in Hugging Face convention: ``[B, T, H]``.

        ``layer == 0`` is the embedding output, ``layer == i`` the output of block ``i``, and
        ``layer == n_layer`` additionally has the final LayerNorm applied (as the last entry of
        Hugging Face's ``hidden_states``). Only blocks ``1..layer`` are run.

        Args:
            idx: token ids ``[B, T]``.
            layer: in ``[0, n_layer]``; default :attr:`default_embedding_layer`.
            attention_mask: optional ``[B, T]`` with 1 for real tokens and 0 for padding. Keys at
                padding positions are masked out. With right padding (the usual case) this does
                not change real tokens' states, since causal attention never looks ahead;
                states at padding positions are meaningless and must be masked by the caller.
        """
        n = self.config.n_layer
        if layer is None:
            layer = self.default_embedding_layer
        layer = _check_layer(layer, n)
        x = self._embed(idx)
        mask = _attention_mask_4d(attention_mask, idx)
        for block in self.blocks[:layer]:
            x = block(x, mask)
        if layer == n:
            x = self.ln_f(x)
        return x


def autocast(device: torch.device):
    """The precision the trainer and evaluation run the model in on ``device``.

    bf16 autocast on CUDA: tensor cores make it about twice as fast there, and the loss is
    still computed in float32 (:func:`next_token_loss`). CPU stays float32: bf16 matmuls are
    slow on most CPUs and would break the bitwise resume tests.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_token_loss(logits: torch.Tensor, targets: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mean cross-entropy of logits ``[B, T, V]`` against targets ``[B, T]`` (-1 ignored), in
    float32 whatever the logits' dtype; None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def _check_layer(layer, n_layer: int) -> int:
    try:
        ok = not isinstance(layer, bool) and 0 <= operator.index(layer) <= n_layer
    except TypeError:
        ok = False
    if not ok:
        raise ChameleonUserError(
            f"layer: expected an integer in [0, {n_layer}] (0 = embedding output), got {layer!r}"
        )
    return operator.index(layer)


def _attention_mask_4d(attention_mask: Optional[torch.Tensor], idx: torch.Tensor):
    """[B, T] padding mask -> bool [B, 1, T, T] causal+padding mask, or None if nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape != idx.shape:
        raise ChameleonUserError(
            f"attention_mask: expected shape {tuple(idx.shape)} like idx, got "
            f"{tuple(attention_mask.shape)}"
        )
    valid = attention_mask.to(device=idx.device, dtype=torch.bool)
    if bool(valid.all()):
        return None  # fast causal kernel
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]
    # A query whose keys are all padding (a padded query under left padding) attends to itself,
    # so its row stays finite instead of producing NaN. Every other query, padded ones after
    # right padding included, attends to the real tokens only, as in Hugging Face (reference
    # pooling averages over padded positions, so their states must match).
    no_key = ~mask.any(-1, keepdim=True)
    return mask | (torch.eye(T, dtype=torch.bool, device=idx.device)[None, None] & no_key)


# -- hashing and the model file --------------------------------------------------------------


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256(MODEL_FORMAT.encode() + b"\0")
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: Union[str, os.PathLike], model: GPT, tokenizer: Optional[dict] = None) -> str:
    """Atomically save ``model``'s config, weights and content hash to ``path``; return the hash.

    ``tokenizer``: the :func:`~chameleon_ext.data.tokenizer.tokenizer_record` of the data the
    model was trained on (default: ``model.tokenizer_record``), so that using the model with
    another tokenizer is an error rather than garbage.
    """
    if not isinstance(model, GPT):
        raise ChameleonUserError(f"model: expected a GPT, got {type(model).__name__}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(sd)
    record = tokenizer if tokenizer is not None else model.tokenizer_record
    io.save_torch({"format": MODEL_FORMAT, "config": model.config.to_dict(), "state_dict": sd,
                   "sha256": digest, "tokenizer": record}, path, "model file")
    return digest


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> GPT:
    """Load a model written by :func:`save_model` or a trainer checkpoint (``ckpt.pt``).

    The stored sha256 is verified, so a corrupted file is reported rather than silently used;
    the result's :attr:`GPT.content_hash` equals it. A file whose configuration, tensor names
    or shapes do not make a :class:`GPT`, or whose weights are not all finite, is an error
    naming the file and the fault.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChameleonUserError(f"model path {path!r} does not exist")
    obj = io.read_torch(path, "model file")
    if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        cfg, sd, digest = obj["config"], obj["state_dict"], obj.get("sha256")
    elif isinstance(obj, dict) and "model" in obj and "model_config" in obj:  # trainer checkpoint
        cfg, sd, digest = obj["model_config"], obj["model"], obj.get("model_sha256")
    else:
        raise ChameleonUserError(
            f"model file {path!r} is not a chameleon_ext model or training checkpoint"
        )
    if not isinstance(cfg, Mapping):
        raise ChameleonUserError(
            f"model file {path!r}: its config is {type(cfg).__name__}, expected a mapping of "
            "GPTConfig fields")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ChameleonUserError(
            f"model file {path!r}: its weights are a {type(sd).__name__}, expected a state dict "
            "(a mapping of names to tensors)")
    if digest is not None and state_dict_sha256(sd) != digest:
        raise ChameleonUserError(f"model file {path!r} is corrupted: its content hash does not match")
    try:
        model = GPT(GPTConfig.from_dict(cfg))
    except (ChameleonUserError, TypeError) as exc:
        raise ChameleonUserError(f"model file {path!r}: bad config: {exc}") from exc
    check_state_dict(model, sd, f"model file {path!r}")
    model.load_state_dict(sd)
    record = obj.get("tokenizer")
    model.tokenizer_record = dict(record) if isinstance(record, dict) else None
    return model.to(map_location)


def check_same_config(model: "GPT", saved: Mapping[str, Any], source: str) -> None:
    """Raise ChameleonUserError naming ``source`` unless the config ``saved`` (a dict) equals
    ``model``'s."""
    cur = model.config.to_dict()
    diff = [k for k in cur if cur[k] != saved.get(k)]
    if diff:
        k = diff[0]
        raise ChameleonUserError(
            f"{source}: model {k} is {saved.get(k)!r} there but {cur[k]!r} in the given model; "
            "build the model with the same configuration")


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ChameleonUserError naming ``source`` unless ``sd`` has exactly ``model``'s tensor
    names and shapes and only finite floating-point values."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ChameleonUserError(f"{source}: missing weights {missing[:3]}"
                                 + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ChameleonUserError(f"{source}: unexpected weights {extra[:3]}"
                                 + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    for name, t in want.items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise ChameleonUserError(
                f"{source}: weight {name!r} has shape {list(sd[name].shape)}, the config needs "
                f"{list(t.shape)}")
        if sd[name].is_floating_point() and not bool(torch.isfinite(sd[name]).all()):
            raise ChameleonUserError(
                f"{source}: weight {name!r} holds NaN or infinite values (a diverged run?)")


# -- Hugging Face adapter --------------------------------------------------------------------


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
        layer = _check_layer(layer, n)
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
