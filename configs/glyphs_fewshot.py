"""Few-shot adaptation of the pretrained Glyphs towers + domain generalisation on held-out fonts.

    fszjax adapt --config configs/glyphs_fewshot.py --workdir runs/glyphs/adapt \
        --config.init_from=runs/glyphs/pretrain

``init_from``: a pretraining workdir, one checkpoint, or a `fszjax convert` directory.
``data``: the evaluation dataset; unset keys come from the model's config (its pretraining
dataset). Another dataset: ``--config.data.name=cifar100`` (TFDS),
``--config.data.name=user_image_folder/NAME`` (after `fszjax prepare folder`), or
``--config.data.name=glyphs --config.data.data_dir=DIR``; the splits default to the
dataset's test splits (``--config.fewshot.splits=[...]`` to choose).

Every key and its default (the values of this config: zero-shot head adaptation,
ProtoNets meta-training of the whole image tower on cross-font tasks, the two-tower
transfer methods on the frozen and on the meta-trained tower, and domain generalisation)
are in fszjax/config_defaults.py (`adapt_config`); ``--config.fewshot.meta.algorithm=anil``
meta-trains from the zero-shot head instead.
"""

from fszjax import config_defaults
from fszjax.data.defaults import data_overrides


def get_config(arg=None):
  del arg
  c = config_defaults.adapt_config(data_overrides())  # data: None = the model's own
  # Glyphs towers: the pretraining's stroke-width jitter also on the meta-training tasks.
  c.fewshot.meta.stroke = 0.5
  return c
