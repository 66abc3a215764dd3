"""Per-layer KV cache as a pytree: a linear buffer for full attention, a ring of `window` slots for sliding.

Every slot stores the absolute position of the key it holds (-1 = empty), so the attention mask is
computed from positions alone and a ring buffer needs no reordering.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    k_BSKH: jax.Array
    v_BSKH: jax.Array
    pos_BS: jax.Array  # int32 absolute position per slot, -1 when empty
    ring: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @classmethod
    def empty(cls, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, ring: bool) -> LayerCache:
        shape = (batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32), ring)

    @property
    def slots(self) -> int:
        return self.pos_BS.shape[1]

    def write(self, k_BTKH, v_BTKH, pos_BT) -> LayerCache:
        """Stores new keys by position; padding (pos < 0) is dropped. In a ring only a chunk's last
        `slots` positions are kept, so no two writes hit the same slot."""
        S = self.slots
        if self.ring:
            last = jnp.max(pos_BT, axis=1, keepdims=True)
            keep = (pos_BT >= 0) & (pos_BT > last - S)
            slot = jnp.where(keep, pos_BT % S, S)
        else:
            slot = jnp.where((pos_BT >= 0) & (pos_BT < S), pos_BT, S)  # out of range -> dropped
        rows = jnp.arange(pos_BT.shape[0])[:, None]
        return LayerCache(
            self.k_BSKH.at[rows, slot].set(k_BTKH.astype(self.k_BSKH.dtype), mode="drop"),
            self.v_BSKH.at[rows, slot].set(v_BTKH.astype(self.v_BSKH.dtype), mode="drop"),
            self.pos_BS.at[rows, slot].set(pos_BT, mode="drop"),
            self.ring,
        )
