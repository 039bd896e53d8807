"""LiT: locked-image tuning. The image tower is loaded from a checkpoint and frozen; only
the text tower (and the logit scale/bias) learn.

    fszjax pretrain --config configs/lit_b16.py --workdir W \
        --config.init_from=/path/to/image_pretrained_workdir

Batch, mesh and remat as `siglip_b16.py` (v5e-256, 32k). The frozen tower's gradients are
still computed (the logged grad_norm includes them) and zeroed by the optimizer, so its
memory and FLOPs per step are those of `siglip_b16.py`.
"""

import siglip_b16  # configs/siglip_b16.py (the config loader puts configs/ on the path)


def get_config(arg=None):
  c = siglip_b16.get_config(arg)
  c.name = "lit_b16"
  c.init_from = ""  # required: a workdir/checkpoint holding an image tower of this shape
  c.init_keys = "^img/"
  c.optim.freeze = ["^img/"]
  return c
