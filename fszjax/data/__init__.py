"""Data: TFDS builders (Glyphs, users' own folders and captions), tokenizer, grain pipelines.

Heavy dependencies (tensorflow_datasets, grain, sentencepiece) are imported lazily by the
submodules that need them, so `import fszjax.data` stays light.
"""
