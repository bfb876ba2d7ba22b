"""A small U-Net-like encoder-decoder in Flax linen, channels-last logits."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
            x = nn.GroupNorm(num_groups=min(8, self.features))(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """Encoder-decoder with skip connections.

    ``features[i]`` channels at resolution ``1 / 2**i``; the image side must be
    divisible by ``2 ** (len(features) - 1)``. Input ``(N, H, W, 3)`` floats,
    output ``(N, H, W, num_classes)`` float32 logits (channels-last, the
    layout :func:`jaxloss.cross_entropy` takes by default).

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> model = UNet(num_classes=6, features=(8, 16))
      >>> x = jnp.zeros((2, 16, 16, 3))
      >>> params = model.init(jax.random.key(0), x)
      >>> model.apply(params, x).shape
      (2, 16, 16, 6)
    """

    num_classes: int
    features: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for i, f in enumerate(self.features):
            x = ConvBlock(f)(x)
            if i < len(self.features) - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for f, skip in zip(reversed(self.features[:-1]), reversed(skips), strict=True):
            x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBlock(f)(x)
        return nn.Conv(self.num_classes, (1, 1))(x).astype(jnp.float32)
