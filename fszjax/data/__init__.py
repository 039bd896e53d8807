"""Data: finding datasets (sources, glyph_source), preprocessing (shared with inference), the
grain training pipeline, whole splits as arrays, the tokenizer of a data config (vocab),
episodes, and the TFDS builders (Glyphs, users' own folders and captions).

TensorFlow Datasets is imported inside the functions that open or build datasets, so
importing these modules works where only `fszjax bench` runs (no TFDS there).
"""
