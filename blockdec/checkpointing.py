"""Model checkpoints: config + parameters + tokenizer in one folder.

    folder/
      model_config.json       ModelConfig.to_dict()
      params.safetensors      every parameter, keyed by its path "layer_0/attn/q/kernel";
                              its metadata holds a SHA-256 of the tensors
      tokenizer_config.json   (+ tokenizer.json for BPE), see training/tokenizers.py
      checkpoints/<step>/     orbax training state (training runs only)

`save_checkpoint` writes the first three; a training run writes them when it
finishes and keeps orbax checkpoints of the full training state (params,
optimizer, step) under `checkpoints/` while it runs. `load_checkpoint` reads a
finished folder, or the newest orbax step of an unfinished run that restores.

Damage is named, never silently used: a params file that does not parse or
whose tensors no longer match the checksum saved with them raises
`DamagedCheckpointError` naming the file; an orbax step that does not restore
is skipped for the next older one (the trainer also moves it aside to
`checkpoints.damaged/`, so the run resumes from the newest valid step).

    blockdec.save_checkpoint(folder, cfg, params, tokenizer)
    cfg, params, tokenizer = blockdec.load_checkpoint(folder)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import numpy as np
import safetensors
import safetensors.numpy

from blockdec.api import check_params
from blockdec.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_FILE = "params.safetensors"
ORBAX_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"  # Orbax steps that did not restore.
CHECKSUM_KEY = "sha256"  # In params.safetensors' metadata.


class DamagedCheckpointError(ValueError):
  """A checkpoint file that cannot be read back as it was written; the
  message names the file."""


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


def params_digest(flat: dict[str, np.ndarray]) -> str:
  """SHA-256 hex digest of flat params: names, dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  return h.hexdigest()


def save_checkpoint(directory, cfg: ModelConfig, params, tokenizer=None) -> None:
  """Writes config, params (safetensors, with their checksum in its
  metadata) and the tokenizer to `directory`."""
  check_params(params, cfg)
  directory = pathlib.Path(directory)
  save_model_config(directory, cfg)
  flat = flatten_params(jax.device_get(params))
  data = safetensors.numpy.save(
      flat, metadata={"format": "blockdec", CHECKSUM_KEY: params_digest(flat)})
  tmp = directory / (PARAMS_FILE + ".tmp")
  # A plain open() gives the file the mode every other checkpoint file gets
  # (0666 less the umask; safetensors' own writer makes it 0600).
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(directory / PARAMS_FILE)  # Atomic: never a half-written file.
  if tokenizer is not None:
    tokenizer.save(directory)


def load_params_file(path) -> dict:
  """The params of a params.safetensors file, verified against the checksum
  in its metadata (files without one, e.g. from older versions, load
  unverified). Raises DamagedCheckpointError naming the file."""
  path = pathlib.Path(path)
  try:
    with safetensors.safe_open(str(path), "np") as f:
      metadata = f.metadata() or {}
      flat = {name: f.get_tensor(name) for name in f.keys()}
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise DamagedCheckpointError(
        f"{path} is damaged: it does not read as a safetensors file ({e}). "
        "Delete it to retrain, or restore it from a copy.") from None
  want = metadata.get(CHECKSUM_KEY)
  if want is not None:
    got = params_digest(flat)
    if got != want:
      raise DamagedCheckpointError(
          f"{path} is damaged: its tensors' SHA-256 {got[:16]}... differs "
          f"from the {want[:16]}... saved with them (a flipped bit or a "
          "bad copy). Delete it to retrain, or restore it from a copy.")
  return unflatten_params(flat)


def set_aside(path, into=None) -> pathlib.Path:
  """Moves a damaged file or folder to `<into>/<name>.damaged` (default:
  beside it; `.damaged.<n>` if taken), kept for inspection. Returns the new
  path."""
  path = pathlib.Path(path)
  folder = path.parent if into is None else pathlib.Path(into)
  folder.mkdir(parents=True, exist_ok=True)
  target = folder / f"{path.name}.damaged"
  n = 1
  while target.exists():
    target = folder / f"{path.name}.damaged.{n}"
    n += 1
  path.rename(target)
  return target


def restore_newest(mngr, restore, *, set_damaged_aside: bool = False,
                   log=None):
  """(step, state) of the newest orbax step that `restore(step)` restores.

  Newer steps that fail (a missing metadata file, truncated data) are
  reported through `log` and skipped; with `set_damaged_aside` they are also
  moved to `<run>/checkpoints.damaged/` (and `mngr` reloaded), so a resumed
  run can save those steps again. Returns (None, None) without steps.

  Raises:
    DamagedCheckpointError: steps exist but none restores; names them.
  """
  root = pathlib.Path(mngr.directory)
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore(step)
    except Exception as e:  # pylint: disable=broad-except  # Orbax and
      # TensorStore raise many types for a damaged step; each is reported.
      failed.append((step, e))
      if log is not None:
        log(f"orbax step {root / str(step)} does not restore "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying "
            "the previous step.")
      continue
    if failed and set_damaged_aside:
      for bad, _ in failed:
        set_aside(root / str(bad), into=root.parent / DAMAGED_DIR)
      mngr.reload()
    return step, state
  if failed:
    raise DamagedCheckpointError(
        f"no orbax step under {root} restores: "
        + "; ".join(f"step {s}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120]}" for s, e in failed)
        + f". Delete {root} to train from scratch.")
  return None, None


def latest_orbax_params(directory):
  """Params of the newest orbax step under directory/checkpoints that
  restores (damaged newer ones are skipped with a warning), or None."""
  import orbax.checkpoint as ocp  # Slow to import; only needed here.
  from absl import logging
  root = pathlib.Path(directory).resolve() / ORBAX_DIR
  if not root.is_dir():
    return None
  # An explicit handler: a damaged (e.g. empty) step cannot make the manager
  # guess a multi-item layout and then fail on every step.
  with ocp.CheckpointManager(
      root, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
    _, state = restore_newest(
        mngr, lambda step: mngr.restore(step, args=ocp.args.StandardRestore()),
        log=logging.warning)
  return None if state is None else state["params"]


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

  Raises FileNotFoundError naming the missing file, DamagedCheckpointError
  (a ValueError) naming a damaged one, and ValueError when the parameters do
  not fit the saved config or hold NaN or inf.
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
    params = load_params_file(path)
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
  # On the device once: numpy weights would be copied again by every jitted
  # call that takes them (the demo base's 17 MB cost more than a step).
  params = jax.device_put(params)
  tokenizer = load_tokenizer(directory) if with_tokenizer else None
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
        f"checkpoint {directory}: tokenizer vocabulary {tokenizer.vocab_size} "
        f"exceeds the model's vocab_size={cfg.vocab_size}.")
  return cfg, params, tokenizer
