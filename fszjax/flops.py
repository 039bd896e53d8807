"""Analytic FLOPs of the two-tower model and model FLOPs utilisation (MFU).

MaxText-style accounting: the matmuls of both towers (patch embedding, q/k/v/out
projections, MLPs, attention-pooling head, output projections), the attention score and
value products, and the ``B x B`` logits; x3 for forward + backward. Recomputation
(remat, gradient caching) is not counted: MFU measures useful model work. Causal text
attention is counted as full attention.
"""

from __future__ import annotations

# Peak dense bf16 TFLOP/s per chip, by substring of `jax.devices()[0].device_kind`.
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0),
    ("v5", 459.0), ("v4", 275.0),
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  for key, value in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def _encoder_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
  return depth * per_layer


def forward_flops_per_example(mcfg, global_batch: int) -> float:
  """Forward FLOPs per example of the contrastive model described by ``config.model``."""
  from fszjax.models.two_tower import tower_dims

  icfg, tcfg = mcfg.image, mcfg.text
  iw, idp, im, _, patch = tower_dims(icfg)
  patch = patch or 16
  size = icfg.image_size
  channels = icfg.get("channels", 3)
  n_patch = (size // patch) ** 2
  t_img = n_patch + (1 if icfg.get("pool", "map") == "tok" else 0)
  embed = mcfg.embed_dim or 0
  f = 2 * n_patch * patch * patch * channels * iw
  f += _encoder_flops(t_img, iw, idp, im)
  if icfg.get("pool", "map") == "map":
    f += 2 * iw * iw * 2 + 2 * 2 * t_img * iw * iw + 2 * 2 * t_img * iw + 2 * 2 * iw * im
  if embed and icfg.get("proj", True):
    f += 2 * iw * embed
  tw, tdp, tm, _, _ = tower_dims(tcfg)
  f += _encoder_flops(tcfg.max_len, tw, tdp, tm)
  if embed and tcfg.get("proj", True):
    f += 2 * tw * embed
  f += 2 * global_batch * (embed or iw)  # this example's row of the logits
  return float(f)


def train_flops_per_step(mcfg, global_batch: int) -> float:
  return 3.0 * forward_flops_per_example(mcfg, global_batch) * global_batch
