"""Weight interop: import open_clip and big_vision checkpoints, export to open_clip.

  open_clip.py    open_clip ViT CLIP <-> fszjax (import + export)
  big_vision.py   big_vision two-tower .npz (SigLIP, LiT) -> fszjax
  common.py       safe weight readers, param-tree helpers, writing a converted workdir
  cli.py          `fszjax convert ...`
"""
