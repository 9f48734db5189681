"""Train-or-reuse: the library side of `blockdec train` and `make demo`.

`train_or_load(config, cache_dir)` returns a trained model for a config,
training it only when the cache has no finished run of that exact config.
Runs live in `<cache_dir>/<name>-<hash of the config>`; a head or draft
config whose `init_from` is empty first does the same for its `base` config,
so the base LM is trained once and shared by every head regime and draft
model built on it. An interrupted run resumes from its last checkpoint the
next time. A finished run whose files are damaged (a truncated or bit-flipped
params.safetensors, a torn summary.json) is reported, its damaged files are
set aside as `<name>.damaged`, and it is finished again from its newest valid
orbax step (retrained when none is left): never silently reused.

    config = load_config("configs/heads_frozen.py:cpu")
    run = train_or_load(config, "cache")
    run.cfg, run.params, run.tokenizer, run.summary
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
from typing import Any

import ml_collections

from blockdec import checkpointing
from blockdec.config import ModelConfig

# Fields that do not change what a run computes (left out of the cache key).
_NOT_IN_KEY = ("progress", "workdir", "log_every", "checkpoint_every",
               "keep_checkpoints", "sharding", "cpu_ynn_dots_only")
# Fields added after runs were cached, left out of the key at the default
# that computes what those runs computed (so their caches stay valid).
_KEY_IF_NOT = {("distill", "temperature"): 0.0}


@dataclasses.dataclass
class Run:
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  workdir: pathlib.Path
  summary: dict


def load_config(spec, arg: str | None = None):
  """Loads `get_config(arg)` from a config file; spec "path.py[:arg]".

  Relative paths are tried from the working directory, then from the
  repository root (so `configs/...` works from anywhere in a clone).
  """
  spec = str(spec)
  if arg is None and ":" in spec:
    spec, arg = spec.split(":", 1)
  module = load_config_module(spec)
  return module.get_config(arg) if arg is not None else module.get_config()


def load_config_module(spec):
  """The config file `spec` as a module (config files share helpers this way:
  they are loaded by path, not imported from a package)."""
  path = pathlib.Path(str(spec))
  if not path.exists() and not path.is_absolute():
    path = pathlib.Path(__file__).resolve().parents[2] / spec
  if not path.exists():
    raise FileNotFoundError(f"config file {spec} does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      f"_blockdec_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _key_dict(config) -> dict:
  d = config.to_dict()
  for name in _NOT_IN_KEY:
    d.pop(name, None)
  for (section, name), default in _KEY_IF_NOT.items():
    if section in d and d[section].get(name, default) == default:
      d[section].pop(name, None)
  if d.get("base") is not None:
    d["base"] = _key_dict(config.base)
  return d


def config_key(config) -> str:
  """A hash of everything in `config` that changes the trained model."""
  text = json.dumps(_key_dict(config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir(config, cache_dir) -> pathlib.Path:
  if config.workdir:
    return pathlib.Path(config.workdir)
  return pathlib.Path(cache_dir) / f"{config.name}-{config_key(config)}"


def is_finished(workdir) -> bool:
  workdir = pathlib.Path(workdir)
  return ((workdir / checkpointing.PARAMS_FILE).exists()
          and (workdir / "summary.json").exists())


def train_or_load(config, cache_dir="cache", *, progress: bool | None = None,
                  log=print) -> Run:
  """The trained model of `config`, from the cache or by training it now."""
  from blockdec.training import train  # Imports orbax: keep `load` light.
  if progress is not None:
    config = config.copy_and_resolve_references()
    config.progress = progress
    if config.get("base") is not None:
      config.base.progress = progress
  init = None
  if config.regime != "base" and not config.init_from:
    if config.base is None:
      raise ValueError(f"config.regime={config.regime!r} needs config.init_from "
                       "or config.base.")
    base = train_or_load(config.base, cache_dir, log=log)
    init = (base.cfg, base.params, base.tokenizer)
  workdir = run_dir(config, cache_dir)
  run = _load_finished(workdir, config.name, log)
  if run is None:
    log(f"[train] {config.name} ({config.regime}): {workdir}")
    train.train(config, workdir, init=init)
    run = _load_finished(workdir, config.name, lambda _: None, retry=False)
  return run


def cached_run(spec, cache_dir="cache", *, train: bool = False,
               required: bool = True, log=print) -> Run | None:
  """The run of config `spec` ("configs/x.py:preset", or a built config
  dict) from the cache.

  With `train`, an uncached run is trained first (`train_or_load`);
  otherwise it is None, or a FileNotFoundError naming the folder and the
  command that trains it when `required`. For experiments that must not
  start an hour of training unasked.
  """
  if isinstance(spec, ml_collections.ConfigDict):
    config, spec = spec, spec.name
    how = "pass --train"
  else:
    config = load_config(spec)
    how = f"`blockdec train --config {spec}` (or pass --train)"
  workdir = run_dir(config, cache_dir)
  if not (train or is_finished(workdir)):
    if required:
      raise FileNotFoundError(
          f"{workdir} holds no finished {spec} run; train it with {how}.")
    log(f"[cache] {spec}: not cached ({workdir}); skipped")
    return None
  return train_or_load(config, cache_dir, log=log)


def _load_finished(workdir, name, log, retry=True) -> Run | None:
  """The finished run in `workdir`, or None if it is unfinished or damaged
  (damaged files are reported and set aside, so training finishes it again
  from its newest valid checkpoint). Without `retry`, damage raises."""
  if not is_finished(workdir):
    return None
  summary_path = workdir / "summary.json"
  try:
    cfg, params, tokenizer = checkpointing.load_checkpoint(workdir)
    try:
      summary = json.loads(summary_path.read_text())
    except ValueError as e:
      raise checkpointing.DamagedCheckpointError(
          f"{summary_path} is damaged: {e}.") from None
  except checkpointing.DamagedCheckpointError as e:
    if not retry:
      raise
    log(f"[cache] {name}: {e}")
    for path in (workdir / checkpointing.PARAMS_FILE, summary_path):
      log(f"[cache] {name}: set aside as {checkpointing.set_aside(path)}; "
          "finishing the run from its newest valid checkpoint")
    return None
  log(f"[cache] {name}: reusing {workdir}")
  return Run(cfg, params, tokenizer, workdir, summary)
