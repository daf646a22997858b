"""A time-conditioned UNet for images (DDPM-style: residual blocks, group norm, self-attention, dropout).

Layout as in Ho et al. (2020): a 3x3 input convolution, ``len(channel_mult)`` levels of ``num_res_blocks``
residual blocks (with self-attention where the feature map's side is in ``attn_resolutions``) and a strided
downsampling convolution between levels, a middle block (residual, attention, residual), the mirrored
up path with skip connections (``num_res_blocks + 1`` blocks per level, nearest upsampling + 3x3 conv),
then group norm, SiLU and a 3x3 output convolution initialised at zero (an untrained drift or score is 0).
The time ``t`` is the SDE's continuous time: sinusoidal features -> 2-layer MLP -> a per-channel shift in
every residual block.

Inputs whose side is not a multiple of ``2**(len(channel_mult) - 1)`` (MNIST's 28 with 4 levels) are
zero-padded symmetrically to the next multiple inside ``forward`` and the output is cropped back, so
``net(x, t)`` is always shaped like ``x``. Attention resolutions refer to the padded sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import SinusoidalTimeEmbedding

__all__ = ["UNet"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time shift, GN-SiLU-dropout-conv (zero-initialised), + skip (1x1 conv if widths differ)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, pre-norm, zero-initialised output projection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attn_heads: {heads} does not divide the {channels} channels of an attention block")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _int(name: str, v: object, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
    return v


def _ints(name: str, v: object, low: int, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or (not v and not allow_empty):
        raise ValueError(f"{name}: expected a {'' if allow_empty else 'non-empty '}list of integers, got {v!r}")
    return tuple(_int(name, x, low) for x in v)


class UNet(nn.Module):
    """``net(x, t)``: ``x`` of shape ``(B, in_channels, H, W)``, ``t`` of shape ``(B,)``; returns ``x``'s shape.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        image_size: ``H`` (square) or ``[H, W]``; inputs must have this size.
        base_channels: width of the first level (DDPM CIFAR-10: 128; the paper uses about half).
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sides (after padding) that get self-attention; each must occur.
        dropout: dropout rate inside the residual blocks (active in train mode only).
        attn_heads: heads of every attention block.
        groups: group-norm groups (reduced to ``gcd(groups, channels)`` for narrow layers).
        time_min_freq, time_max_freq: band of the sinusoidal time features (default suits t in [1e-3, 0.05]).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        attn_heads: int = 1,
        groups: int = 32,
        time_min_freq: float = 1.0,
        time_max_freq: float = 2000.0,
    ):
        super().__init__()
        self.in_channels = _int("in_channels", in_channels, 1)
        size = [image_size] if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
        size = _ints("image_size", size, 1, allow_empty=False)
        if len(size) not in (1, 2):
            raise ValueError(f"image_size: expected H or [H, W], got {image_size!r}")
        self.image_size = (size[0], size[-1])
        ch = _int("base_channels", base_channels, 1)
        mult = _ints("channel_mult", channel_mult, 1, allow_empty=False)
        nrb = _int("num_res_blocks", num_res_blocks, 1)
        attn = set(_ints("attn_resolutions", attn_resolutions, 1, allow_empty=True))
        heads = _int("attn_heads", attn_heads, 1)
        groups = _int("groups", groups, 1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")

        factor = 2 ** (len(mult) - 1)
        self.padded_size = tuple(-(-s // factor) * factor for s in self.image_size)
        resolutions = [self.padded_size[0] // 2**i for i in range(len(mult))]
        unknown = sorted(attn - set(resolutions))
        if unknown:
            raise ValueError(
                f"attn_resolutions: {unknown} match no level of a {self.image_size[0]}x{self.image_size[1]} image "
                f"(padded to {self.padded_size[0]}x{self.padded_size[1]}); the feature-map sides of this UNet are "
                f"{resolutions}: pass attn_resolutions from those, or []"
            )

        temb_dim = 4 * ch
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(ch if ch % 2 == 0 else ch + 1, time_min_freq, time_max_freq),
            nn.Linear(ch if ch % 2 == 0 else ch + 1, temb_dim),
            nn.SiLU(),
            nn.Linear(temb_dim, temb_dim),
        )
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        c = ch
        for level, m in enumerate(mult):
            for _ in range(nrb):
                blocks = nn.ModuleList([ResBlock(c, ch * m, temb_dim, dropout, groups)])
                c = ch * m
                if resolutions[level] in attn:
                    blocks.append(AttnBlock(c, heads, groups))
                self.down.append(blocks)
                skips.append(c)
            if level != len(mult) - 1:
                self.down.append(nn.ModuleList([Downsample(c)]))
                skips.append(c)

        self.mid = nn.ModuleList([
            ResBlock(c, c, temb_dim, dropout, groups),
            AttnBlock(c, heads, groups),
            ResBlock(c, c, temb_dim, dropout, groups),
        ])

        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            for _ in range(nrb + 1):
                blocks = nn.ModuleList([ResBlock(c + skips.pop(), ch * mult[level], temb_dim, dropout, groups)])
                c = ch * mult[level]
                if resolutions[level] in attn:
                    blocks.append(AttnBlock(c, heads, groups))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(c)]))
        assert not skips

        self.out = nn.Sequential(_norm(c, groups), nn.SiLU(), _zero(nn.Conv2d(c, self.in_channels, 3, padding=1)))

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, h: Tensor, temb: Tensor) -> Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"x: expected shape (B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        b = x.shape[0]
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
        temb = self.time_embed[0](t).to(x.dtype)
        temb = self.time_embed[1:](temb)
        # the blocks take SiLU(temb) as in DDPM
        temb = F.silu(temb)

        (h_in, w_in), (h_pad, w_pad) = self.image_size, self.padded_size
        top, left = (h_pad - h_in) // 2, (w_pad - w_in) // 2
        if (h_pad, w_pad) != (h_in, w_in):
            x = F.pad(x, (left, w_pad - w_in - left, top, h_pad - h_in - top))

        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, temb)
            hs.append(h)
        h = self._run_blocks(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_blocks(blocks, h, temb)
        h = self.out(h)
        return h[:, :, top : top + h_in, left : left + w_in]
