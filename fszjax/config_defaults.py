"""The one source of config defaults: every key of a pretraining and an adaptation config,
with its meaning.

`pretrain_config(data)` is the base that every pretraining config in `configs/` starts
from; a config file changes only what differs (``configs/siglip_b16.py`` sets the B/16
shapes, batch and mesh; ``configs/clip_b16.py`` starts from ``siglip_b16`` in turn). The
values here are a tiny model sized for 2 CPU cores; the embedded default,
``configs/glyphs.py``, changes its image tower's stem and patch size, pooling, stroke-width
augmentation and number of steps. `adapt_config(data)` is the same for `fszjax adapt` and
`fszjax bench adapt` (``configs/glyphs_fewshot.py``, ``configs/glyphs_maml_conv4.py``).
`fszjax.config` validates every loaded config against these keys and fills the keys a
saved config.json lacks (`SAVED_WITHOUT`). The data section comes from
`fszjax.data.defaults` (passed in, so this module needs nothing above the base layer).
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
  c.eval = ml_collections.ConfigDict(dict(  # splits () = data.eval_splits; max_examples 0 = all
      splits=("test_classes", "test_fonts"), max_examples=0, batch_size=256))
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
  # How `fszjax.load(...).preprocess` prepares raw images (not read by training or
  # evaluation, whose data pipeline resizes its own way); `fszjax convert` sets the
  # source's. resize_mode: center (fszjax's pipeline) | shortest (open_clip) | squash
  # (big_vision); interpolation: bilinear | bicubic | nearest | lanczos.
  c.inference = ml_collections.ConfigDict(dict(
      resize_mode="center", interpolation="bilinear",
      source="fszjax",  # who made the weights: fszjax | open_clip | big_vision
      model=""))  # the open_clip model name of a converted open_clip model
  return c


def _meta_section() -> ml_collections.ConfigDict:
  """``fewshot.meta`` of `adapt_config`: meta-training. Towers: of the whole image tower,
  by ProtoNets (evaluated as 'protonet_meta', 'protonet_meta_zeroshot' and, with
  ``fewshot.transfer``, the two-tower methods '*_meta' on the re-encoded splits) or from
  the zero-shot head (ANIL / MAML / FOMAML: the head adapts with head_steps x head_lr SGD in
  the inner loop, the tower learns in the outer loop; method 'anil' and 'anil_zeroshot').
  Conv-4: the whole network from scratch (any algorithm of `fszjax.fewshot.meta`)."""
  m = ml_collections.ConfigDict()
  m.enabled = True  # towers: meta-train the image tower (Conv-4 always meta-trains)
  # maml | fomaml | reptile | anil | metasgd | protonet (towers: protonet, anil, maml,
  # fomaml). Towers: ProtoNets trains the whole image tower on the metric it is evaluated
  # with; it beat ANIL from the zero-shot head on every split (BUILD_NOTES.md, "Transfer:
  # second round").
  m.algorithm = "protonet"
  # What the inner loop adapts: head | all | k (the last k blocks + head). Towers (ANIL / MAML /
  # FOMAML): head = evaluated on re-encoded features; k or all = the inner loop run on each
  # evaluation episode's images (transfer.finetune.episodes episodes).
  m.adapt = "head"
  # The "NwayKshot" tasks meta-trained on. A Glyphs class has one image per font, so the
  # support and query images of a task are always in different fonts.
  m.train_setting = "20way1shot"
  m.q_query = 2  # query examples per class of a meta-training task
  m.meta_batch = 4  # tasks per outer step
  # Outer steps. Towers: 400 beat 150 in every cell but one on the 1000-step recipe of
  # a820c04; on today's Glyphs towers meta-training changes the test cells by less than a
  # point either way (BUILD_NOTES.md, "Transfer: second round" and "third round").
  m.steps = 400
  # Towers: stroke-width jitter of the meta-training images (`fszjax.data.preprocess.
  # stroke_jitter`: probability of a 2x2 dilation or erosion per image); 0 = off.
  m.stroke = 0.0
  m.outer_lr = 3e-4  # Adam (SGD for Reptile) step size of the outer loop
  m.outer_schedule = "constant"  # constant | cosine (linear warmup, then decay to 0 at steps)
  m.warmup_steps = 0  # outer_schedule=cosine: warmup length
  m.first_order = False  # drop second-order terms of the meta-gradient
  m.remat = False  # jax.checkpoint each inner step (memory bounded in the inner steps)
  m.task_chunk = 0  # tasks vmapped together on a device (0: all); CPU: 4 is fastest
  m.devices = 0  # local devices sharing the meta-batch and evaluation (0: all; 1: none)
  # Conv-4 only (towers: the inner loop is head_steps x head_lr from the zero-shot head).
  m.inner_steps = 5  # inner SGD steps on the support set
  m.inner_lr = 0.4  # their step size (Meta-SGD: the initial learned step sizes)
  m.eval_inner_steps = 0  # inner steps at evaluation (0: inner_steps)
  m.eval_inner_lr = 0.0  # inner step size at evaluation (0: inner_lr)
  m.head_init = "zeros"  # zeros (any N-way at evaluation) | learned | prototype
  m.hidden = 64  # channels of each conv block
  m.layers = 4  # conv blocks
  m.norm = "batch"  # batch (per-task batch norm, no running stats) | none (bias)
  m.pool = "mean"  # features: mean over the final map | flatten (keeps where)
  m.formulation = "im2col"  # the 3x3 stride-2 convolution: im2col | patches | s2d | conv
  m.compute_dtype = "float32"  # matmul operands: float32 | bfloat16 (f32 accumulation)
  m.rotations = [0]  # class augmentation: [0, 90, 180, 270] makes 4 classes of each
  return m


def _transfer_section() -> ml_collections.ConfigDict:
  """``fewshot.transfer`` of `adapt_config`."""
  # Towers: adaptation with both towers on the frozen features (fszjax/fewshot/transfer.py):
  # proto_zs_adapt (head from zero-shot text embeddings + support prototypes, Proto-MAML
  # style, then SGD) and tip_adapter (training-free support cache + zero-shot logits).
  # Their hyper-parameters are chosen per setting on `val_split`, never on test splits: by
  # the lowest query log-loss (`transfer.select_on_val`) on cross-font episodes (support
  # and query in different fonts). Glyphs' val_classes holds characters the towers were
  # never trained on; a val split of train classes (Glyphs' val) takes its supports from
  # the train split (`towers.selection_pools`). proto_weight 1 with 0 steps = ProtoNets.
  return ml_collections.ConfigDict(dict(
      enabled=True,
      # The zero-shot share of each task scaled by the zero-shot classifier's
      # (chance-corrected) accuracy on that task's own support set, so unseen scripts
      # (where naming fails) fall back to the support set.
      gate=True,
      val_split="val_classes", val_episodes=300,  # selection split and its episodes per setting
      # With >= 2 shots per class the proto_weight of each task is chosen on its own support
      # set (leave-one-out log-loss over proto_weights, `transfer.support_cv_weight`); val
      # then chooses steps and lrs only. False: proto_weight from val for every setting.
      support_cv=True,
      proto_weights=[1.0, 0.75, 0.5, 0.25, 0.0], steps=[0, 10, 30, 100],  # proto_zs_adapt
      lrs=[2.0, 8.0],
      alphas=[2.0, 1.0, 0.5, 0.25], betas=[1.0, 3.0, 5.5, 10.0],  # tip_adapter
      finetune=_finetune_section()))


def _finetune_section() -> ml_collections.ConfigDict:
  """``fewshot.transfer.finetune``: per-episode fine-tuning of the image tower."""
  # Opt-in (fszjax/fewshot/tower_tuning.py): tower_finetune (the zero-shot + prototype head
  # at proto_weight, then SGD of the head and the last k blocks or the whole tower on each
  # support set: first-order Proto-MAML over the towers) and lp_ft (LP-FT: a linear probe of
  # lp_steps x lp_lr, then the same fine-tuning). Off by default: on the Glyphs towers both
  # lose to the frozen-feature methods (BUILD_NOTES.md, "Transfer: third round" and "fourth
  # round": whole-tower fine-tuning collapses on held-out fonts) and each
  # episode runs the tower forward and backward. adapts x steps x lrs chosen per setting on
  # val_episodes cross-font episodes of transfer.val_split by the lowest log-loss; evaluated
  # on the first `episodes` episodes of the other methods, task_chunk tasks at a time.
  return ml_collections.ConfigDict(dict(
      enabled=False, methods=["tower_finetune", "lp_ft"], adapts=["1", "all"], steps=[5, 10],
      lrs=[0.01, 0.05], proto_weight=1.0, lp_steps=100, lp_lr=1.0, episodes=100,
      val_episodes=50, task_chunk=10))


def _dg_section() -> ml_collections.ConfigDict:
  """``fewshot.dg`` of `adapt_config`."""
  # Towers: domain generalisation on held-out fonts. A linear feature adaptor (identity at
  # start) fine-tuned on the train split's fonts, by ERM and by MLDG (meta-train /
  # meta-test font split: alpha inner step, beta meta-test weight), then WiSE-FT of ERM's
  # adaptor with the identity at each of wise_alphas; evaluated zero-shot and few-shot
  # (`settings`) on `splits`.
  return ml_collections.ConfigDict(dict(
      enabled=True, splits=["test_fonts", "test_both"], settings=["5way1shot", "5way5shot"],
      steps=300, batch_size=256, lr=1e-3, mldg_alpha=0.1, mldg_beta=1.0,
      mldg_first_order=False, wise_alphas=[0.25, 0.5, 0.75]))


def adapt_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every key `fszjax adapt` and `fszjax bench adapt` read, at the values of
  configs/glyphs_fewshot.py (the pretrained towers of the embedded default); the Conv-4 keys
  (``fewshot.backbone='conv4'``, configs/glyphs_maml_conv4.py) at neutral values. `data` is
  the data section: dataset overrides over the model's own for the towers
  (`fszjax.data.defaults.data_overrides`), a whole data config for Conv-4."""
  c = ml_collections.ConfigDict()
  c.name = "glyphs_fewshot"
  c.seed = 0  # episode sampling, meta-training batches and initialisation
  # The pretrained towers: a pretraining workdir, one checkpoint, or a `fszjax convert`
  # directory (its config gives the model and, by default, the data). Towers only.
  c.init_from = ""
  c.data = data
  c.log_every = 25  # meta-training steps between log lines / metrics.jsonl rows
  # Meta-training checkpoints (W/checkpoints, W/meta_checkpoints): every save_every steps,
  # the last `keep`; a failed save: "stop" (exit 2, one line) or "retry" at the next save.
  # The keys the shared training loop (`fszjax.loop`) reads as in `pretrain_config`, at the
  # values meta-training has always used: synchronous saves, no best-checkpoint tracking
  # (best_metric "" = none; meta-training has no periodic evaluation, so it must stay ""),
  # and a logged loss above spike_factor x the recent median (or NaN) stops the run.
  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=50, keep=2, on_save_error="stop", async_save=False, best_metric="",
      best_mode="max", spike_factor=10.0))
  c.progress = True  # meta-training progress: a bar on a terminal, a closing line in a log

  f = c.fewshot = ml_collections.ConfigDict()
  f.backbone = "towers"  # towers (pretrained two-tower model) | conv4 (trained from scratch)
  f.splits = []  # evaluation splits; [] = the dataset's test splits (Glyphs: test_classes,
  #                test_scripts, test_fonts, test_both; else data.eval_splits). Conv-4: listed
  f.settings = ["5way1shot", "5way5shot", "20way1shot"]  # evaluated "NwayKshot" tasks
  f.episodes = 600  # episodes per split and setting
  f.q_query = 5  # query examples per class of an evaluation episode
  f.episode_batch = 200  # episodes run together (one vmap / jit call)
  f.max_examples = 0  # examples read per evaluation split; 0 = the whole split
  f.max_train_examples = 0  # train-split examples for DG and meta-training; 0 = all
  # Towers: zero-shot head adaptation (zs_head_adapt; also the ANIL inner loop): SGD steps
  # on the support set and their step size; and the linear probe from zeros.
  f.head_steps = 10
  f.head_lr = 0.5
  f.probe_steps = 100
  f.probe_lr = 1.0
  f.image_size = 28  # Conv-4: images resized to this side (the MAML paper's Omniglot)
  f.eval_chunk = 0  # Conv-4 evaluation: lax.map over groups of this many tasks (0: one vmap)

  f.meta = _meta_section()  # meta-training
  f.transfer = _transfer_section()  # towers: both towers on frozen features
  f.dg = _dg_section()  # towers: domain generalisation on held-out fonts

  # `fszjax bench adapt` only (meta-training throughput on synthetic Conv-4 tasks): timed
  # steps (after the compiling call and `warmup` more), the step strategy (meta_batch: one
  # jitted meta-step; task_loop: jitted per-task gradients in a Python loop) and the
  # channels of the synthetic images.
  c.bench = ml_collections.ConfigDict(dict(steps=10, warmup=1, strategy="meta_batch", channels=1))
  return c


# Keys whose absence from a saved config.json (a workdir or converted directory written
# before the key existed, or a config that deleted it) means another value than today's
# default: `fszjax.config` fills a missing key with its value here, any other missing key
# with its default.
SAVED_WITHOUT = {
    "model.image.stem": (),  # the plain patch embedding (converted models, B/16 configs)
    "eval.splits": (),  # the data section's eval_splits
}
