"""The one source of config defaults: every key of a pretraining config, with its meaning.

`pretrain_config(data)` is the base that every config in `configs/` starts from; a config
file changes only what differs (``configs/siglip_b16.py`` sets the B/16 shapes, batch and
mesh; ``configs/clip_b16.py`` starts from ``siglip_b16`` in turn). The values here are
those of the embedded default, ``configs/glyphs.py`` (a tiny model sized for 2 CPU cores).
`fszjax.config` validates every loaded pretraining config against these keys. The data
section comes from `fszjax.data.defaults` (passed in, so this module needs nothing above
the base layer).
"""

from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axis (or axes, or None = replicated), read by
# `fszjax.sharding.logical_rules`. Defined here once; a config changes its `mesh`, not this.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
    ("kv", None), ("vocab", None), ("layers", None), ("norm", None), ("seq", None),
    ("patch", None), ("proj", None), ("act_seq", None), ("act_embed", None),
    ("act_mlp", "tensor"), ("act_heads", "tensor"), ("act_kv", None))


def sharding_rules() -> list:
  """`SHARDING_RULES` as the JSON-friendly nested lists a config holds."""
  return [[name, list(axes) if isinstance(axes, tuple) else axes]
          for name, axes in SHARDING_RULES]


def pretrain_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every key `fszjax pretrain` / `fszjax eval` read, at the values of configs/glyphs.py;
  `data` is the data section (`fszjax.data.defaults`)."""
  c = ml_collections.ConfigDict()
  c.name = "glyphs"
  c.seed = 0

  # ---- model: ViT image tower + Transformer text tower.
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 64
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"
  c.model.attn_impl = ""  # "" = JAX's choice, "xla", "cudnn" (cuDNN flash attention)
  c.model.scan_layers = False
  c.model.remat = "none"  # none | full | dots | dots_no_batch
  c.model.logit_scale_init = 14.3  # 1 / 0.07, CLIP's initial temperature
  c.model.logit_scale_max = 100.0
  c.model.logit_bias = True
  c.model.logit_bias_init = -10.0
  c.model.image = ml_collections.ConfigDict(dict(
      variant="mu", width=96, depth=3, mlp_dim=384, num_heads=4, patch_size=4,
      image_size=32, channels=1, pool="map", posemb="learn", ln_pre=False,
      final_ln_after_pool=False, patch_bias=True, proj=True, proj_bias=False, act="gelu",
      ln_eps=1e-6,
      # Convolutional stem (fszjax/models/stem.py): channels of its 3x3 layers, the first
      # log2(patch_size) strided; () = the plain patch embedding. (32, 64): lower loss and
      # higher zero-shot top-1 than the patch embedding at equal steps, same step time
      # (BUILD_NOTES.md, "Transfer recipe ablations (issue 13)").
      stem=(32, 64)))
  c.model.text = ml_collections.ConfigDict(dict(
      variant="mu", width=96, depth=3, mlp_dim=384, num_heads=4, vocab_size=1024, max_len=16,
      pool="eot", causal=True, proj=True, proj_bias=False, act="gelu", ln_eps=1e-6, pad_id=0))

  # ---- loss and sharding.
  # CLIP's softmax learns faster than SigLIP at this small batch (measured in
  # BUILD_NOTES.md); the logit bias stays so that --config.loss=siglip just works.
  c.loss = "clip"  # clip | siglip
  c.loss_chunked = True
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
  c.sharding_rules = sharding_rules()

  # ---- optimisation.
  c.batch_size = 128  # global
  c.grad_accum = 1
  c.total_steps = 500
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, wd=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=50, schedule="cosine",
      min_lr_ratio=0.0, clip_norm=1.0, freeze=[]))

  # ---- data (see fszjax/data/defaults.py for every key).
  c.data = data

  # ---- logging, evaluation, checkpoints.
  c.log_every = 20
  c.eval_every = 100  # zero-shot evaluation (5 points on the curve; ~8 s each on 2 cores)
  c.eval = ml_collections.ConfigDict(dict(
      splits=("test_classes", "test_fonts"), max_examples=0, batch_size=256))  # 0 = all
  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=250, keep=2, best_metric="zeroshot/test_classes/top1", best_mode="max",
      async_save=True,
      # A failed save (disk full, permission, I/O): "stop" (exit 2, one line) or "retry"
      # at the next save. A logged loss above spike_factor x the recent median (or NaN)
      # stops the run and sets later checkpoints aside (README "Faults and recovery").
      on_save_error="stop", spike_factor=10.0))
  c.progress = True
  # Load (part of) another run's params: a workdir or checkpoint, and a regex of param
  # paths ("" = all), e.g. init_keys="^img/" for the image tower.
  c.init_from = ""
  c.init_keys = ""
  return c
