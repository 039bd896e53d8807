"""Small pytree helpers shared by the trainer and the few-shot code."""

from __future__ import annotations


def path_str(path) -> str:
  """'/'-joined keys of a `jax.tree_util` key path, e.g. ``'img/encoder/block_0/ln_1/scale'``
  (`jax.tree_util.keystr` in its simple form)."""
  import jax  # noqa: PLC0415  (keeps this module importable without jax)

  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flatten(tree) -> dict:
  """``{path_str(path): leaf}`` of a pytree (e.g. to save or compare params by name).

  Unlike `flax.traverse_util.flatten_dict` it walks every pytree node (lists, tuples,
  dataclasses, optax states), not only mappings, and drops ``None`` leaves as JAX does."""
  import jax  # noqa: PLC0415  (keeps this module importable without jax)

  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
