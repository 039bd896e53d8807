"""Analytic FLOPs of the two-tower model, accelerator chip specs and model FLOPs utilisation.

MaxText-style accounting: the matmuls of both towers (patch embedding or the convolutional
stem's 3x3 and 1x1 convolutions, q/k/v/out
projections, MLPs, attention-pooling head, output projections), the attention score and
value products, and the ``B x B`` logits; x3 for forward + backward. Recomputation
(remat, gradient caching) is not counted: MFU measures useful model work. Causal text
attention is counted as full attention.
"""

from __future__ import annotations

import dataclasses

from fszjax.models.stem import layer_plan
from fszjax.models.two_tower import tower_dims


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures from the vendors' spec sheets (dense bf16, no sparsity)."""

  name: str
  peak_tflops: float     # dense bf16 TFLOP/s
  hbm_bytes: int         # HBM capacity
  hbm_gbps: float        # HBM bandwidth, GB/s (1e9 bytes/s)


_GiB = 1 << 30
_GB = 10**9
# Sources (checked 2026-11-30): cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} ("peak compute
# per chip (bf16)", "HBM capacity / bandwidth per chip"); NVIDIA A100/H100/H200 datasheets
# (the Tensor Core bf16 figure halved: the sheets quote it with 2:4 sparsity).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275.0, 32 * _GiB, 1200.0),
    "v5e": Chip("TPU v5e", 197.0, 16 * _GiB, 819.0),
    "v5p": Chip("TPU v5p", 459.0, 95 * _GiB, 2765.0),
    "v6e": Chip("TPU v6e", 918.0, 32 * _GiB, 1640.0),
    "a100-40gb": Chip("NVIDIA A100 40GB", 312.0, 40 * _GB, 1555.0),
    "a100": Chip("NVIDIA A100 80GB", 312.0, 80 * _GB, 2039.0),
    "h100-pcie": Chip("NVIDIA H100 PCIe", 756.0, 80 * _GB, 2000.0),
    "h100": Chip("NVIDIA H100 SXM", 989.0, 80 * _GB, 3350.0),
    "h200": Chip("NVIDIA H200", 989.0, 141 * _GB, 4800.0),
}

# Substrings of `jax.devices()[0].device_kind` (lower case) -> CHIPS key; first match wins.
_KIND_KEYS = (
    ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"),
    ("v5", "v5p"), ("v4", "v4"),
    ("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"),
    ("a100-sxm4-40gb", "a100-40gb"), ("a100-pcie-40gb", "a100-40gb"), ("a100", "a100"),
)


def chip_for(device_kind: str) -> Chip | None:
  """The `Chip` of a JAX ``device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...)."""
  kind = device_kind.lower()
  for sub, key in _KIND_KEYS:
    if sub in kind:
      return CHIPS[key]
  return None


def peak_tflops(device_kind: str) -> float | None:
  chip = chip_for(device_kind)
  return chip.peak_tflops if chip else None


def _encoder_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width
  return depth * per_layer


def _valid_taps(n_in: int, stride: int, k: int = 3) -> tuple[int, int]:
  """(output length, sum over outputs of the kernel taps that land inside the input) of a
  'SAME'-padded 1-D convolution: zero padding is not counted, as XLA does not."""
  n_out = -(-n_in // stride)
  pad_lo = max((n_out - 1) * stride + k - n_in, 0) // 2
  taps = sum(1 for o in range(n_out) for j in range(k) if 0 <= o * stride + j - pad_lo < n_in)
  return n_out, taps


def stem_flops(size: int, channels: int, patch: int, stem, width: int) -> float:
  """Forward FLOPs of one image through `fszjax.models.stem.ConvStem`: its 3x3 convolutions
  ('SAME' padding; taps on the zero padding not counted) and the 1x1 projection to the
  tower width; 0 without a stem."""
  if not stem:
    return 0.0
  total, side, c_in = 0.0, size, channels
  for c_out, stride in layer_plan(patch, stem):
    side, taps = _valid_taps(side, stride)
    total += 2.0 * taps * taps * c_in * c_out
    c_in = c_out
  return total + 2.0 * side * side * c_in * width


def forward_flops_parts(mcfg, global_batch: int, depths: tuple[int, int] | None = None) -> dict:
  """Forward FLOPs per example, split ``{"image", "text", "logits"}``.

  ``depths=(image_depth, text_depth)`` overrides the towers' depths (used to estimate
  what XLA's cost analysis sees when it counts a scanned layer body once).
  """
  icfg, tcfg = mcfg.image, mcfg.text
  iw, idp, im, _, patch = tower_dims(icfg)
  tw, tdp, tm, _, _ = tower_dims(tcfg)
  if depths is not None:
    idp, tdp = depths
  patch = patch or 16
  size = icfg.image_size
  channels = icfg.channels
  n_patch = (size // patch) ** 2
  t_img = n_patch + (1 if icfg.pool == "tok" else 0)
  embed = mcfg.embed_dim or 0
  stem = tuple(int(c) for c in icfg.stem or ())
  if stem:
    fi = stem_flops(size, channels, patch, stem, iw)
  else:
    fi = 2 * n_patch * patch * patch * channels * iw
  fi += _encoder_flops(t_img, iw, idp, im)
  if icfg.pool == "map":
    fi += 2 * iw * iw * 2 + 2 * 2 * t_img * iw * iw + 2 * 2 * t_img * iw + 2 * 2 * iw * im
  if embed and icfg.proj:
    fi += 2 * iw * embed
  ft = _encoder_flops(tcfg.max_len, tw, tdp, tm)
  if embed and tcfg.proj:
    ft += 2 * tw * embed
  fl = 2 * global_batch * (embed or iw)  # this example's row of the logits
  return {"image": float(fi), "text": float(ft), "logits": float(fl)}


def forward_flops_per_example(mcfg, global_batch: int) -> float:
  """Forward FLOPs per example of the contrastive model described by ``config.model``."""
  return sum(forward_flops_parts(mcfg, global_batch).values())


def train_flops_per_step(mcfg, global_batch: int) -> float:
  return 3.0 * forward_flops_per_example(mcfg, global_batch) * global_batch


def scan_count_ratio(mcfg, global_batch: int, grad_accum: int = 1) -> float:
  """How many times more FLOPs the step does than a static count of its HLO shows.

  XLA's cost analysis counts the body of a loop once: with ``scan_layers`` each tower's
  block is one loop body (so ``depth`` layers count as 1), and with gradient accumulation
  the towers run inside a loop over the ``grad_accum`` micro-batches (counted as one).
  The ratio true / counted of the analytic forward FLOPs estimates the factor to apply
  to XLA's figures.
  """
  true = forward_flops_parts(mcfg, global_batch)
  if mcfg.scan_layers:
    seen = forward_flops_parts(mcfg, global_batch, depths=(
        min(1, tower_dims(mcfg.image)[1]), min(1, tower_dims(mcfg.text)[1])))
  else:
    seen = dict(true)
  k = max(int(grad_accum), 1)
  counted = (seen["image"] + seen["text"]) / k + seen["logits"]
  return sum(true.values()) / counted
