"""Router introspection: what the routers of a model do, from the jitted forward's router logits (no Python hooks).

`router_trace` runs the model once and returns every layer's router logits and top-k choices for a batch;
`RouterStats` aggregates traces over a dataset: expert load per layer, router entropy, top-k co-activation, and how
alike consecutive sliding / full attention layers route; the plot functions draw them with matplotlib."""

from __future__ import annotations

import dataclasses

import numpy as np


def router_trace(model, tokens_BT, positions_BT=None) -> dict:
    """{"logits": float32 [L, B, T, E], "experts": int [L, B, T, k] (the top-k, best first), "weights": [L, B, T, k]
    (softmax over the top-k logits: what the MoE mixes with), "mask": bool [B, T] (real tokens)}."""
    tokens_BT = np.asarray(tokens_BT)
    _, logits = model(tokens_BT, positions_BT, return_router_logits=True)
    logits = np.asarray(logits, np.float32)
    k = model.config.experts_per_token
    experts = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, experts, axis=-1)
    w = np.exp(top - top.max(-1, keepdims=True))
    mask = np.ones(tokens_BT.shape, bool) if positions_BT is None else np.asarray(positions_BT) >= 0
    return {"logits": logits, "experts": experts, "weights": w / w.sum(-1, keepdims=True), "mask": mask}


@dataclasses.dataclass
class RouterStats:
    """Running aggregates over the real tokens of many traces, per layer."""

    num_layers: int
    num_experts: int
    layer_types: tuple[str, ...] = ()
    tokens: int = 0
    load: np.ndarray = None  # [L, E] top-k selections
    entropy_sum: np.ndarray = None  # [L] sum over tokens of the full-softmax entropy (nats)
    coactivation: np.ndarray = None  # [L, E, E] tokens that selected both i and j (diagonal: selections of i)
    agreement_sum: np.ndarray = None  # [L - 1] sum over tokens of |top-k(l) & top-k(l+1)| / k

    @classmethod
    def for_model(cls, model) -> RouterStats:
        cfg = model.config
        L, E = cfg.num_hidden_layers, cfg.num_experts
        return cls(L, E, tuple(cfg.layer_types), 0, np.zeros((L, E)), np.zeros(L), np.zeros((L, E, E)),
                   np.zeros(max(L - 1, 0)))

    def add(self, trace: dict) -> RouterStats:
        mask = trace["mask"]
        logits = trace["logits"][:, mask]  # [L, N, E]
        experts = trace["experts"][:, mask]  # [L, N, k]
        L, N, k = experts.shape
        E = self.num_experts
        onehot = np.zeros((L, N, E))
        np.put_along_axis(onehot, experts, 1.0, axis=-1)
        self.load += onehot.sum(1)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        self.entropy_sum += -(p * np.log(np.maximum(p, 1e-30))).sum((1, 2))
        self.coactivation += np.einsum("lni,lnj->lij", onehot, onehot)
        if L > 1:
            self.agreement_sum += (onehot[:-1] * onehot[1:]).sum((1, 2)) / k
        self.tokens += N
        return self

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        load = self.load / np.maximum(self.load.sum(-1, keepdims=True), 1)
        out = {"tokens": self.tokens, "expert_load": load.tolist(),
               "router_entropy": (self.entropy_sum / n).tolist(),
               "max_entropy": float(np.log(self.num_experts)),
               "load_imbalance": (load.max(-1) * self.num_experts).tolist(),  # 1 = perfectly balanced
               "adjacent_layer_agreement": (self.agreement_sum / n).tolist()}
        if self.layer_types:  # gpt-oss alternates sliding and full attention: do neighbours route alike?
            by: dict[str, list[float]] = {}
            for i in range(self.num_layers - 1):
                by.setdefault(f"{self.layer_types[i]}->{self.layer_types[i + 1]}", []).append(self.agreement_sum[i] / n)
            out["agreement_by_pair"] = {name: float(np.mean(v)) for name, v in by.items()}
        return out


def _plt():
    import matplotlib.pyplot as plt  # the backend is the caller's (inline in a notebook; Agg when headless)

    return plt


def plot_expert_load(stats: RouterStats, path: str | None = None, ax=None):
    """Heatmap: share of each layer's top-k selections that go to each expert."""
    plt = _plt()
    load = stats.load / np.maximum(stats.load.sum(-1, keepdims=True), 1)
    fig, ax = (None, ax) if ax is not None else plt.subplots(figsize=(1 + 0.35 * stats.num_experts,
                                                                      1 + 0.35 * stats.num_layers))
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load ({stats.tokens} tokens)")
    ax.figure.colorbar(im, ax=ax, label="share of selections")
    if path and fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ax


def plot_token_experts(trace: dict, labels: list[str], row: int = 0, path: str | None = None, ax=None):
    """Per token (columns) and layer (rows): the expert chosen first, annotated with all top-k choices."""
    plt = _plt()
    experts = trace["experts"][:, row]  # [L, T, k]
    L, T, k = experts.shape
    fig, ax = (None, ax) if ax is not None else plt.subplots(figsize=(1 + 0.45 * T, 1 + 0.5 * L))
    ax.imshow(experts[..., 0], aspect="auto", cmap="tab20", vmin=0, vmax=19)
    for layer in range(L):
        for t in range(T):
            ax.text(t, layer, ",".join(map(str, experts[layer, t])), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(T), [repr(s)[1:-1] for s in labels[:T]], rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("top-k experts per token (colour: first choice)")
    if path and fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return ax
