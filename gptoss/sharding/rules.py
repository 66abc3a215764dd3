"""The one table that says how every tensor is laid out: logical axes per tensor, logical -> mesh axis rules.

Every parameter, KV-cache and activation tensor names its dimensions with logical axes (`PARAM_AXES`,
`CACHE_AXES`, `ACTIVATION_AXES`); `DEFAULT_RULES` maps each logical axis to mesh axes. A rule set that would
put one mesh axis on two dimensions of one tensor is refused. Mesh axes are `data`, `expert`, `tensor`
(plus `fsdp`: it splits the batch like `data`, and parameters are *stored* split over it as well, each on its
largest dimension that no other axis shards and that fsdp's size divides; `param_spec_for`. Computation
all-gathers them where they are used: fully sharded data parallelism). Outside the MoE the `expert`
axis also splits the batch (attention, KV cache), so expert parallelism does not replicate the cache.

Packed MXFP4 experts ([E, N, K/32, 16] blocks + [E, N, K/32] scales) shard along E, N or the K/32 block
axis, never inside a block: the 16-byte axis has no logical name and is never sharded.

Expert FFN with tensor parallelism. gpt-oss's down projection has I/32 = 90 MXFP4 blocks on its reduction
axis, which 4- or 8-way tensor parallelism does not divide. The default rules therefore shard the *other*
operand: gate_up by its output rows (whole gate/up pairs, `expert_ffn`), down by its output rows
(`expert_embed_out`, 2880 rows); the MoE all-gathers the activation [.., I] over `tensor` in between.
`MEGATRON_RULES` (down sharded on its reduction blocks, one psum) is available where the blocks divide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

from jax.sharding import PartitionSpec as P

from gptoss.config import MXFP4_BLOCK, ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # the names a mesh may use (fsdp: training)

# logical axis -> mesh axes, in order; axes the mesh lacks (or has with size 1) are skipped.
DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp", "expert"),   # attention and the KV cache are data-parallel over experts too
    "tokens": ("data", "fsdp", "expert"),  # the MoE's flattened batch*time axis (gathered over "expert")
    "seq": None,
    "cache_seq": None,
    "embed": None,                     # the residual stream is replicated within a data shard
    "vocab": "tensor",                 # embedding / unembedding rows, logits
    "heads": "tensor",
    "kv_heads": "tensor",              # replicated when the tensor size does not divide the kv heads
    "head_dim": None,
    "router_experts": None,            # every token needs every router logit
    "experts": "expert",
    "expert_ffn": "tensor",            # gate_up rows = intermediate units (gate/up pairs stay together)
    "expert_embed_in": None,           # gate_up's reduction axis (hidden_size/32 MXFP4 blocks)
    "expert_embed_out": "tensor",      # down's output rows
    "expert_ffn_in": None,             # down's reduction axis (intermediate_size/32 blocks; 90 in gpt-oss)
    "lora_rank": None,                 # the low-rank axis of adapters
}
MEGATRON_RULES = {**DEFAULT_RULES, "expert_embed_out": None, "expert_ffn_in": "tensor"}

# Parameters by the last element of their NNX state path.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_VD": ("vocab", "embed"),
    "unembed_VD": ("vocab", "embed"),
    "scale_D": ("embed",),
    "wq_NHD": ("heads", "head_dim", "embed"),
    "bq_NH": ("heads", "head_dim"),
    "wk_KHD": ("kv_heads", "head_dim", "embed"),
    "bk_KH": ("kv_heads", "head_dim"),
    "wv_KHD": ("kv_heads", "head_dim", "embed"),
    "bv_KH": ("kv_heads", "head_dim"),
    "wo_DNH": ("embed", "heads", "head_dim"),
    "bo_D": ("embed",),
    "sinks_N": ("heads",),
    "router_ED": ("router_experts", "embed"),
    "router_bias_E": ("router_experts",),
    "gate_up_EFD": ("experts", "expert_ffn", "expert_embed_in"),  # MXFP4: K axis = hidden_size/32 blocks
    "gate_up_bias_EF": ("experts", "expert_ffn"),
    "down_EDI": ("experts", "expert_embed_out", "expert_ffn_in"),  # MXFP4: K axis = intermediate_size/32
    "down_bias_ED": ("experts", "expert_embed_out"),
    # per-expert adapters (gptoss.layers.moe.ExpertLoRA): each follows the matrix it adapts
    "gate_up_a_ERD": ("experts", "lora_rank", "expert_embed_in"),
    "gate_up_b_EFR": ("experts", "expert_ffn", "lora_rank"),
    "down_a_ERI": ("experts", "lora_rank", "expert_ffn_in"),
    "down_b_EDR": ("experts", "expert_embed_out", "lora_rank"),
    # attention adapters (gptoss.layers.lora.AttentionLoRA)
    "q_a_DR": ("embed", "lora_rank"),
    "q_b_RNH": ("lora_rank", "heads", "head_dim"),
    "k_a_DR": ("embed", "lora_rank"),
    "k_b_RKH": ("lora_rank", "kv_heads", "head_dim"),
    "v_a_DR": ("embed", "lora_rank"),
    "v_b_RKH": ("lora_rank", "kv_heads", "head_dim"),
    "o_a_NHR": ("heads", "head_dim", "lora_rank"),
    "o_b_RD": ("lora_rank", "embed"),
}
PACKED = frozenset({"gate_up_EFD", "down_EDI"})
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k_BSKH": ("batch", "cache_seq", "kv_heads", "head_dim"),
    "v_BSKH": ("batch", "cache_seq", "kv_heads", "head_dim"),
    "pos_BS": ("batch", "cache_seq"),
}
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "tokens_BT": ("batch", "seq"),
    "x_BTD": ("batch", "seq", "embed"),
    "q_BTNH": ("batch", "seq", "heads", "head_dim"),
    "k_BTKH": ("batch", "seq", "kv_heads", "head_dim"),
    "x_TD": ("tokens", "embed"),
    "idx_TK": ("tokens", None),
    "router_logits_TE": ("tokens", "router_experts"),
    "logits_BTV": ("batch", "seq", "vocab"),
}
# Axes that fall back to replication (on the longest prefix of their mesh axes that divides them) instead of
# failing: runtime sizes, and dims whose replication only costs memory.
SOFT = frozenset({"batch", "tokens", "seq", "cache_seq", "vocab", "kv_heads", "embed", "head_dim"})


class ShardingError(ValueError):
    """A mesh or rule set that cannot lay out this model; the message names the dimension and the mesh axis."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """An immutable (hashable) logical -> mesh axes table."""

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def make(cls, rules: Rules | Mapping | None = None) -> Rules:
        if isinstance(rules, Rules):
            return rules
        merged = dict(DEFAULT_RULES)
        for name, axes in (rules or {}).items():
            if name not in DEFAULT_RULES:
                raise ShardingError(f"unknown logical axis {name!r} in sharding rules; known: {sorted(DEFAULT_RULES)}")
            merged[name] = axes
        table = []
        for name, axes in merged.items():
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ShardingError(f"rule {name!r} -> {axes}: unknown mesh axis {bad[0]!r} (mesh axes: {MESH_AXES})")
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rule {name!r} -> {axes} names a mesh axis twice")
            table.append((name, axes))
        out = cls(tuple(table))
        out.check_collisions()
        return out

    def axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        for name, axes in self.table:
            if name == logical:
                return axes
        raise ShardingError(f"no sharding rule for logical axis {logical!r}")

    def replace(self, **changes: tuple[str, ...]) -> Rules:
        return Rules(tuple((n, tuple(changes.get(n, a))) for n, a in self.table))

    def check_collisions(self) -> None:
        """Refuses rules that would put one mesh axis on two dimensions of any tensor in the tables."""
        for table in (PARAM_AXES, CACHE_AXES, ACTIVATION_AXES):
            for tensor, logical in table.items():
                seen: dict[str, str] = {}
                for ax in logical:
                    for mesh_axis in self.axes(ax):
                        if mesh_axis in seen:
                            raise ShardingError(
                                f"sharding rules put mesh axis {mesh_axis!r} on both {seen[mesh_axis]!r} and {ax!r} "
                                f"of tensor {tensor} {logical}; a mesh axis can shard one dimension per tensor")
                        seen[mesh_axis] = ax


def fit_axes(axes: Iterable[str], dim: int, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes (size > 1, present in the mesh) of `axes`; the longest prefix whose product divides dim."""
    present = [a for a in axes if sizes.get(a, 1) > 1]
    while present and dim % math.prod(sizes[a] for a in present):
        present.pop()
    return tuple(present)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], sizes: Mapping[str, int], rules: Rules,
             name: str = "tensor") -> P:
    """PartitionSpec of one array. Extra trailing dims (an MXFP4 block's 16 bytes) are never sharded."""
    if len(shape) < len(logical):
        raise ShardingError(f"{name}: shape {tuple(shape)} has fewer dims than its logical axes {logical}")
    parts: list = []
    used: dict[str, str] = {}
    for dim, (ax, n) in enumerate(zip(logical, shape)):
        want = tuple(a for a in rules.axes(ax) if sizes.get(a, 1) > 1)
        for a in want:
            if a in used:
                raise ShardingError(f"{name}: mesh axis {a!r} would shard both {used[a]!r} and {ax!r}")
            used[a] = ax
        got = fit_axes(want, n, sizes)
        if got != want and ax not in SOFT:
            raise ShardingError(
                f"{name}: dimension {dim} (logical axis {ax!r}, size {n}) is not divisible by mesh axes {want} "
                f"(sizes {[sizes[a] for a in want]})")
        parts.append(None if not got else got[0] if len(got) == 1 else got)
    parts += [None] * (len(shape) - len(logical))
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def param_spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], sizes: Mapping[str, int], rules: Rules,
                   name: str = "tensor") -> P:
    """How a parameter is stored: `spec_for`, plus `fsdp` on the largest of its logical dims that is not sharded
    yet and that fsdp's size divides (MXFP4 blocks and scales get the same dim: only logical dims count). The spec
    computation uses inside shard_map stays `spec_for`; XLA all-gathers over fsdp on the way in."""
    spec = spec_for(logical, shape, sizes, rules, name)
    n = sizes.get("fsdp", 1)
    if n <= 1:
        return spec
    parts = list(spec) + [None] * (len(shape) - len(spec))
    free = [d for d in range(len(logical)) if parts[d] is None and shape[d] % n == 0]
    if not free:
        return spec
    parts[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def model_dims(cfg: ModelConfig, experts: str = "mxfp4") -> list[tuple[str, int, str]]:
    """(logical axis, size, description in config terms) for every model dimension the rules can shard."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    blocks = (lambda n, what: (n // MXFP4_BLOCK, f"{what}/{MXFP4_BLOCK} = {n // MXFP4_BLOCK} MXFP4 blocks")) \
        if experts == "mxfp4" else (lambda n, what: (n, what))
    ffn_in, ffn_in_what = blocks(I, "intermediate_size")
    emb_in, emb_in_what = blocks(D, "hidden_size")
    return [
        ("vocab", cfg.vocab_size, f"vocab_size={cfg.vocab_size}"),
        ("embed", D, f"hidden_size={D}"),
        ("heads", cfg.num_attention_heads, f"num_attention_heads={cfg.num_attention_heads}"),
        ("kv_heads", cfg.num_key_value_heads, f"num_key_value_heads={cfg.num_key_value_heads}"),
        ("head_dim", cfg.head_dim, f"head_dim={cfg.head_dim}"),
        ("router_experts", cfg.num_experts, f"num_experts={cfg.num_experts} (router)"),
        ("experts", cfg.num_experts, f"num_experts={cfg.num_experts}"),
        ("expert_ffn", I, f"intermediate_size={I} (gate_up rows, in gate/up pairs)"),
        ("expert_embed_out", D, f"hidden_size={D} (the down projection's output rows)"),
        ("expert_embed_in", emb_in, f"{emb_in_what} (gate_up's reduction axis)"),
        ("expert_ffn_in", ffn_in, f"{ffn_in_what} (the down projection's reduction axis)"),
    ]


def resolve(cfg: ModelConfig, sizes: Mapping[str, int], rules: Rules | Mapping | None = None,
            experts: str = "mxfp4") -> tuple[Rules, tuple[str, ...]]:
    """Checks a mesh (axis sizes) and rules against a model before any weight is read.

    Returns the rules with soft axes (kv heads, vocab, ...) narrowed to what divides them, and notes saying
    what got replicated. Raises ShardingError listing every dimension the mesh does not divide.
    """
    rules = Rules.make(rules)
    unknown = [a for a in sizes if a not in MESH_AXES]
    if unknown:
        raise ShardingError(f"unknown mesh axis {unknown[0]!r}; mesh axes are named {MESH_AXES}")
    bad = {a: n for a, n in sizes.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
    if bad:
        raise ShardingError(f"mesh axis sizes must be positive integers, got {bad}")
    errors, notes, changes = [], [], {}
    for ax, n, what in model_dims(cfg, experts):
        want = tuple(a for a in rules.axes(ax) if sizes.get(a, 1) > 1)
        got = fit_axes(want, n, sizes)
        if got == want:
            continue
        missing = want[len(got):]
        axis_desc = ", ".join(f"{a!r} (size {sizes[a]})" for a in missing)
        if ax in SOFT:
            changes[ax] = got
            notes.append(f"{what} is not divisible by mesh axis {axis_desc}: replicated over it")
        else:
            errors.append(f"{what} is not divisible by mesh axis {axis_desc} (logical axis {ax!r})")
    if errors:
        hint = ""
        if any("reduction axis" in e for e in errors):
            hint = ("; gpt-oss's expert matrices have 90 MXFP4 blocks on their reduction axes, so keep "
                    "'expert_ffn_in'/'expert_embed_in' unsharded (the default rules) and use 'expert' for experts")
        raise ShardingError("mesh " + _fmt(sizes) + " does not fit the model: " + "; ".join(errors) + hint)
    rules = rules.replace(**changes)
    _check_moe_layout(rules, sizes)
    return rules, tuple(notes)


def _check_moe_layout(rules: Rules, sizes: Mapping[str, int]) -> None:
    live = lambda ax: tuple(a for a in rules.axes(ax) if sizes.get(a, 1) > 1)  # noqa: E731
    if live("expert_embed_in"):
        raise ShardingError("sharding gate_up's reduction axis ('expert_embed_in') is not supported by the MoE "
                            "layer; shard experts ('experts') or their rows ('expert_ffn') instead")
    if live("expert_ffn_in") and live("expert_ffn_in") != live("expert_ffn"):
        raise ShardingError(f"'expert_ffn_in' -> {live('expert_ffn_in')} must equal 'expert_ffn' -> "
                            f"{live('expert_ffn')} (down's reduction blocks follow gate_up's rows)")
    if live("router_experts"):
        raise ShardingError("the router weights ('router_experts') must stay replicated: every token needs "
                            "every expert's logit for its top-k")


def _fmt(sizes: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{a}: {n}" for a, n in sizes.items()) + "}"
