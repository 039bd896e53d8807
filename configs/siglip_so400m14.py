"""SigLIP So400m/14 at 224 px (the shape-optimised ViT of "Getting ViT in Shape", as
big_vision's SigLIP So400m/14 224 checkpoint): a 27-layer, 1152-wide image tower
(MLP 4304, 16 heads, 14-px patches, MAP pooling), a text tower of the same shape over
16 SentencePiece tokens (vocabulary 32k), 1152-d embeddings; sigmoid loss.

Defaults sized for a TPU v6e-256 slice (`fszjax compile --config configs/siglip_so400m14.py
--topology v6e:16x16`, numbers in BUILD_NOTES.md "Ahead-of-time compilation"): global batch
32k (128 per chip), parameters and optimizer moments FSDP-sharded 128 ways (data=2 x
fsdp=128), full rematerialisation of each block.

    fszjax pretrain --config configs/siglip_so400m14.py --workdir gs://bucket/so400m
"""

import siglip_b16  # configs/siglip_b16.py (the config loader puts configs/ on the path)


def get_config(arg=None):
  c = siglip_b16.get_config(arg)
  c.name = "siglip_so400m14"
  c.model.embed_dim = 1152
  c.model.remat = "full"
  c.model.image.update(dict(variant="So400m/14", patch_size=14, image_size=224))
  c.model.text.update(dict(variant="So400m", max_len=16))
  c.data.max_text_len = 16
  # The 1152-wide embedding splits over at most 128 fsdp shards with whole rows of 9
  # (1152 = 2^7 x 9): on 256 chips, two data-parallel halves of 128-way FSDP.
  c.mesh.update(dict(data=2, fsdp=-1, tensor=1))
  c.batch_size = 32_768
  c.eval.batch_size = 512
  return c
