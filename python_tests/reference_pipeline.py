"""A re-creation of the reference implementation's embedding pipeline (LIONS-EPFL/Chameleon,
``utils.py``), run on a chameleon_ext GPT, for parity tests and as the benchmark baseline.

What the reference does, per domain and in this order (docs/method.md, step 2):

1. decode every sampled window to text (``get_random_samples``);
2. per batch of ``batch_size`` texts of ONE domain: re-tokenise with truncation to the window
   length, right-pad with EOS and build the attention mask
   (``tokenizer(texts, padding=True, truncation=True)``);
3. run the FULL model with ``output_hidden_states=True`` and the attention mask: every block,
   the final LayerNorm, every hidden state kept (``model(**inputs, output_hidden_states=True)``);
4. take ``hidden_states[len(hidden_states) // 2]`` and ``.mean(dim=1)`` over the padded length,
   padding included (the mask is not used by the mean);
5. ``np.unique(axis=0)`` over the domain's window vectors, then their mean.

Attention follows Hugging Face's GPT-2 with an attention mask: a query attends to the real
tokens at or before it, never to padding (a padded query after right padding attends to the
real tokens only). A query with no real key at all -- only a window that re-tokenises to
nothing, e.g. all EOS -- attends to itself here; Hugging Face versions differ on that row.

``pooling="masked"`` keeps the full forward (steps 3) but pools like the clean method: the
raw windows (no re-tokenisation, hence no padding), mean over real tokens, no de-duplication.
That is the same quantity ``embed_domains(pooling="masked")`` computes, so the two can be
compared number for number while the reference's cost (all blocks, all states) is kept.

Two forwards: ``impl="modules"`` runs the model's own modules (SDPA attention; what the
benchmark times), ``impl="manual"`` recomputes everything in float64 from the raw parameters
with explicit softmax attention (the independent oracle the tests use).

:func:`hf_reference_embeddings` is the same pipeline written plainly with transformers, as the
reference itself calls it, for a Hugging Face proxy: ``tokenizer.decode`` of each window,
``tokenizer(texts, padding=True, truncation=True, max_length=window)``, the FULL model given
(the reference loads ``GPT2LMHeadModel``: every block and the LM head) with
``output_hidden_states=True``, ``hidden_states[len // 2].mean(dim=1)``, ``np.unique``, mean.

Also :func:`reference_weights_numpy`: the reference's weight computation (``X X^T``, kernel
centring, ``np.linalg.inv`` of ``K + lambda k I``, ``diag(K inv)``, ``S / sum(S)``, softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "ReferenceEmbeddings",
    "retokenise",
    "pad_right",
    "hf_attention_mask",
    "all_hidden_states",
    "reference_embeddings",
    "hf_reference_embeddings",
    "reference_weights_numpy",
]


@dataclass
class ReferenceEmbeddings:
    domains: List[str]
    embeddings: np.ndarray  # [k, H] float64
    counts: List[int]  # window vectors averaged per domain (after np.unique in reference pooling)
    tokens: int  # real (unpadded) tokens that went through the model


def retokenise(tokenizer, windows: np.ndarray, length: int) -> List[List[int]]:
    """Each window decoded to text and tokenised again, truncated to ``length`` tokens."""
    out = []
    for row in windows:
        text = tokenizer.decode([int(t) for t in row])
        out.append([int(t) for t in tokenizer.encode(text)][:length])
    return out


def pad_right(rows: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ids ``[B, T]`` (int64) and the attention mask ``[B, T]`` (bool), T = longest row."""
    T = max([1] + [len(r) for r in rows])
    ids = torch.full((len(rows), T), int(pad_id), dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.int64)
            mask[i, : len(r)] = True
    return ids, mask


def hf_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool (True = real token) -> ``[B, 1, T, T]`` bool, True = may attend.

    Causal, padded keys masked; a query row without any real key attends to itself."""
    B, T = valid.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()[None] & valid[:, None, :]
    lonely = ~allowed.any(-1)  # [B, T]
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    allowed = allowed | (eye & lonely[:, :, None])
    return allowed[:, None]


def _manual_forward(model, ids: torch.Tensor, valid: Optional[torch.Tensor]):
    """float64 re-computation from the raw parameters: every hidden state and the logits."""
    sd = {k: v.detach().to("cpu", torch.float64) for k, v in model.state_dict().items()}
    cfg = model.config
    B, T = ids.shape
    H, nh = cfg.n_embd, cfg.n_head
    hd = H // nh
    ids = ids.cpu()
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    allowed = hf_attention_mask(valid.cpu())  # [B, 1, T, T]

    def ln(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def lin(x, prefix):
        return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    x = sd["wte.weight"][ids] + sd["wpe.weight"][torch.arange(T)]
    states = [x]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        q, k, v = lin(ln(x, p + ".ln_1"), p + ".attn.c_attn").split(H, dim=-1)
        q, k, v = (t.reshape(B, T, nh, hd).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        y = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, T, H)
        x = x + lin(y, p + ".attn.c_proj")
        h = lin(ln(x, p + ".ln_2"), p + ".mlp.c_fc")
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
        x = x + lin(h, p + ".mlp.c_proj")
        states.append(x)
    states[-1] = ln(x, "ln_f")  # Hugging Face applies the final LayerNorm to the last entry
    logits = states[-1] @ sd["wte.weight"].T
    return states, logits


def _modules_forward(model, ids: torch.Tensor, valid: Optional[torch.Tensor], lm_head: bool):
    """The model's own modules, every block, every state kept (like ``output_hidden_states``)."""
    T = ids.shape[1]
    mask = None if valid is None or bool(valid.all()) else hf_attention_mask(valid)
    x = model.wte(ids) + model.wpe(torch.arange(T, device=ids.device))
    states = [x]
    for block in model.blocks:
        x = block(x, mask)
        states.append(x)
    states[-1] = model.ln_f(x)
    logits = model.lm_head(states[-1]) if lm_head else None
    return states, logits


def all_hidden_states(model, ids: torch.Tensor, valid: Optional[torch.Tensor] = None, impl: str = "modules",
                      lm_head: bool = True):
    """``(hidden_states, logits)``: the ``n_layer + 1`` Hugging Face-convention states
    (embedding output, each block's output, the last one after ``ln_f``) of a full forward."""
    if impl == "manual":
        return _manual_forward(model, ids, valid)
    if impl == "modules":
        return _modules_forward(model, ids, valid, lm_head)
    raise ValueError(f"impl: expected 'modules' or 'manual', got {impl!r}")


@torch.no_grad()
def reference_embeddings(model, dataset, starts: Mapping[str, np.ndarray], window: int, batch_size: int, *,
                         pooling: str = "reference", impl: str = "modules", layer: Optional[int] = None,
                         lm_head: bool = True, split: str = "train", device="cpu") -> ReferenceEmbeddings:
    """Domain embeddings the reference's way, for the windows starting at ``starts[domain]``.

    ``layer`` indexes the hidden-state list (default ``len(hidden_states) // 2``, as the
    reference). ``pooling``: ``"reference"`` (all quirks) or ``"masked"`` (see the module doc).
    """
    if pooling not in ("reference", "masked"):
        raise ValueError(f"pooling: expected 'reference' or 'masked', got {pooling!r}")
    tok = dataset.tokenizer
    was_training = model.training
    model.eval()
    names, rows, counts, tokens = [], [], [], 0
    try:
        for name, st in starts.items():
            windows = dataset.windows_at(name, np.asarray(st), window, split)  # [n, l]
            vectors = []
            for b0 in range(0, len(windows), batch_size):
                chunk = windows[b0 : b0 + batch_size]
                if pooling == "reference":
                    ids, valid = pad_right(retokenise(tok, chunk, window), tok.eos_id)
                else:
                    ids = torch.from_numpy(np.ascontiguousarray(chunk)).long()
                    valid = torch.ones(ids.shape, dtype=torch.bool)
                ids, valid = ids.to(device), valid.to(device)
                states, _ = all_hidden_states(model, ids, valid, impl=impl, lm_head=lm_head)
                h = states[len(states) // 2 if layer is None else layer]
                if pooling == "reference":
                    pooled = h.mean(dim=1)  # over the padded length: padding included
                else:
                    m = valid.to(h.dtype).unsqueeze(-1)
                    pooled = (h * m).sum(1) / m.sum(1)
                vectors.append(pooled.cpu().numpy())
                tokens += int(valid.sum())
            vecs = np.concatenate(vectors)
            if pooling == "reference":
                vecs = np.unique(vecs, axis=0)
            names.append(name)
            rows.append(vecs.astype(np.float64).mean(0))
            counts.append(int(vecs.shape[0]))
    finally:
        model.train(was_training)
    return ReferenceEmbeddings(names, np.stack(rows), counts, tokens)


@torch.no_grad()
def hf_reference_embeddings(model, tokenizer, dataset, starts: Mapping[str, np.ndarray], window: int,
                            batch_size: int, *, pooling: str = "reference", split: str = "train",
                            device="cpu") -> ReferenceEmbeddings:
    """Domain embeddings the reference's way with a Hugging Face ``model`` (e.g. the
    ``AutoModelForCausalLM``) and its transformers ``tokenizer`` (pad token = EOS, as the
    reference sets it). ``pooling="masked"``: the raw windows through the same full forward,
    mean over their tokens, no de-duplication (what the clean method computes)."""
    if pooling not in ("reference", "masked"):
        raise ValueError(f"pooling: expected 'reference' or 'masked', got {pooling!r}")
    names, rows, counts, tokens = [], [], [], 0
    for name, st in starts.items():
        windows = dataset.windows_at(name, np.asarray(st), window, split)  # [n, l]
        vectors = []
        for b0 in range(0, len(windows), batch_size):
            chunk = windows[b0 : b0 + batch_size]
            if pooling == "reference":
                texts = [tokenizer.decode([int(t) for t in w]) for w in chunk]
                inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=window)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                tokens += int(inputs["attention_mask"].sum())
            else:
                inputs = {"input_ids": torch.from_numpy(np.ascontiguousarray(chunk)).long().to(device)}
                tokens += chunk.size
            states = model(**inputs, output_hidden_states=True).hidden_states
            h = states[len(states) // 2]
            vectors.append(h.double().mean(dim=1).cpu().numpy())  # padding included in reference pooling
        vecs = np.concatenate(vectors)
        if pooling == "reference":
            vecs = np.unique(vecs, axis=0)
        names.append(name)
        rows.append(vecs.mean(0))
        counts.append(int(vecs.shape[0]))
    return ReferenceEmbeddings(names, np.stack(rows), counts, tokens)


def reference_leverage_numpy(X: np.ndarray, lam: float = 10.0) -> np.ndarray:
    """The reference's kernel ridge leverage scores of domain embeddings ``[k, d]`` in float64
    NumPy: ``X X^T``, centring as sklearn's KernelCenterer, then
    ``diag(Kc inv(Kc + lam k I))`` with ``np.linalg.inv`` (docs/method.md, steps 3-4)."""
    X = np.asarray(X, dtype=np.float64)
    K = X @ X.T
    k = K.shape[0]
    Kc = K - K.mean(0, keepdims=True) - K.mean(1, keepdims=True) + K.mean()
    return np.diag(Kc @ np.linalg.inv(Kc + lam * k * np.eye(k)))


def reference_weights_numpy(X: np.ndarray, mode: str = "pretrain", lam: float = 10.0,
                            temperature: Optional[float] = None, normalize: bool = True,
                            return_scores: bool = False):
    """The reference's weights from domain embeddings ``[k, d]``, in float64 NumPy: the one
    NumPy oracle of the weight maths (tests and benchmarks alike).

    :func:`reference_leverage_numpy`, ``S / sum(S)``, then the softmax. The softmax subtracts
    the max (the reference's plain ``np.exp`` overflows for large k; the result is otherwise
    identical). With ``return_scores``: ``(scores fed to the softmax, weights)``."""
    S = reference_leverage_numpy(X, lam)
    if normalize:
        S = S / S.sum()
    if mode == "pretrain":
        logits = 1.0 / (S + 1e-12) / (5.0 if temperature is None else temperature)
    elif mode == "finetune":
        logits = S / (0.2 if temperature is None else temperature)
    else:
        raise ValueError(f"mode: expected 'pretrain' or 'finetune', got {mode!r}")
    e = np.exp(logits - logits.max())
    w = e / e.sum()
    return (S, w) if return_scores else w
