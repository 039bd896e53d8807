"""Shared test utilities: tiny configs, random batches, mesh helpers."""

import os

import jax
import numpy as np

from fszjax import config as config_lib
from fszjax import sharding

TINY = [
    "--config.batch_size=16", "--config.model.embed_dim=16",
    "--config.model.image.width=32", "--config.model.image.depth=1",
    "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
    "--config.model.image.image_size=16", "--config.model.image.patch_size=4",
    "--config.model.text.width=32", "--config.model.text.depth=1",
    "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
    "--config.model.text.vocab_size=64", "--config.model.text.max_len=8",
    "--config.data.image_size=16", "--config.data.max_text_len=8",
    "--config.optim.warmup_steps=0", "--config.optim.lr=0.01", "--config.total_steps=10",
    # Adam's first steps divide by |g| + eps: with a tiny eps, gradients that are ~0 turn
    # float reduction-order noise (different on every mesh) into +-lr updates.
    "--config.optim.eps=1e-3",
]


def tiny_config(*extra):
  return config_lib.load_config("configs/glyphs.py", TINY + list(extra))


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_file_on(path, base: str, *lines: str) -> str:
  """Writes a config file at `path` whose ``get_config`` imports ``configs/<base>.py`` as
  Python and runs `lines` (statements on ``c``, e.g. ``"c.optim.lr = 1.0"``) on its config."""
  body = "".join(f"  {line}\n" for line in lines)
  with open(path, "w") as f:
    f.write(f"import sys\nsys.path.insert(0, {CONFIGS!r})\nimport {base}\n\n"
            f"def get_config(arg=None):\n  c = {base}.get_config()\n{body}  return c\n")
  return str(path)


def random_batch(cfg, seed=0, batch=None):
  rng = np.random.default_rng(seed)
  b = batch or cfg.batch_size
  s = cfg.model.image.image_size
  c = cfg.model.image.channels
  L = cfg.model.text.max_len
  V = cfg.model.text.vocab_size
  tokens = rng.integers(1, V - 1, size=(b, L)).astype(np.int32)
  for i, n in enumerate(rng.integers(1, L, size=b)):
    tokens[i, n] = V - 1
    tokens[i, n + 1:] = 0
  return {"image": rng.normal(size=(b, s, s, c)).astype(np.float32), "tokens": tokens}


def mesh_of(shape):
  n = int(np.prod(shape))
  return sharding.make_mesh(*shape, devices=jax.devices()[:n])


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
