"""The GPT proxy/base model: its configuration and named shapes, the layers, the forward
passes, the precision it runs in, its loss, and the hash of its weights.

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
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ChameleonUserError

__all__ = ["MODEL_FORMAT", "GPTConfig", "GPT", "autocast", "next_token_loss", "check_layer",
           "attention_mask_4d", "state_dict_sha256"]

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
        layer = check_layer(layer, self.config.n_layer)
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
        layer = check_layer(layer, n)
        x = self._embed(idx)
        mask = attention_mask_4d(attention_mask, idx)
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


def check_layer(layer, n_layer: int) -> int:
    """``layer`` as an int in ``[0, n_layer]`` (0 = embedding output), or a one-line error."""
    try:
        ok = not isinstance(layer, bool) and 0 <= operator.index(layer) <= n_layer
    except TypeError:
        ok = False
    if not ok:
        raise ChameleonUserError(
            f"layer: expected an integer in [0, {n_layer}] (0 = embedding output), got {layer!r}"
        )
    return operator.index(layer)


def attention_mask_4d(attention_mask: Optional[torch.Tensor], idx: torch.Tensor):
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



# -- hashing --------------------------------------------------------------------------


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

