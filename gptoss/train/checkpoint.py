"""Train-state checkpoints with orbax: the whole state (trainable parameters, optimizer state, step) plus the data
position as JSON, written atomically (orbax finalizes a step folder only when it is complete, so a run killed
mid-save resumes from the previous one), keeping the last N."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


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

    def restore(self, step: int, template):
        """(state shaped like `template`, extra) of checkpoint `step`."""
        flat_template = _flat(template)
        abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flat_template.items()}
        got = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   extra=ocp.args.JsonRestore()))
        flat = got["state"]
        missing = sorted(set(flat_template) - set(flat))
        if missing:
            raise ValueError(f"{self.folder}: checkpoint {step} lacks {missing[:3]} (a different model or method?)")
        treedef = jax.tree_util.tree_structure(template)
        leaves = [flat[k] for k in flat_template]
        for k, leaf, want in zip(flat_template, leaves, flat_template.values()):
            if np.shape(leaf) != np.shape(want):
                raise ValueError(f"{self.folder}: checkpoint {step}: {k} has shape {np.shape(leaf)}, the run "
                                 f"expects {np.shape(want)}")
        return jax.tree_util.tree_unflatten(treedef, leaves), got["extra"]

    def close(self) -> None:
        self._manager.close()
