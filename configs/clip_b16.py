"""CLIP ViT-B/16 (softmax loss) for TPU pods / GPU clusters on a TFDS image-text dataset.

Architecture as open_clip's ViT-B-16 (class-token pooling, ln_pre, bias-free patch
embedding and projections, a causal 512-wide text tower over 77 tokens with end-of-text
pooling), so `fszjax convert to_open_clip` can export it. Sized like `siglip_b16.py`: global batch 32k
on a TPU v5e-256 slice (128 per chip), FSDP over every chip, full remat of each block; check
a slice before booking it with ``fszjax compile --config configs/clip_b16.py --topology
v5e:16x16`` (BUILD_NOTES.md "Ahead-of-time compilation").

    fszjax pretrain --config configs/clip_b16.py --workdir gs://bucket/clip_b16
"""

import siglip_b16  # configs/siglip_b16.py (the config loader puts configs/ on the path)


def get_config(arg=None):
  c = siglip_b16.get_config(arg)
  c.name = "clip_b16"
  c.loss = "clip"
  c.model.embed_dim = 512
  c.model.logit_scale_init = 1 / 0.07
  c.model.logit_bias = False
  c.model.image.update(dict(pool="tok", ln_pre=True, patch_bias=False, proj_bias=False,
                            act="gelu", ln_eps=1e-5))
  c.model.text.update(dict(variant="M", vocab_size=49_408, max_len=77, pool="eot", causal=True,
                           proj_bias=False, act="gelu", ln_eps=1e-5))
  c.data.max_text_len = 77
  c.optim.update(dict(lr=5e-4, wd=0.2, b2=0.98, eps=1e-6, warmup_steps=2_000))
  return c
