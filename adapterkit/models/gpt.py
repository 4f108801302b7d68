"""The seed's GPT, written cleanly: the reference target for adapterkit.

Post-LayerNorm decoder blocks, learned positions, a linear head to the vocabulary. The names
are the seed's (``emb_layer``, ``pos_layer``, ``decoder_blocks``, ``mha_block``, ``ffn_block``,
``layernorm1``, ``layernorm2``, ``cls``), so the seed's code and docs map onto it. There are no
adapters in here: they come from ``adapterkit.inject``.

Every ``forward`` is traceable by ``torch.fx.symbolic_trace``: no Python branch depends on a
tensor's value or shape (mask building is a wrapped leaf function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, with a learned scale and shift."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def attention_mask(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask, True where a query may attend: causal, minus padded keys.

    A query always keeps its own position, so that a row is never fully masked (a padded
    query at the start of a left-padded sequence would otherwise softmax over nothing and
    give NaN). Its output is garbage, as for any padded position, but finite.
    """
    T = q.size(-2)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
    if key_padding_mask is None:
        return allowed
    keep = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    diagonal = torch.eye(T, dtype=torch.bool, device=q.device)
    return (allowed & keep) | diagonal  # (B, 1, T, T)


torch.fx.wrap("attention_mask")  # one call_function node in traces; None-handling at run time


class MultiheadAttention(nn.Module):
    """Causal multi-head self-attention; ``key_padding_mask`` is True at padding."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.attn_dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(1)
        return x.view(B, T, self.num_heads, self.d_model // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T = q.size(0), q.size(1)
        qh, kh, vh = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(
            self.v_proj(v)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=attention_mask(qh, key_padding_mask),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, C)
        return self.dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Position-wise ``Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, d_model: int, dff: int, dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.fc1 = nn.Linear(d_model, dff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class GPTBlock(nn.Module):
    """Post-LN block: ``x = ln1(x + attn(x)); x = ln2(x + ffn(x))``, as in the seed."""

    def __init__(self, d_model: int, num_heads: int, dff: int, dropout: float) -> None:
        super().__init__()
        self.mha_block = MultiheadAttention(d_model=d_model, num_heads=num_heads, dropout=dropout)
        self.ffn_block = FeedForward(d_model=d_model, dff=dff, dropout=dropout)
        self.layernorm1 = LayerNorm(d_model)
        self.layernorm2 = LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.layernorm1(x + self.mha_block(q=x, k=x, v=x, key_padding_mask=key_padding_mask))
        return self.layernorm2(x + self.ffn_block(x))


class GPT(nn.Module):
    """Decoder-only language model: token and learned position embeddings, N blocks, a head.

    Example:
        >>> model = GPT(vocab_size=256, d_model=64, max_length=32, num_heads=4, dff=128,
        ...             dropout=0.1, N=2)
        >>> model(torch.randint(0, 256, (3, 10))).shape  # (B, T, vocab)
        torch.Size([3, 10, 256])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_length: int,
        num_heads: int,
        dff: int,
        dropout: float,
        N: int,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_length = max_length
        self.emb_layer = nn.Embedding(num_embeddings=vocab_size, embedding_dim=d_model)
        self.pos_layer = nn.Embedding(num_embeddings=max_length, embedding_dim=d_model)
        self.decoder_blocks = nn.ModuleList(
            GPTBlock(d_model=d_model, num_heads=num_heads, dff=dff, dropout=dropout)
            for _ in range(N)
        )
        self.cls = nn.Linear(in_features=d_model, out_features=vocab_size)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.emb_layer(x)  # (B, T, C)
        # arange, not a sliced buffer: torch.fx can trace arange(x.size(1)), not buffer[:proxy]
        pos = self.pos_layer(torch.arange(x.size(1), device=x.device))  # (T, C)
        x = emb + pos
        for block in self.decoder_blocks:
            x = block(x=x, key_padding_mask=key_padding_mask)
        return self.cls(x)  # (B, T, vocab)
