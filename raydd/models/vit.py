"""The small ViT that APM and its neighbours evaluate on ("ViT" in their cross-architecture tables).

A pre-norm transformer in the style of the vit-pytorch package: patches flattened and linearly
embedded (no norm on the patch embedding), a class token, learned position embeddings drawn from
N(0, 1), ``depth`` blocks of [LayerNorm → multi-head attention (bias-free qkv, heads × head_dim
inner width, projected back)] and [LayerNorm → MLP with GELU], dropout 0.1 after the embedding,
the attention projection and both MLP layers, then LayerNorm and a linear head on the class
token. APM's setting: patch 4, width 512, depth 3, 4 heads of 64, MLP 512.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RayddError
from .spec import Built

DROPOUT = 0.1


class PatchEmbed(nn.Module):
    """Image → [class token, patch tokens] + position embedding, then dropout."""

    def __init__(self, in_channels: int, image_size: int, patch: int, width: int):
        super().__init__()
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.proj = nn.Linear(in_channels * patch * patch, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width))
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        # each patch flattened row by row, channels innermost
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.proj(x)], dim=1)
        return self.drop(x + self.pos_embed)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * inner, bias=False)
        identity = heads == 1 and head_dim == width
        self.out = nn.Identity() if identity else nn.Sequential(nn.Linear(inner, width), nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)   # softmax(q kᵀ / √head_dim) v
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, head_dim)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Dropout(DROPOUT),
                                 nn.Linear(mlp, width), nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit_apm(opts: dict, in_channels: int, num_classes: int, image_size: int) -> Built:
    """Stages: embed, block1..N, norm (all tokens), pool (class token), fc. The patch defaults
    to APM's 4 whenever it divides the image size (8, 28, 32, 64 px)."""
    from .timm_nets import fit_patch

    patch = opts["patch"] or (4 if image_size % 4 == 0 else fit_patch(image_size))
    if image_size % patch:
        raise RayddError(f"model 'vit_apm': patch={patch} does not divide the image size {image_size}")
    width, depth, heads, head_dim, mlp = (opts[k] for k in ("width", "depth", "heads", "head_dim", "mlp"))
    stages = [("embed", PatchEmbed(in_channels, image_size, patch, width))]
    stages += [(f"block{i + 1}", Block(width, heads, head_dim, mlp)) for i in range(depth)]
    stages += [("norm", nn.LayerNorm(width)), ("pool", ClassToken()), ("fc", nn.Linear(width, num_classes))]
    return Built(stages, embedding_dim=width,
                 config=dict(patch=patch, width=width, depth=depth, heads=heads, head_dim=head_dim, mlp=mlp,
                             tokens=(image_size // patch) ** 2))


def class_token_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """B × heads × N softmax weights of the class token's query (token 0) in ``block``'s
    self-attention on the tokens ``x``: what the fused attention computes but does not return
    (MetaDD's ViT CAM, Eq. 7). For this module's :class:`Block` and timm's ViT ``Block``."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    heads = getattr(attn, "heads", None) or attn.num_heads
    # both lay the qkv output out as [q | k | v], each heads × head_dim
    q, k, _ = attn.qkv(h).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    if hasattr(attn, "q_norm"):   # timm
        q, k = attn.q_norm(q), attn.k_norm(k)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    return torch.softmax((q[:, :, :1] * scale) @ k.transpose(-2, -1), dim=-1)[:, :, 0]
