"""Small pytree helpers shared by the trainer and the few-shot code."""

from __future__ import annotations


def path_str(path) -> str:
  """'/'-joined keys of a `jax.tree_util` key path, e.g. ``'img/encoder/block_0/ln_1/scale'``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten(tree) -> dict:
  """``{path_str(path): leaf}`` of a pytree (e.g. to save or compare params by name)."""
  import jax  # noqa: PLC0415  (keeps this module importable without jax)

  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
