"""Equivalence with the seed's hand edit of GPTBlock (shared/seed/houlsby-adapter-gpt.md)."""

from __future__ import annotations

import torch
from torch import nn

import adapterkit
from adapterkit.models.gpt import FeedForward, LayerNorm, MultiheadAttention
from tests.conftest import make_gpt


class SeedAdapter(nn.Module):
    """The seed's Adapter, verbatim in behaviour."""

    def __init__(self, d_model, bottleneck=64, dropout=0.1):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.dropout(self.up(self.act(self.down(x))))


class SeedGPTBlock(nn.Module):
    def __init__(self, d_model, num_heads, dff, dropout, adapter_bottleneck=64):
        super().__init__()
        self.mha_block = MultiheadAttention(d_model=d_model, num_heads=num_heads, dropout=dropout)
        self.ffn_block = FeedForward(d_model=d_model, dff=dff, dropout=dropout)
        self.attn_adapter = SeedAdapter(d_model, adapter_bottleneck, dropout)
        self.ffn_adapter = SeedAdapter(d_model, adapter_bottleneck, dropout)
        self.layernorm1 = LayerNorm(normalized_shape=d_model)
        self.layernorm2 = LayerNorm(normalized_shape=d_model)

    def forward(self, x, key_padding_mask):
        x_copy = x
        x = self.mha_block(q=x, k=x, v=x, key_padding_mask=key_padding_mask)
        x = self.attn_adapter(x)
        x = self.layernorm1(x_copy + x)
        x_copy = x
        x = self.ffn_block(x)
        x = self.ffn_adapter(x)
        x = self.layernorm2(x_copy + x)
        return x


class SeedGPT(nn.Module):
    def __init__(self, vocab_size, d_model, max_length, num_heads, dff, dropout, N,
                 adapter_bottleneck=64):
        super().__init__()
        self.emb_layer = nn.Embedding(vocab_size, d_model)
        self.pos_layer = nn.Embedding(max_length, d_model)
        self.decoder_blocks = nn.ModuleList(
            [SeedGPTBlock(d_model, num_heads, dff, dropout, adapter_bottleneck) for _ in range(N)]
        )
        self.cls = nn.Linear(d_model, vocab_size)
        self.pos_range = torch.arange(max_length).view(1, -1)

    def forward(self, x, key_padding_mask=None):
        x = self.emb_layer(x) + self.pos_layer(self.pos_range[:, : x.size(1)])
        for block in self.decoder_blocks:
            x = block(x=x, key_padding_mask=key_padding_mask)
        return self.cls(x)


def seed_state_from(model: nn.Module) -> dict[str, torch.Tensor]:
    """adapterkit's state_dict renamed to the seed's keys (attn_adapter / ffn_adapter)."""
    renamed = {}
    for key, value in model.state_dict().items():
        key = key.replace("mha_block.adapterkit.default.", "attn_adapter.")
        key = key.replace("ffn_block.adapterkit.default.", "ffn_adapter.")
        renamed[key] = value
    return renamed


def build_pair(bottleneck=16, dropout=0.0):
    ours = make_gpt(3, layers=3, dropout=dropout)
    ours = adapterkit.inject(ours, ["mha_block", "ffn_block"],
                             adapterkit.AdapterConfig(bottleneck=bottleneck, dropout=dropout))
    torch.manual_seed(7)
    for adapter in adapterkit.adapters(ours).values():  # random, non-zero adapters
        for p in adapter.parameters():
            nn.init.normal_(p, std=0.2)
    seed = SeedGPT(61, 32, 16, 4, 48, dropout, 3, adapter_bottleneck=bottleneck)
    seed.load_state_dict(seed_state_from(ours))
    return ours, seed


def test_same_logits_as_the_seed_hand_edit_with_random_adapters():
    ours, seed = build_pair()
    x = torch.randint(0, 61, (4, 12))
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[1, 9:] = True  # right padding
    mask[2, :4] = True  # left padding
    for m in (ours, seed):
        m.eval()
    with torch.no_grad():
        a, b = ours(x, mask), seed(x, mask)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    # and the adapters matter: the base alone computes something else
    with adapterkit.disabled(ours), torch.no_grad():
        assert not torch.allclose(ours(x, mask), b, atol=1e-3)


def test_same_gradients_as_the_seed_in_train_mode():
    ours, seed = build_pair()
    x = torch.randint(0, 61, (2, 10))
    grads = []
    for m in (ours, seed):
        m.train()
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append(m.decoder_blocks[1].mha_block.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_freeze_adapters_and_cls_gives_the_seed_trainable_count():
    ours, seed = build_pair(bottleneck=64)
    report = adapterkit.freeze(ours, train=["adapters", "cls"])
    # the seed's own freeze code, verbatim
    for p in seed.parameters():
        p.requires_grad = False
    for name, p in seed.named_parameters():
        if "attn_adapter" in name or "ffn_adapter" in name:
            p.requires_grad = True
    for name, p in seed.named_parameters():
        if name.startswith("cls."):
            p.requires_grad = True
    seed_trainable = sum(p.numel() for p in seed.parameters() if p.requires_grad)
    assert report.trainable == seed_trainable == adapterkit.summary(ours).trainable
    assert adapterkit.summary(ours).total == sum(p.numel() for p in seed.parameters())
    text = str(adapterkit.summary(ours)).splitlines()
    assert text[-2].startswith(f"Trainable params: {seed_trainable} (")
    assert text[-1] == f"Total params: {sum(p.numel() for p in seed.parameters())}"
