"""fszjax: zero-shot contrastive pretraining and few-shot, domain-robust fine-tuning in JAX."""

__version__ = "0.1.0"


def load(path, **kwargs):
  """Loads a fszjax model (workdir, checkpoint or converted directory); see `fszjax.inference`."""
  from fszjax import inference  # lazy: keeps `import fszjax` light

  return inference.load(path, **kwargs)
