"""Small models covering every layer kind dpclip clips, and an independent
per-sample reference built on ``torch.func`` (no dpclip code involved)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

VOCAB, SEQ, CLASSES = 20, 6, 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingBagOfWords(nn.Module):
    """Embedding, a Linear on [B, T, D] (3-D ghost norm), LayerNorm, mean pool."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.proj(self.emb(tokens))))
        return self.head(h.mean(dim=1))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.conv(x)))
        return self.fc(nn.functional.avg_pool2d(h, 2).flatten(1))


class TinyTransformer(nn.Module):
    """nn.TransformerEncoderLayer as built (nn.MultiheadAttention inside), with a
    key-padding mask from token 0: the mask reaches attention as a keyword argument."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layer = nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=24, dropout=dropout, batch_first=True
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.emb(tokens), src_key_padding_mask=tokens == 0)
        return self.head(h.mean(dim=1))


class Conv1dNet(nn.Module):
    """Conv1d with stride, padding and dilation; GroupNorm over one group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2)
        self.norm = nn.GroupNorm(1, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(dim=-1))


class AttentionVariants(nn.Module):
    """``nn.MultiheadAttention`` called directly, each path of its in-projection:
    self-attention returning weights (explicit softmax), cross-attention with key
    is value (split weight), with three distinct inputs (chunked weight), and
    kdim = vdim ≠ embed_dim (separate projection weights) with a padding mask;
    an embedding with a padding row."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
        self.triple = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        self.ctx = nn.Linear(8, 6)
        self.sep = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        a, _ = self.self_attn(h, h, h)
        memory = torch.tanh(h[:, :3])
        c, _ = self.cross(a, memory, memory, need_weights=False)
        t, _ = self.triple(c, memory, memory * 2.0, need_weights=False)
        m = self.ctx(h)
        s, _ = self.sep(t, m, m, key_padding_mask=tokens == 0, need_weights=False)
        return self.head(s.mean(dim=1))


class SigmoidGate(nn.Module):
    """A bare parameter used through a function of itself: no rule, the exact graph path."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate)


class GatedMLP(nn.Module):
    """Linear layers around a graph-path layer; data: make_data("mlp", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.gate = SigmoidGate(16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.gate(self.fc1(x))))


def make_data(kind: str, n: int, generator: torch.Generator, dtype=torch.float64):
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    if kind == "mlp":
        return torch.randn(n, 10, generator=generator, dtype=dtype), y
    if kind == "cnn":
        return torch.randn(n, 1, 8, 8, generator=generator, dtype=dtype), y
    if kind == "conv1d":
        return torch.randn(n, 3, 12, generator=generator, dtype=dtype), y
    tokens = torch.randint(1, VOCAB, (n, SEQ), generator=generator)
    tokens[:, -2:] *= torch.rand(n, 1, generator=generator) < 0.5  # padded tails
    return tokens, y


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "embedding": EmbeddingBagOfWords,
    "cnn": SmallCNN,
    "transformer": TinyTransformer,
    "conv1d": Conv1dNet,
    "attention": AttentionVariants,
}


def per_sample_grads(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """g_i = ∇ CE(model(x_i), y_i) for each i, by torch.func.vmap over single examples."""

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def reference_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    logical_batch: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(Σ_i min(1, C/‖g_i‖) g_i / L per parameter name, the norms ‖g_i‖)."""
    g = per_sample_grads(model, params, x, y)
    norms = torch.sqrt(sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in g.values()))
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    update = {
        k: torch.einsum("i,i...->...", factors.to(v.dtype), v) / logical_batch for k, v in g.items()
    }
    return update, norms
