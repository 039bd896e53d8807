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

from fszjax import config_defaults
from fszjax.data.defaults import tfds_data_config


def get_config(arg=None):
  del arg
  data = tfds_data_config("coco_captions", image_size=224, text_key="captions/text",
                          label_key=None, eval_splits=("val",))
  data.max_text_len = 64
  data.tokenizer.vocab_size = 32_000
  data.num_workers = 8
  c = config_defaults.pretrain_config(data)
  c.name = "siglip_b16"
  c.model.update(dict(embed_dim=768, dtype="bfloat16", scan_layers=True, logit_scale_init=10.0))
  # Full remat of each block: at 128 examples per chip "none" needs ~30 GB of temporaries
  # per chip (`fszjax compile`, BUILD_NOTES.md "Ahead-of-time compilation").
  c.model.remat = "full"
  # B/16 shapes come from the variant names (width/depth/... 0 = the variant's).
  c.model.image.update(dict(
      variant="B/16", width=0, depth=0, mlp_dim=0, num_heads=0, patch_size=16,
      image_size=224, channels=3, proj_bias=True, act="gelu_tanh"))
  c.model.image.stem = ()  # the plain patch embedding
  c.model.text.update(dict(
      variant="B", width=0, depth=0, mlp_dim=0, num_heads=0, vocab_size=32_000, max_len=64,
      pool="last", causal=False, proj_bias=True, act="gelu_tanh"))

  c.loss = "siglip"
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  c.batch_size = 32_768
  c.total_steps = 100_000
  c.optim.update(dict(lr=1e-3, warmup_steps=5_000))

  c.log_every = 50
  c.eval_every = 5_000
  c.eval.update(dict(splits=("val",), max_examples=10_000, batch_size=1024))
  c.checkpoint.update(dict(save_every=1_000, keep=3, best_metric=""))
  return c
