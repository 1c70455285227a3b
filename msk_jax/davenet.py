"""DAVEnet-v2: the 1-D residual audio network that turns a log-mel spectrogram into tokens.

Input (B, frames, bins) log-mel; a convolution spanning all bins (a per-frame linear map,
no bias), BatchNorm, ReLU, then len(layers) residual stages of width-`kernel` 1-D convolutions,
each stage starting with stride 2: output (B, ceil(frames / 2^stages), widths[-1]). With the
paper's 6 stages one token covers 64 frames (0.64 s).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msk_jax.layers import BatchNorm, Dtype


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    pad = kernel // 2  # the original pads width // 2 (even) or (width - 1) // 2 (odd)
    return nn.Conv(features, (kernel,), strides=(stride,), padding=[(pad, pad)], use_bias=False,
                   kernel_init=_KAIMING_FAN_OUT, dtype=dtype, name=name)


# The original draws conv weights from N(0, 2 / (kernel_h * kernel_w * out_channels)).
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 conv + BN) shortcut when the shape changes, then ReLU."""

    features: int
    kernel: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = _conv(self.features, self.kernel, self.stride, "conv1", self.dtype)(x)
        out = jax.nn.relu(BatchNorm(self.dtype, name="bn1")(out, train))
        out = _conv(self.features, self.kernel, 1, "conv2", self.dtype)(out)
        out = BatchNorm(self.dtype, name="bn2")(out, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "downsample_conv", self.dtype)(x)
            x = BatchNorm(self.dtype, name="downsample_bn")(x, train)
        return jax.nn.relu(out + x)


class DAVEnet(nn.Module):
    """ResDAVEnet with `layers[i]` blocks of width `widths[i + 1]` in stage i (stride 2 each)."""

    layers: Sequence[int] = (2, 2, 1, 1, 1, 1)
    widths: Sequence[int] = (128, 128, 256, 512, 1024, 2048, 4096)
    kernel: int = 9
    dtype: Dtype = jnp.float32
    remat_blocks: bool = False  # recompute each residual block in the backward pass (model.remat)

    @nn.compact
    def __call__(self, log_mel, train: bool):
        """log_mel: (B, frames, bins) -> (B, tokens, widths[-1])."""
        if len(self.widths) != len(self.layers) + 1:
            raise ValueError(f"DAVEnet: {len(self.layers)} stages need {len(self.layers) + 1} widths, "
                             f"got {len(self.widths)}.")
        bins = log_mel.shape[-1]
        conv1_init = nn.initializers.normal((2.0 / (bins * self.widths[0])) ** 0.5)  # a (bins x 1) conv
        x = nn.Dense(self.widths[0], use_bias=False, kernel_init=conv1_init, dtype=self.dtype,
                     name="conv1")(log_mel)
        x = jax.nn.relu(BatchNorm(self.dtype, name="bn1")(x, train))
        block = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat_blocks else ResidualBlock
        for stage, (blocks, width) in enumerate(zip(self.layers, self.widths[1:]), start=1):
            for b in range(blocks):
                x = block(width, self.kernel, 2 if b == 0 else 1, self.dtype,
                                  name=f"layer{stage}_{b}")(x, train)
        return x

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.layers)
