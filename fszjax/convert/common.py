"""Shared pieces of the weight converters: reading weight files safely, flat param trees,
scanned/unscanned block layouts, and writing a converted model as a fszjax workdir.

A converted directory has the layout of a pretraining workdir, so `fszjax eval`,
``config.init_from`` and `fszjax.load` accept it:
  OUT/config.json                 the full fszjax config (model + data sections)
  OUT/checkpoints/0/              Orbax checkpoint: TrainState (converted params, fresh
                                  optimizer state for ``config.optim``, step 0) + config
  OUT/tokenizer/...               the tokenizer file the config points at
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import linen as nn, traverse_util

from fszjax import checkpoint as ckpt_lib, config as config_lib, config_defaults, pretrain, sharding
from fszjax.data import defaults
from fszjax.data.defaults import glyphs_data_config
from fszjax.errors import UserError
from fszjax.models.two_tower import build_model


class ConvertError(UserError):
  """Weights, architecture or output directory are wrong; the message names the fix."""


Flat = dict[str, np.ndarray]

# Non-weight entries some checkpoints carry (OpenAI's TorchScript state dicts, buffers).
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


# ----------------------------------------------------------------------------- reading


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> Flat:
  """A safetensors file as ``{name: array}`` (memory-mapped; BF16 via ml_dtypes).

  Parsed directly (8-byte header length, JSON header, raw little-endian data) because
  safetensors' numpy backend cannot represent bfloat16.
  """
  try:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n <= 0 or n > os.path.getsize(path):
        raise ValueError("bad header length")
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path} is not a readable safetensors file ({e}); pass the .safetensors "
                       "or .pt/.bin weights open_clip saved") from None
  if not isinstance(header, dict):
    raise ConvertError(f"{path} is not a safetensors file (its header is not a JSON object); "
                       "pass the .safetensors or .pt/.bin weights open_clip saved")
  size = os.path.getsize(path) - 8 - n
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
      start, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ConvertError(f"{path}: tensor {name} has a malformed header entry ({info!r:.80}); "
                         "the file is damaged - download or export it again") from None
    if dtype == "BF16":
      np_dtype = np.dtype(ml_dtypes.bfloat16)
    elif dtype in _SAFETENSORS_DTYPES:
      np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
    else:
      raise ConvertError(f"{path}: tensor {name} has dtype {dtype}, which fszjax cannot read; "
                         "re-save the weights in float32/float16/bfloat16")
    need = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if end > size:
      raise ConvertError(f"{path}: tensor {name} (shape {shape}, {dtype}) needs bytes {start}..{end} "
                         f"but the data ends at {size}; the file is truncated - download or export "
                         "it again")
    if end - start != need:
      raise ConvertError(f"{path}: tensor {name} should hold shape {shape} ({dtype}, {need} bytes) "
                         f"but its data is {end - start} bytes; the file is damaged - download or "
                         "export it again")
    out[name] = data[start:end].view(np_dtype).reshape(shape)
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # torch: optional, only to read .pt/.bin checkpoints

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_torch(path: str) -> Flat:
  """A PyTorch state dict (``.pt``/``.bin``/``.pth``) read with ``weights_only=True``.

  Training checkpoints (``{"state_dict": ...}``) and DDP ``module.`` prefixes are
  unwrapped. Pickles that need arbitrary code (custom classes, TorchScript) are refused.
  """
  try:
    import torch  # torch: optional, only to read .pt/.bin checkpoints
  except ImportError:
    raise ConvertError(f"reading {path} needs PyTorch: `pip install fszjax[interop]`, or convert "
                       "the weights to .safetensors") from None
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"PK\x03\x04":
    with zipfile.ZipFile(path) as z:
      if any(n.endswith("/constants.pkl") or n.endswith("code/__torch__.py") for n in z.namelist()):
        raise ConvertError(f"{path} is a TorchScript archive (e.g. OpenAI's original .pt), which "
                           "needs code execution to read; load it once with open_clip and save "
                           "model.state_dict() with safetensors.torch.save_file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "unsafe pickle"
    raise ConvertError(f"refusing to unpickle {path}: it needs arbitrary code ({first}); fszjax "
                       "reads only plain tensors - save the state dict with "
                       "safetensors.torch.save_file(model.state_dict(), 'w.safetensors')") from None
  except (RuntimeError, OSError, EOFError) as e:
    raise ConvertError(f"cannot read {path} as PyTorch weights ({str(e).splitlines()[0][:160]}); "
                       "pass a .safetensors or torch.save'd state dict") from None
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                       "model.state_dict() instead of the model")
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[str(k)] = _torch_to_numpy(v)
  if out and all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out


def read_weights(path: str) -> Flat:
  """``{name: array}`` from a .safetensors, .npz or PyTorch file (never arbitrary pickle)."""
  if not os.path.isfile(path):
    raise ConvertError(f"weights file {path} not found; pass --weights with an existing file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".npz") or path.endswith(".npy"):
    return read_npz(path)
  return read_torch(path)


def _npz_member_shape(z, key: str) -> str:
  """The shape and dtype an .npz member's header promises ("" if unreadable)."""
  try:
    with z.zip.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = np.lib.format._read_array_header(f, version)  # pylint: disable=protected-access
    return f"shape {tuple(shape)} {dtype}"
  except Exception:  # pylint: disable=broad-except
    return ""


def read_npz(path: str) -> Flat:
  """An .npz archive as ``{name: array}`` (``allow_pickle=False``: object arrays refused).

  A truncated or damaged archive is a one-line `ConvertError` naming the tensor and the
  shape its header promises."""
  try:
    z = np.load(path, allow_pickle=False)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ConvertError(f"{path} is not a readable .npz ({str(e).splitlines()[0][:120]}); the file "
                       "is truncated or not an .npz - pass the big_vision checkpoint .npz") from None
  if not isinstance(z, np.lib.npyio.NpzFile):
    return {"arr_0": z}  # a single .npy array
  out = {}
  with z:
    for k in z.files:
      try:
        out[k] = z[k]
      except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
          raise ConvertError(f"refusing to read {path}: tensor {k}: {str(e).splitlines()[0][:160]}; "
                             "save the params with numeric arrays only (np.savez)") from None
        raise ConvertError(f"{path}: tensor {k} ({_npz_member_shape(z, k) or 'unknown shape'}) "
                           f"cannot be read ({str(e).splitlines()[0][:100]}); the file is truncated "
                           "or damaged - download or export it again") from None
      except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ConvertError(f"{path}: tensor {k} ({_npz_member_shape(z, k) or 'unknown shape'}) "
                           f"cannot be read ({str(e).splitlines()[0][:100]}); the file is truncated "
                           "or damaged - download or export it again") from None
  return out


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping) -> Flat:
  """Nested dict -> ``{"a/b/c": leaf}``."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{"a/b/c": leaf}`` -> nested dict."""
  return traverse_util.unflatten_dict(flat, sep="/")


_BLOCK = re.compile(r"^(.*)/encoder/block_(\d+)/(.*)$")
_BLOCKS = re.compile(r"^(.*)/encoder/blocks/(.*)$")


def stack_blocks(flat: Flat) -> Flat:
  """Unscanned ``.../encoder/block_i/...`` -> scanned ``.../encoder/blocks/...`` (axis 0)."""
  groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
  out = {}
  for k, v in flat.items():
    m = _BLOCK.match(k)
    if m:
      groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
    else:
      out[k] = v
  for (tower, rest), layers in groups.items():
    out[f"{tower}/encoder/blocks/{rest}"] = np.stack([layers[i] for i in range(len(layers))])
  return out


def unstack_blocks(flat: Flat) -> Flat:
  """Scanned ``.../encoder/blocks/...`` -> ``.../encoder/block_i/...``."""
  out = {}
  for k, v in flat.items():
    m = _BLOCKS.match(k)
    if m:
      for i in range(v.shape[0]):
        out[f"{m.group(1)}/encoder/block_{i}/{m.group(2)}"] = np.asarray(v[i])
    else:
      out[k] = v
  return out


def expected_param_shapes(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{path: (shape, dtype)}`` of the params `build_model(config.model)` creates."""


  model = build_model(config.model)
  img_shape, tok_shape = pretrain.input_shapes(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(img_shape, jnp.float32),
                                               jnp.zeros(tok_shape, jnp.int32))["params"])
  return {k: (tuple(v.shape), v.dtype) for k, v in flatten(nn.unbox(abstract)).items()}


def fit_to_model(flat: Flat, config, source: str) -> Flat:
  """Casts converted params to the model's dtypes and checks every path and shape (scanned
  layouts are stacked when ``config.model.scan_layers``)."""
  if config.model.scan_layers:
    flat = stack_blocks(flat)
  expected = expected_param_shapes(config)
  for k, (shape, _) in expected.items():
    if k not in flat:
      raise ConvertError(f"{source}: the converted params lack {k} {shape}; the architecture "
                         "options are not supported by this converter")
    if tuple(flat[k].shape) != shape:
      raise ConvertError(f"{source}: {k} converts to shape {tuple(flat[k].shape)} but the fszjax "
                         f"model expects {shape}; the architecture options are not supported")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise ConvertError(f"{source}: converted param {extra[0]} has no place in the fszjax model; "
                       "the architecture options are not supported by this converter")
  return {k: np.asarray(flat[k]).astype(expected[k][1]) for k in expected}


# ----------------------------------------------------------------------------- configs


def base_config():
  """The full default fszjax config (every key `fszjax pretrain/eval` read), to receive a
  converted model and data section."""
  cfg = config_defaults.pretrain_config(glyphs_data_config())
  # Fine-tuning defaults for a pretrained model (the glyphs values suit training from scratch).
  cfg.optim.lr, cfg.optim.b2, cfg.optim.eps = 1e-5, 0.98, 1e-6
  cfg.checkpoint.best_metric = ""
  return cfg


def converted_data_config(image_size: int, mean, std, max_len: int, tokenizer: dict,
                          templates=None):
  """A data section for an imported model: RGB at the model's resolution and normalisation,
  its text length and tokenizer. The dataset defaults to imagenet2012; pick another with
  ``--config.data.name=...`` when evaluating."""

  d = defaults.tfds_data_config("imagenet2012", image_size=int(image_size))
  d.mean, d.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
  d.max_text_len = int(max_len)
  with d.tokenizer.ignore_type():
    for k, v in tokenizer.items():
      d.tokenizer[k] = v
  if templates is not None:
    d.prompt_templates = tuple(templates)
  return d


def inference_section(resize_mode: str, interpolation: str, source: str, model: str = ""):
  """How `fszjax.load(...).preprocess` prepares raw images (not read by training/eval; the
  keys of ``config.inference`` in fszjax/config_defaults.py)."""

  return ml_collections.ConfigDict(dict(resize_mode=resize_mode, interpolation=interpolation,
                                        source=source, model=model))


# ----------------------------------------------------------------------------- writing


def _host_device():
  """The device a conversion runs on: the host CPU when JAX has one (host memory is the
  largest and a checkpoint written from one device restores onto any mesh)."""

  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return jax.devices()[0]


def save_converted(out_dir: str, config, flat_params: Flat,
                   extra_files: Mapping[str, Callable[[str], Any]] = (),
                   overwrite: bool = False) -> str:
  """Writes ``config`` and a step-0 TrainState holding ``flat_params`` as a fszjax workdir.

  Everything goes to a temporary sibling directory first and is renamed into place at the
  end, so a failure leaves no half-written output. ``extra_files`` maps a relative path
  to a writer ``fn(abs_path)`` (e.g. the tokenizer). Returns the absolute output path.
  """


  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    if not overwrite:
      raise ConvertError(f"{out_dir} already exists and is not empty; pass a new --out or "
                         "--overwrite")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    for rel, writer in dict(extra_files).items():
      path = os.path.join(tmp, rel)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      writer(path)
    mesh = sharding.make_mesh(1, 1, 1, devices=[_host_device()])
    rules = sharding.rules_from_config(config)
    abstract = pretrain.abstract_train_state(config, mesh, rules)
    targets = flatten(abstract.params)
    if set(targets) != set(flat_params):
      missing = sorted(set(targets) ^ set(flat_params))[0]
      raise ConvertError(f"converted params and the model disagree at {missing}; check the config")
    params = unflatten({k: jax.device_put(np.asarray(v, targets[k].dtype), targets[k].sharding)
                        for k, v in flat_params.items()})
    tx, _ = pretrain.make_optimizer(config.optim, config.total_steps,
                                    tuple(config.optim.freeze or ()))
    opt_state = jax.jit(tx.init, out_shardings=sharding.shardings_of(abstract.opt_state))(params)
    rng = jax.device_put(np.asarray(jax.random.key_data(jax.random.key(int(config.seed)))),
                         abstract.rng.sharding)
    step = jax.device_put(np.zeros((), np.int32), abstract.step.sharding)
    state = pretrain.TrainState(step=step, params=params, opt_state=opt_state, rng=rng)
    ckpt = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False, keep=1)
    ckpt.save(0, state, config=config, force=True)
    ckpt.close()
    config_lib.save_config(config, os.path.join(tmp, "config.json"))
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
