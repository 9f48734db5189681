"""Model checkpoints: config + parameters + tokenizer in one folder.

    folder/
      model_config.json       ModelConfig.to_dict()
      params.safetensors      every parameter, keyed by its path "layer_0/attn/q/kernel"
      tokenizer_config.json   (+ tokenizer.json for BPE), see training/tokenizers.py
      checkpoints/<step>/     orbax training state (training runs only)

`save_checkpoint` writes the first three; a training run writes them when it
finishes and keeps orbax checkpoints of the full training state (params,
optimizer, step) under `checkpoints/` while it runs. `load_checkpoint` reads a
finished folder, or the latest orbax step of an unfinished run.

    blockdec.save_checkpoint(folder, cfg, params, tokenizer)
    cfg, params, tokenizer = blockdec.load_checkpoint(folder)
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import safetensors.numpy

from blockdec.api import check_params
from blockdec.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_FILE = "params.safetensors"
ORBAX_DIR = "checkpoints"


def flatten_params(params) -> dict[str, np.ndarray]:
  """Nested dict -> {"a/b/c": array}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(p.key) for p in path)] = np.asarray(leaf)
  return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
  params = {}
  for key, value in flat.items():
    node = params
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return params


def save_model_config(directory, cfg: ModelConfig) -> None:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(
      json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def load_model_config(directory) -> ModelConfig:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: {directory} is not a blockdec "
                            "checkpoint folder (see blockdec.save_checkpoint).")
  try:
    return ModelConfig.from_dict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path} does not hold a valid ModelConfig: {e}") from None


def save_checkpoint(directory, cfg: ModelConfig, params, tokenizer=None) -> None:
  """Writes config, params (safetensors) and the tokenizer to `directory`."""
  check_params(params, cfg)
  directory = pathlib.Path(directory)
  save_model_config(directory, cfg)
  tmp = directory / (PARAMS_FILE + ".tmp")
  safetensors.numpy.save_file(flatten_params(jax.device_get(params)), str(tmp),
                              metadata={"format": "blockdec"})
  tmp.replace(directory / PARAMS_FILE)  # Atomic: never a half-written file.
  if tokenizer is not None:
    tokenizer.save(directory)


def latest_orbax_params(directory):
  """Params of the latest orbax step under directory/checkpoints, or None."""
  import orbax.checkpoint as ocp  # Slow to import; only needed here.
  root = pathlib.Path(directory).resolve() / ORBAX_DIR
  if not root.is_dir():
    return None
  with ocp.CheckpointManager(root) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    state = mngr.restore(step, args=ocp.args.StandardRestore())
  return state["params"]


def is_hf_checkpoint(directory) -> bool:
  """True for an HF folder (config.json, no model_config.json)."""
  directory = pathlib.Path(directory)
  return ((directory / "config.json").exists()
          and not (directory / CONFIG_FILE).exists())


def _load_hf(directory, with_tokenizer: bool):
  """`load_checkpoint` of an HF folder (blockdec.load_hf_checkpoint)."""
  from blockdec.models.hf import load_hf_checkpoint
  from blockdec.training.tokenizers import load_tokenizer
  cfg, params = load_hf_checkpoint(directory)
  params = jax.tree_util.tree_map(np.asarray, params)
  return cfg, params, load_tokenizer(directory) if with_tokenizer else None


def load_checkpoint(directory, *, with_tokenizer: bool = True):
  """Returns (cfg, params, tokenizer) from a checkpoint folder.

  An HF checkpoint folder (config.json + safetensors, GPT-2 or Llama family)
  loads too, through `blockdec.load_hf_checkpoint`, with its tokenizer.json;
  so a head config's `init_from` may name one (configs/hf_heads.py).

  Raises FileNotFoundError naming the missing file, and ValueError when the
  parameters do not fit the saved config.
  """
  from blockdec.training.tokenizers import load_tokenizer
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint folder {directory} does not exist.")
  if is_hf_checkpoint(directory):
    return _load_hf(directory, with_tokenizer)
  cfg = load_model_config(directory)
  path = directory / PARAMS_FILE
  if path.exists():
    params = unflatten_params(safetensors.numpy.load_file(str(path)))
  else:
    params = latest_orbax_params(directory)
    if params is None:
      raise FileNotFoundError(
          f"{path} is missing and {directory / ORBAX_DIR} holds no training "
          "checkpoint.")
  params = jax.tree_util.tree_map(np.asarray, params)
  try:
    check_params(params, cfg)
  except ValueError as e:
    raise ValueError(f"checkpoint {directory}: {e}") from None
  tokenizer = load_tokenizer(directory) if with_tokenizer else None
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
        f"checkpoint {directory}: tokenizer vocabulary {tokenizer.vocab_size} "
        f"exceeds the model's vocab_size={cfg.vocab_size}.")
  return cfg, params, tokenizer
