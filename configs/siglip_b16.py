"""SigLIP ViT-B/16 (sigmoid loss) for TPU pods / GPU clusters on a TFDS image-text dataset.

    fszjax pretrain --config configs/siglip_b16.py --workdir gs://bucket/siglip_b16 \
        --config.data.name=coco_captions
    fszjax bench pretrain --config configs/siglip_b16.py --config.batch_size=512

Shapes follow the SigLIP paper's B/16: 224px, learned position embedding, MAP pooling,
a bidirectional B-sized text tower over 64 SentencePiece tokens, 768-d embeddings.
The parameters and optimizer state are FSDP-sharded over all devices by default (mesh
fsdp=-1). Sized for a TPU v5e-256 slice (global batch 32k = 128 per chip, 2.4 GiB per
chip); v5e-64 is the smallest v5e slice that holds 32k (512 per chip, 9.2 GiB). Check any
slice before booking it: ``fszjax compile --config configs/siglip_b16.py --topology v5e:16x16``.
"""

import ml_collections

from fszjax.data.defaults import tfds_data_config


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "siglip_b16"
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 768
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.attn_impl = ""  # "cudnn" for cuDNN flash attention on NVIDIA GPUs
  c.model.scan_layers = True
  # Full remat of each block: at 128 examples per chip "none" needs ~30 GB of temporaries
  # per chip (`fszjax compile`, BUILD_NOTES.md "Ahead-of-time compilation").
  c.model.remat = "full"
  c.model.logit_scale_init = 10.0
  c.model.logit_scale_max = 100.0
  c.model.logit_bias = True
  c.model.logit_bias_init = -10.0
  c.model.image = ml_collections.ConfigDict(dict(
      variant="B/16", width=0, depth=0, mlp_dim=0, num_heads=0, patch_size=16,
      image_size=224, channels=3, pool="map", posemb="learn", ln_pre=False,
      final_ln_after_pool=False, patch_bias=True, proj=True, proj_bias=True, act="gelu_tanh",
      ln_eps=1e-6))
  c.model.text = ml_collections.ConfigDict(dict(
      variant="B", width=0, depth=0, mlp_dim=0, num_heads=0, vocab_size=32_000, max_len=64,
      pool="last", causal=False, proj=True, proj_bias=True, act="gelu_tanh", ln_eps=1e-6,
      pad_id=0))

  c.loss = "siglip"
  c.loss_chunked = True
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.sharding_rules = [
      ["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", "tensor"], ["heads", "tensor"],
      ["kv", None], ["vocab", None], ["layers", None], ["norm", None], ["seq", None],
      ["patch", None], ["proj", None], ["act_seq", None], ["act_embed", None],
      ["act_mlp", "tensor"], ["act_heads", "tensor"], ["act_kv", None]]

  c.batch_size = 32_768
  c.grad_accum = 1
  c.total_steps = 100_000
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, wd=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=5_000, schedule="cosine",
      min_lr_ratio=0.0, clip_norm=1.0, freeze=[]))

  c.data = tfds_data_config("coco_captions", image_size=224, text_key="captions/text",
                            label_key=None, eval_splits=("val",))
  c.data.max_text_len = 64
  c.data.tokenizer.vocab_size = 32_000
  c.data.num_workers = 8

  c.log_every = 50
  c.eval_every = 5_000
  c.eval = ml_collections.ConfigDict(dict(splits=("val",), max_examples=10_000, batch_size=1024))
  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=1_000, keep=3, best_metric="", best_mode="max", async_save=True,
      on_save_error="stop", spike_factor=10.0))  # README "Faults and recovery"
  c.progress = True
  c.init_from = ""
  c.init_keys = ""
  return c
