"""Inside `jax.shard_map` every value's type records the mesh axes it varies over, and loop carries and cond
branches must agree on them; these helpers give a fresh value (zeros, an accumulator) the axes it will have.
Outside shard_map they do nothing. (JAX has renamed where a type keeps those axes; both names are read.)"""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
    """The mesh axes an array (or a ShapeDtypeStruct from jax.eval_shape) varies over."""
    for t in (x, jax.typeof(x)):
        axis_type = getattr(t, "manual_axis_type", None)
        if axis_type is not None:
            return frozenset(axis_type.varying)
        if getattr(t, "vma", None):
            return frozenset(t.vma)
    return frozenset()


def varying_like(value, *refs):
    """`value` made to vary over every mesh axis that any of `refs` (arrays or pytrees) varies over."""
    axes = frozenset().union(*(varying_axes(leaf) for ref in refs for leaf in jax.tree.leaves(ref)))
    missing = tuple(sorted(axes - varying_axes(value)))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def cotangent_like(ct, primal):
    """A custom VJP's cotangent for `primal`, which must have primal's type: summed over the mesh axes it varies
    over but primal does not (a value replicated over an axis and used by every shard gets the sum of their
    gradients; this is the psum that autodiff inserts as the transpose of an implicit broadcast)."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return varying_like(ct, primal)
