"""Few-shot adaptation of the pretrained Glyphs towers + domain generalisation on held-out fonts.

    fszjax adapt --config configs/glyphs_fewshot.py --workdir runs/glyphs/adapt \
        --config.init_from=runs/glyphs/pretrain

``init_from``: a pretraining workdir, one checkpoint, or a `fszjax convert` directory.
``data``: the evaluation dataset; unset keys come from the model's config (its pretraining
dataset). Another dataset: ``--config.data.name=cifar100`` (TFDS),
``--config.data.name=user_image_folder/NAME`` (after `fszjax prepare folder`), or
``--config.data.name=glyphs --config.data.data_dir=DIR``; the splits default to the
dataset's test splits (``--config.fewshot.splits=[...]`` to choose).
"""

import ml_collections

from fszjax.fewshot.eval_data import data_overrides


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "glyphs_fewshot"
  c.seed = 0
  c.init_from = ""  # workdir / checkpoint / converted dir (its config gives model + data)
  c.data = data_overrides()  # the evaluation dataset: None = the model's own
  c.fewshot = ml_collections.ConfigDict(dict(
      backbone="towers",
      splits=[],  # [] = the dataset's test splits (Glyphs: test_classes/_scripts/_fonts/_both)
      settings=["5way1shot", "5way5shot", "20way1shot"],
      episodes=600, q_query=5, episode_batch=200,
      max_examples=0,  # 0 = the whole split
      max_train_examples=0,  # train-split images for DG and meta-training (0 = all)
      head_steps=10, head_lr=0.5,  # zero-shot head adaptation (SGD on the support set)
      probe_steps=100, probe_lr=1.0,  # linear probe from zeros
  ))
  # Meta-training of the image tower from the zero-shot head (ANIL: the head adapts with
  # head_steps x head_lr SGD in the inner loop, the tower learns in the outer loop, second
  # order); evaluated as method 'anil' (and 'anil_zeroshot') on the re-encoded splits.
  c.fewshot.meta = ml_collections.ConfigDict(dict(
      enabled=True, algorithm="anil", adapt="head", train_setting="5way5shot", q_query=5,
      meta_batch=4, steps=100, outer_lr=3e-4, first_order=False, remat=False, task_chunk=0))
  # Adaptation that uses both towers (fszjax/fewshot/transfer.py) on the frozen features:
  # proto_zs_adapt (head from zero-shot text embeddings + support prototypes, Proto-MAML
  # style, then SGD) and tip_adapter (training-free support cache + zero-shot logits).
  # Their hyper-parameters are chosen per setting on `val` (val queries, train supports
  # from other fonts), never on test splits. gate: the zero-shot share of each task is
  # scaled by the zero-shot classifier's (chance-corrected) accuracy on that task's own
  # support set, so unseen scripts (where naming fails) fall back to the support set.
  c.fewshot.transfer = ml_collections.ConfigDict(dict(
      enabled=True, gate=True, val_split="val", val_episodes=300,
      proto_weights=[0.25, 0.5, 0.75, 1.0], steps=[0, 10, 30], lrs=[2.0, 8.0],
      alphas=[0.25, 0.5, 1.0, 2.0], betas=[1.0, 3.0, 5.5, 10.0]))
  c.log_every = 25
  c.checkpoint = ml_collections.ConfigDict(dict(save_every=50, keep=2, on_save_error="stop"))
  c.fewshot.dg = ml_collections.ConfigDict(dict(
      enabled=True, splits=["test_fonts", "test_both"], settings=["5way1shot", "5way5shot"],
      steps=300, batch_size=256, lr=1e-3, mldg_alpha=0.1, mldg_beta=1.0,
      mldg_first_order=False, wise_alphas=[0.25, 0.5, 0.75]))
  return c
