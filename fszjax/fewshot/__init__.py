"""Few-shot, domain-robust adaptation: jitted inner/outer loops over task meta-batches.

- `inner`: the `lax.scan` inner loop, adaptation masks, heads (zero-shot, prototype, zeros).
- `meta`: MAML, FOMAML, Reptile, ANIL, Meta-SGD, ProtoNets; sharded meta-training step.
- `conv4`: the Conv-4 Omniglot backbone in functional JAX (several conv formulations).
- `baselines`: linear probe, fine-tuning, nearest prototype (features or pixels).
- `dg`: MLDG, leave-one-domain-out, WiSE-FT.
- `bench`: `fszjax bench adapt` (tasks/s).

Submodules import only jax / numpy (optax when a step is built); nothing here needs
grain, tensorflow-datasets or ml_collections.
"""

from fszjax.fewshot import baselines, conv4, dg, inner, meta  # noqa: F401
