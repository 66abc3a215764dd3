"""Train-state checkpoints with orbax: the whole state (trainable parameters, optimizer state, step) plus the data
position as JSON, written atomically (orbax finalizes a step folder only when it is complete, so a run killed
mid-save resumes from the previous one), keeping the last N."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# Attention weights were [in..., out...] until 2026-12-02 (wq_DNH, wk_DKH, wv_DKH, wo_NHD) and are the checkpoint's
# [out..., in...] since: a train state written before restores into today's names, each array (and its optimizer
# moments) transposed by `perm` (new = old.transpose(perm)).
_LEGACY_NAMES = {"wq_NHD": ("wq_DNH", (1, 2, 0)), "wk_KHD": ("wk_DKH", (1, 2, 0)), "wv_KHD": ("wv_DKH", (1, 2, 0)),
                 "wo_DNH": ("wo_NHD", (2, 0, 1))}


def _legacy_key(key: str):
    """(the key a state written before 2026-12-02 used, the transpose from its array to ours), or (key, None)."""
    for new, (old, perm) in _LEGACY_NAMES.items():
        if f"['{new}']" in key:
            return key.replace(f"['{new}']", f"['{old}']"), perm
    return key, None


def _flat(tree) -> dict[str, np.ndarray]:
    """The pytree as {path: array}: plain dicts of arrays are what orbax stores most robustly (NNX states and
    optax states are rebuilt from a template on restore)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


class Checkpoints:
    """`Checkpoints(folder, keep=3)`; `save(step, state, extra)`; `latest()`; `restore(step, template)`."""

    def __init__(self, folder, *, keep: int = 3):
        self.folder = os.path.abspath(os.fspath(folder))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.folder, options=options)

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, extra: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)),
                                                          extra=ocp.args.JsonSave(extra)))
        self._manager.wait_until_finished()

    def _restore(self, step: int, abstract: dict):
        got = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   extra=ocp.args.JsonRestore()))
        return dict(got["state"]), got["extra"]

    def _restore_legacy(self, step: int, abstract: dict):
        """The state of a checkpoint written with the attention weights' old names and layout, in today's; None when
        no key of `abstract` has an old name."""
        legacy, perms = {}, {}
        for k, v in abstract.items():
            old, perm = _legacy_key(k)
            if perm is not None:
                shape = [0] * len(perm)
                for i, p in enumerate(perm):
                    shape[p] = v.shape[i]
                v, perms[old] = jax.ShapeDtypeStruct(tuple(shape), v.dtype), (k, perm)
            legacy[old] = v
        if not perms:
            return None
        flat, extra = self._restore(step, legacy)
        for old, (new, perm) in perms.items():
            flat[new] = jnp.transpose(flat.pop(old), perm)
        return flat, extra

    def restore(self, step: int, template):
        """(state shaped like `template`, extra) of checkpoint `step`."""
        flat_template = _flat(template)
        abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flat_template.items()}
        try:
            flat, extra = self._restore(step, abstract)
        except Exception as err:  # orbax names what the checkpoint lacks; one from before a layout change?
            got = None
            with contextlib.suppress(Exception):
                got = self._restore_legacy(step, abstract)
            if got is None:
                raise err
            flat, extra = got
        missing = sorted(set(flat_template) - set(flat))
        if missing:
            raise ValueError(f"{self.folder}: checkpoint {step} lacks {missing[:3]} (a different model or method?)")
        treedef = jax.tree_util.tree_structure(template)
        leaves = [flat[k] for k in flat_template]
        for k, leaf, want in zip(flat_template, leaves, flat_template.values()):
            if np.shape(leaf) != np.shape(want):
                raise ValueError(f"{self.folder}: checkpoint {step}: {k} has shape {np.shape(leaf)}, the run "
                                 f"expects {np.shape(want)}")
        return jax.tree_util.tree_unflatten(treedef, leaves), extra

    def close(self) -> None:
        self._manager.close()
