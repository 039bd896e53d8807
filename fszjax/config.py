"""Configs: ml_collections `get_config()` files, `--config.key=value` overrides, validation.

    config = load_config("configs/glyphs.py", ["--config.loss=clip", "--config.mesh.data=2"])

A config file may take an argument: ``configs/foo.py:arg`` calls ``get_config("arg")``.
Every key is in `fszjax.config_defaults` (`pretrain_config` for a config with a ``model``
section, `adapt_config` for one with a ``fewshot`` section): an unknown key gives a
one-line error with the closest valid keys, and a key a saved config.json lacks is filled
from there, so code reads every key as an attribute (``config.optim.wd``, no
``.get(key, default)``).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import os
import sys
from typing import Iterable, Sequence

import ml_collections

from fszjax import config_defaults
from fszjax.errors import UserError

# The command-line prefix of a config override: ``--config.optim.lr=1e-3``.
OVERRIDE_PREFIX = "--config."

# Values of ``config.loss`` (the contrastive losses of `fszjax.losses`).
LOSSES = ("clip", "siglip")

# Values of ``config.fewshot.backbone`` (`fszjax adapt`).
BACKBONES = ("towers", "conv4")


class ConfigError(UserError):
  """A config file or override is wrong; the message names the fix."""


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Splits ``--config.a.b=v`` / ``--config.a.b v`` pairs from the other arguments."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith(OVERRIDE_PREFIX):
      body = a[len(OVERRIDE_PREFIX):]
      if "=" in body:
        k, v = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise SystemExit(f"fszjax: error: {a} needs a value: {a}=VALUE")
        k, v = body, argv[i + 1]
        i += 1
      overrides.append((k, v))
    else:
      rest.append(a)
    i += 1
  return overrides, rest


def _flat_keys(cfg, prefix=""):
  out = []
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    out.append(key)
    if isinstance(v, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
      out.extend(_flat_keys(v, key + "."))
  return out


@contextlib.contextmanager
def _siblings_importable(config_dir: str):
  """Lets a config file import the configs next to it as Python (``import siglip_b16``):
  `config_dir` is on `sys.path` while it runs, and the sibling modules it imported are
  forgotten afterwards (another directory may hold a config of the same name)."""
  before = set(sys.modules)
  sys.path.insert(0, config_dir)
  try:
    yield
  finally:
    sys.path.remove(config_dir)
    for name in set(sys.modules) - before:
      file = getattr(sys.modules[name], "__file__", None)
      if file and os.path.dirname(os.path.abspath(file)) == config_dir:
        del sys.modules[name]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found; pass e.g. --config configs/glyphs.py")
  with _siblings_importable(os.path.dirname(os.path.abspath(path))):
    mod_spec = importlib.util.spec_from_file_location(
        "fszjax_config_" + os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config() function")
  cfg = module.get_config(arg) if arg else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg)
  return cfg


def _parse_value(raw: str, current):
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected true/false, got {raw!r}")
  if isinstance(current, int) and not isinstance(current, bool):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"expected an integer, got {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"expected a number, got {raw!r}") from None
  if isinstance(current, str):
    return raw
  if raw.lower() == "none":
    return None
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _parent(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """``(group, leaf name)`` of dotted `key` in `cfg`; an unknown key is a one-line error
  naming the closest keys."""
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts):
    valid = list(node.keys())
    if part not in valid:
      full = ".".join(parts[: i + 1])
      close = difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.5)
      hint = f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""
      raise ConfigError(f"unknown config key config.{full}{hint}")
    if i < len(parts) - 1:
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(parts[:i + 1])} is not a group of keys")
  return node, parts[-1]


def set_value(cfg: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets existing dotted `key` of `cfg` to a Python value (an override from code)."""
  node, leaf = _parent(cfg, key)
  with node.ignore_type():
    node[leaf] = value


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets existing dotted `key` of `cfg` from command-line text, parsed as its type."""
  node, leaf = _parent(cfg, key)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      raise ConfigError(f"config.{key} is a group; set its keys, e.g. --config.{key}.<key>=...") from None
    node[leaf] = ml_collections.ConfigDict(value)
    return
  try:
    value = _parse_value(raw, current)
  except ConfigError as e:
    raise ConfigError(f"--config.{key}: {e}") from None
  with node.ignore_type():
    node[leaf] = value


def load_config(spec: str, overrides: Iterable[str | tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Loads a config file (or a saved ``config.json``) and applies overrides. A config file's
  keys are checked against `fszjax.config_defaults` (`check_keys`); the keys a config lacks
  (a config.json written before they existed) are filled from there (`fill_defaults`)."""
  if spec.endswith(".json"):
    if not os.path.exists(spec):
      raise ConfigError(f"config {spec!r} not found")
    with open(spec) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
    resolve_paths(cfg, os.path.dirname(os.path.abspath(spec)))
  else:
    cfg = load_config_file(spec)
    check_keys(cfg, spec.partition(":")[0])
  fill_defaults(cfg)
  apply_overrides(cfg, overrides)
  validate(cfg)
  return cfg


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Iterable[str | tuple[str, str]]) -> None:
  """Applies ``--config.a.b=v`` strings or ``(key, raw value)`` pairs, in order."""
  pairs = []
  for o in overrides:
    if isinstance(o, str):
      p, _ = split_overrides([o])
      pairs.extend(p)
    else:
      pairs.append(o)
  for k, v in pairs:
    apply_override(cfg, k, v)


# Sections of a config whose keys the base does not fix: the data section (every key in
# fszjax/data/defaults.py, checked by the data pipeline; an adapt config's data section
# holds only the dataset keys it overrides).
FREE_FORM = ("data",)


def defaults_for(cfg) -> tuple[ml_collections.ConfigDict | None, str]:
  """``(defaults, their name)`` of a config: `fszjax.config_defaults.pretrain_config` for a
  pretraining config (one with a ``model`` section), `adapt_config` for an adaptation config
  (a ``fewshot`` section), ``(None, "")`` for anything else."""
  if "model" in cfg:
    return config_defaults.pretrain_config(ml_collections.ConfigDict()), "pretrain_config"
  if "fewshot" in cfg:
    return config_defaults.adapt_config(ml_collections.ConfigDict()), "adapt_config"
  return None, ""


def check_keys(cfg, path: str) -> None:
  """A config file may only hold the keys of its defaults (`defaults_for`; the `FREE_FORM`
  sections aside); an unknown key is a one-line error naming the closest valid key."""
  defaults, name = defaults_for(cfg)
  if defaults is None:
    return
  known = _flat_keys(defaults)
  for key in _flat_keys(cfg):
    if key in known or key.split(".")[0] in FREE_FORM:
      continue
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean config.{close[0]}?" if close else ""
    raise ConfigError(f"{path}: unknown config key config.{key}{hint} "
                      f"(every key is in fszjax/config_defaults.py, {name})")


def fill_defaults(cfg) -> None:
  """Adds, in place, every key of its defaults (`defaults_for`) that `cfg` lacks (the
  `FREE_FORM` sections aside): a saved config.json written before the key existed, or a
  converted model's config. A key listed in `config_defaults.SAVED_WITHOUT` gets the value
  its absence meant, any other its default; code then reads every key as an attribute."""
  defaults, _ = defaults_for(cfg)
  if defaults is not None:
    _fill(cfg, defaults, "")


def _fill(node, defaults, prefix: str) -> None:
  for k, v in defaults.items():
    key = prefix + k
    if key in FREE_FORM:
      continue
    if isinstance(v, ml_collections.ConfigDict):
      if k not in node:
        node[k] = ml_collections.ConfigDict()
      if isinstance(node[k], ml_collections.ConfigDict):
        _fill(node[k], v, key + ".")
    elif k not in node:
      node[k] = config_defaults.SAVED_WITHOUT.get(key, v)


def validate(cfg) -> None:
  """Cheap structural checks with one-line errors."""
  if "model" in cfg:
    _validate_pretrain(cfg)
  if "fewshot" in cfg and cfg.fewshot.backbone not in BACKBONES:
    raise ConfigError(f"config.fewshot.backbone={cfg.fewshot.backbone!r}: use one of {BACKBONES}")


def _validate_pretrain(cfg) -> None:
  if cfg.loss not in LOSSES:
    raise ConfigError(f"config.loss={cfg.loss!r}: use one of {LOSSES}")
  if cfg.loss == "siglip" and not cfg.model.logit_bias:
    raise ConfigError("config.loss=siglip needs a logit bias: set --config.model.logit_bias=True")
  if cfg.batch_size <= 0:
    raise ConfigError(f"config.batch_size={cfg.batch_size} must be positive")
  d, m = cfg.data, cfg.model
  # The data section is free-form (fszjax/data/defaults.py): a key of it may be absent.
  for key in ("image_size", "channels"):
    mv, dv = m.image[key], d.get(key, None)
    if mv and dv and mv != dv:
      raise ConfigError(f"config.model.image.{key}={mv} but config.data.{key}={dv}; "
                        "set both to the same value")
  if d.get("max_text_len", 0) and d.max_text_len > m.text.max_len:
    raise ConfigError(f"config.data.max_text_len={d.max_text_len} exceeds "
                      f"config.model.text.max_len={m.text.max_len}; raise the latter")
  if cfg.grad_accum > 1 and cfg.batch_size % cfg.grad_accum:
    raise ConfigError(f"config.batch_size={cfg.batch_size} is not divisible by "
                      f"config.grad_accum={cfg.grad_accum}")


# Config keys holding file-system paths. In a saved config.json a path inside the
# config's own directory is stored relative to it (the tokenizer copied into a workdir),
# any other path absolute; `load_config` resolves relative paths against the directory of
# the config.json, so a workdir works from any current directory and after being copied.
PATH_KEYS = ("init_from", "data.data_dir", "data.tokenizer.path", "data.tokenizer.cache_dir",
             "data.class_names_file")


def _get_path(node, dotted: str):
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return None, None
    parent, node = node, node[part]
  return parent, node


def _path_nodes(d):
  """(parent, key, value) of every path-valued key of config dict `d` (mixture entries too)."""
  out = []
  for dotted in PATH_KEYS:
    parent, value = _get_path(d, dotted)
    if isinstance(value, str) and value:
      out.append((parent, dotted.rsplit(".", 1)[-1], value))
  data = d.get("data", None) if hasattr(d, "get") else None
  for comp in (data.get("mixture", None) or ()) if hasattr(data, "get") else ():
    for key in ("data_dir", "class_names_file"):
      if hasattr(comp, "get") and isinstance(comp.get(key, None), str) and comp[key]:
        out.append((comp, key, comp[key]))
  return out


def portable_dict(cfg, config_dir: str) -> dict:
  """The config as a JSON dict with its paths (`PATH_KEYS`) absolute, or relative to
  `config_dir` when they lie inside it."""
  d = json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)
  root = os.path.abspath(config_dir)
  for parent, key, value in _path_nodes(d):
    absolute = os.path.abspath(os.path.expanduser(value))
    inside = os.path.commonpath([root, absolute]) == root
    parent[key] = os.path.relpath(absolute, root) if inside else absolute
  return d


def resolve_paths(cfg, base_dir: str) -> None:
  """Makes the relative paths of a loaded config absolute, in place: relative to `base_dir`
  (the directory of its config.json). Configs saved before paths were stored this way hold
  paths relative to the directory they were run from: when only that reading exists, it
  is kept. An absolute tokenizer path that no longer exists (a copied converted directory)
  falls back to ``base_dir/tokenizer/<its file name>``."""
  base_dir = os.path.abspath(base_dir)
  for parent, key, value in _path_nodes(cfg):
    value = os.path.expanduser(value)
    if os.path.isabs(value):
      if key == "path" and not os.path.exists(value):
        moved = os.path.join(base_dir, "tokenizer", os.path.basename(value))
        if os.path.exists(moved):
          parent[key] = moved
      continue
    here = os.path.join(base_dir, value)
    if not os.path.exists(here) and os.path.exists(value):
      here = os.path.abspath(value)  # an older config.json: relative to where it was run
    with parent.ignore_type() if hasattr(parent, "ignore_type") else contextlib.nullcontext():
      parent[key] = here


def save_config(cfg, path: str) -> None:
  """Writes `cfg` as JSON to `path` with portable paths (see `portable_dict`)."""
  d = portable_dict(cfg, os.path.dirname(os.path.abspath(path)))
  with open(path, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
