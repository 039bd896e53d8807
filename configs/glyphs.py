"""The embedded default: tiny two-tower model on the Glyphs dataset, sized for 2 CPU cores.

    fszjax pretrain --config configs/glyphs.py --workdir runs/glyphs
    fszjax bench pretrain --config configs/glyphs.py --config.mesh.data=2 \
        --config.mesh.fsdp=2 --config.mesh.tensor=2

Every key and its default (the values of this config) are in fszjax/config_defaults.py.
"""

from fszjax import config_defaults
from fszjax.data.defaults import glyphs_data_config


def get_config(arg=None):
  del arg
  return config_defaults.pretrain_config(glyphs_data_config())
