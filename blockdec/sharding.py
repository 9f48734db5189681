"""Sharding over a device mesh: logical axis names, rules, sharded placement.

blockdec runs on a 2-D device mesh with axes ``("data", "model")`` through
JAX's own SPMD machinery: `jax.jit` with `in_shardings`/`out_shardings` (pjit
is merged into jit) and, where a kernel needs it, `jax.shard_map`. Nothing
here changes a result: a sharded computation equals the one-device one up to
the float rounding of reordered reductions.

Three layers, each a plain function of the one above:

1. Logical axes. Every array that matters names its dimensions with logical
   names, derived from its pytree path (the parameter names are the ones in
   `blockdec.models.transformer`'s docstring):

     embed/embedding                 [V, d]        ("vocab", "embed")
     pos_embed/embedding             [S_max, d]    (None, "embed")
     layer_i/attn/q/kernel           [d, H*D]      ("embed", "heads")
     layer_i/attn/{k,v}/kernel       [d, H_kv*D]   ("embed", "kv_heads")
     layer_i/attn/o/kernel           [H*D, d]      ("heads", "embed")
     layer_i/mlp/{gate,up,fc}/kernel [d, F]        ("embed", "mlp")
     layer_i/mlp/{down,proj}/kernel  [F, d]        ("mlp", "embed")
     lm_head/kernel                  [d, V]        ("embed", "vocab")
     proposal_heads/head_j/fc1/kernel [d, F_h]     ("embed", "mlp")
     proposal_heads/head_j/fc2/kernel [F_h, d]     ("mlp", "embed")
     proposal_heads/head_j/fc_in/kernel [j d, d]   (None, "embed")  (Hydra)
     eagle/fc/kernel                 [2d, d]       ("embed", "mlp")
     eagle/layer_i/...               as layer_i/...
     biases                          the kernel's output axis
     norms (scale, bias)             replicated
     KV cache k, v (per layer)       [B, H_kv, D, S], [B, H_kv, S, D]
                                     ("batch", "kv_heads", None, None)
     tokens, positions [B, T]; per-row vectors [B]   ("batch", ...)

   The same names are found inside optimizer states, whose leaves repeat the
   parameter paths (``.../mu/layer_0/attn/q/kernel``), so Adam's moments are
   sharded exactly like their parameters.

2. Rules. A tuple of ``(logical name, mesh axis or None)`` pairs; the first
   pair naming a logical axis wins (the flax `logical_axis_rules` idea).
   `DEFAULT_RULES` is data parallel (batch over ``data``) plus tensor parallel
   (heads, kv heads, MLP and vocabulary over ``model``); `FSDP_RULES` also
   shards the ``embed`` dimension of parameters and optimizer state over
   ``data`` (fully sharded data parallel: each data shard keeps 1/data of the
   weights, gathered per layer by XLA). Activations never use ``embed``.

3. Shardings. ``logical axes + rules + mesh -> PartitionSpec ->
   NamedSharding``. Two fallbacks keep any model runnable on any mesh:

   * a dimension whose size is not divisible by its mesh axis size is
     replicated instead (e.g. ``n_kv_heads=4`` on a ``model`` axis of 8: the
     KV heads are then replicated over ``model``; batch 6 on ``data=4``: the
     batch is replicated);
   * a mesh axis already used by an earlier dimension of the same array is
     not used again (a PartitionSpec may name each mesh axis once).

   Both only cost memory or communication, never correctness.

Example::

    mesh = blockdec.make_mesh((4, 2))          # 8 devices: data=4, model=2
    params = blockdec.shard_params(params, cfg, mesh)
    params["layer_0"]["attn"]["q"]["kernel"].sharding.spec
    # PartitionSpec(None, 'model')
    out = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                    max_new_tokens=32, mesh=mesh)

Multi-host runs (TPU pod slices, multi-node GPU) are described in
docs/sharding.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from blockdec.config import ModelConfig
from blockdec.models import transformer
from blockdec.models.kv_cache import KVCache

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# Logical name -> mesh axis. Data parallel + tensor parallel (Megatron-style:
# attention heads, MLP hidden units and the vocabulary split over `model`).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("heads", MODEL),
    ("kv_heads", MODEL),
    ("mlp", MODEL),
    ("vocab", MODEL),
    ("embed", None),
    ("length", None),
)

Rules = Sequence[tuple[str, Any]]


def fsdp_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """`rules` with d_model ("embed") sharded over `data` (FSDP)."""
  return (("embed", DATA),) + tuple(tuple(r) for r in rules if r[0] != "embed")


# For parameters and optimizer state only: also shard d_model over `data`.
FSDP_RULES = fsdp_rules(DEFAULT_RULES)


# ----------------------------------------------------------------- the mesh


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A ``("data", "model")`` mesh with Auto axis types.

  Args:
    shape: ``(data, model)``; one entry may be -1 for "all remaining devices",
      e.g. ``(-1, 1)`` is pure data parallelism over every device.
    devices: the devices to use (default: all, `jax.devices()`); their number
      must equal ``data * model``.

  Auto (not `jax.make_mesh`'s default Explicit) axis types let XLA propagate
  shardings through ops such as the embedding gather, which Explicit mode
  rejects unless every operand's sharding is spelled out.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = check_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def check_mesh_shape(shape: Sequence[int], num_devices: int | None = None
                     ) -> tuple[int, int]:
  """`shape` with its -1 resolved; raises ValueError if it cannot fit.

  `num_devices` defaults to `jax.device_count()`.
  """
  if num_devices is None:
    num_devices = jax.device_count()
  shape = tuple(shape)
  if len(shape) != 2 or not all(isinstance(s, (int, np.integer))
                                and not isinstance(s, bool) for s in shape):
    raise ValueError(f"mesh shape={shape!r} must be two ints (data, model).")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape={shape} must hold positive sizes and at most "
                     "one -1 (fill with the remaining devices).")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh shape={shape}: {num_devices} devices are not "
                       f"divisible by {known}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh shape={shape} needs {math.prod(shape)} devices but "
        f"{num_devices} are given (jax.devices() has {jax.device_count()}); "
        "pass devices=... to make_mesh to use a subset.")
  return tuple(int(s) for s in shape)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """How to shard a run (hashable, so it can be a static jit argument).

  Attributes:
    mesh_shape: ``(data, model)``, -1 allowed once; None: no mesh (one device).
    rules: logical-name -> mesh-axis pairs for activations, batches and caches.
    fsdp: also shard parameters and optimizer state over ``data`` along
      d_model (`FSDP_RULES`).
  """

  mesh_shape: tuple[int, int] | None = None
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  fsdp: bool = False

  def __post_init__(self):
    if self.mesh_shape is not None:
      object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))
    object.__setattr__(self, "rules", _check_rules(self.rules))

  @property
  def param_rules(self) -> tuple[tuple[str, Any], ...]:
    """Rules for parameters and optimizer state (FSDP adds embed -> data)."""
    return fsdp_rules(self.rules) if self.fsdp else self.rules

  def make_mesh(self, devices=None) -> Mesh | None:
    return None if self.mesh_shape is None else make_mesh(self.mesh_shape,
                                                          devices)

  @classmethod
  def from_config(cls, config) -> "ShardingConfig":
    """From an ml_collections ``config.sharding`` block (see `config_dict`)."""
    if config is None:
      return cls()
    get = config.get if hasattr(config, "get") else functools.partial(
        getattr, config)
    mesh_shape = get("mesh_shape", None)
    rules = get("rules", None)
    return cls(mesh_shape=None if mesh_shape is None else tuple(mesh_shape),
               rules=DEFAULT_RULES if rules is None else rules,
               fsdp=bool(get("fsdp", False)))


def config_dict():
  """The ``config.sharding`` block of an experiment config (ml_collections).

  Fields: ``mesh_shape`` (None = one device, else ``(data, model)``, e.g.
  ``--config.sharding.mesh_shape="(4,2)"``), ``rules`` (`DEFAULT_RULES`) and
  ``fsdp`` (False).
  """
  import ml_collections  # Imported here: only configs need it.
  c = ml_collections.ConfigDict()
  c.mesh_shape = ml_collections.config_dict.placeholder(tuple)
  c.rules = DEFAULT_RULES
  c.fsdp = False
  return c


# Every logical axis name the arrays use (a rule naming another is a typo).
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def _check_rules(rules) -> tuple[tuple[str, Any], ...]:
  out = []
  for rule in rules:
    rule = tuple(rule)
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"sharding rule {rule!r} must be a (logical name, mesh "
                       "axis or None) pair, e.g. ('batch', 'data').")
    name, target = rule
    if name not in LOGICAL_AXES:
      raise ValueError(f"sharding rule {rule!r} names the logical axis "
                       f"{name!r}; allowed: {LOGICAL_AXES}.")
    if isinstance(target, list):
      target = tuple(target)
    axes = target if isinstance(target, tuple) else (target,)
    if target is not None and not all(a in MESH_AXES for a in axes):
      raise ValueError(f"sharding rule {rule!r} names the mesh axis "
                       f"{target!r}; allowed: None, one of {MESH_AXES} or a "
                       "tuple of them.")
    out.append((name, target))
  return tuple(out)


# ------------------------------------------------------------- logical axes

# (module name, param name) -> logical axes; matched on the end of a path.
_LEAF_AXES = {
    ("q", "kernel"): ("embed", "heads"), ("q", "bias"): ("heads",),
    ("k", "kernel"): ("embed", "kv_heads"), ("k", "bias"): ("kv_heads",),
    ("v", "kernel"): ("embed", "kv_heads"), ("v", "bias"): ("kv_heads",),
    ("o", "kernel"): ("heads", "embed"), ("o", "bias"): ("embed",),
    ("gate", "kernel"): ("embed", "mlp"), ("gate", "bias"): ("mlp",),
    ("up", "kernel"): ("embed", "mlp"), ("up", "bias"): ("mlp",),
    ("fc", "kernel"): ("embed", "mlp"), ("fc", "bias"): ("mlp",),
    ("down", "kernel"): ("mlp", "embed"), ("down", "bias"): ("embed",),
    ("proj", "kernel"): ("mlp", "embed"), ("proj", "bias"): ("embed",),
    ("fc1", "kernel"): ("embed", "mlp"), ("fc1", "bias"): ("mlp",),
    ("fc_in", "kernel"): (None, "embed"), ("fc_in", "bias"): ("embed",),
    ("fc2", "kernel"): ("mlp", "embed"), ("fc2", "bias"): ("embed",),
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): (None, "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
}
_NORMS = ("attn_norm", "mlp_norm", "final_norm", "norm")  # norm: eagle's


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def logical_axes_for_path(path, ndim: int, *, strict: bool = False):
  """Logical axes of the leaf at `path` (a jax key path) with `ndim` dims.

  Known parameter names (also at the end of optimizer-state paths) get their
  axes from the table in the module docstring; norms and scalars are
  replicated (all None). Any other leaf raises with ``strict=True`` and is
  replicated otherwise (e.g. Adam's step count, an RNG key).
  """
  names = [_key_name(k) for k in path]
  if len(names) >= 2 and names[-2] in _NORMS:
    return (None,) * ndim
  axes = _LEAF_AXES.get(tuple(names[-2:])) if len(names) >= 2 else None
  if axes is not None and len(axes) == ndim:
    return axes
  if ndim == 0:
    return ()
  if strict:
    raise ValueError(
        f"no logical axes known for parameter {'/'.join(names)} with {ndim} "
        "dims; blockdec.sharding knows the Transformer's parameter names "
        f"({sorted({m for m, _ in _LEAF_AXES})} and norms {list(_NORMS)}).")
  return (None,) * ndim


def logical_axes(tree, *, strict: bool = False):
  """A tree of logical-axes tuples with the structure of `tree`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: logical_axes_for_path(path, np.ndim(x), strict=strict),
      tree)


# Keys [B, H_kv, D, S], values [B, H_kv, S, D].
CACHE_LAYER_AXES = ("batch", "kv_heads", None, None)


def cache_axes(cache: KVCache) -> KVCache:
  """Logical axes of every leaf of `cache` (one entry per layer)."""
  per_layer = (CACHE_LAYER_AXES,) * cache.num_layers
  return KVCache(k=per_layer, v=per_layer, end_index=("batch",))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Rules | None = None) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dims are named `axes`.

  Example: axes ``("embed", "heads")``, shape ``(64, 64)`` on a
  ``data=4, model=2`` mesh with `DEFAULT_RULES` -> ``P(None, "model")``; with
  shape ``(64, 63)`` -> ``P(None, None)`` (63 is not divisible by 2).
  """
  rules = DEFAULT_RULES if rules is None else rules
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape "
                     f"{tuple(shape)}.")
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used, spec = set(), []
  for name, size in zip(axes, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
      if t not in mesh.shape:
        raise ValueError(f"sharding rule ({name!r}, {target!r}) names mesh "
                         f"axis {t!r}; this mesh has {tuple(mesh.axis_names)}.")
    parts = math.prod(mesh.shape[t] for t in targets)
    if used & set(targets) or size % parts:
      spec.append(None)  # Replicate: see the module docstring.
      continue
    used.update(targets)
    spec.append(target)
  return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Rules | None = None, *,
                   axes=None, strict: bool = False):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

  `axes` is a matching tree of logical-axes tuples; default: from the paths
  (`logical_axes`).
  """
  if axes is None:
    axes = logical_axes(tree, strict=strict)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  axes_leaves = treedef.flatten_up_to(axes)
  return treedef.unflatten([
      NamedSharding(mesh, logical_to_spec(a, np.shape(x), mesh, rules))
      for x, a in zip(leaves, axes_leaves)])


# ------------------------------------------------------------- parameters


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: ModelConfig):
  return jax.eval_shape(functools.partial(transformer.init_params, cfg),
                        jax.random.key(0))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules | None = None):
  """NamedShardings of `cfg`'s parameter tree (no arrays are made)."""
  return tree_shardings(_param_shapes(cfg), mesh, rules, strict=True)


def shard_params(params, cfg: ModelConfig, mesh: Mesh,
                 rules: Rules | None = None):
  """`params` placed on `mesh` as the rules say (`DEFAULT_RULES` by default).

  Pass ``rules=FSDP_RULES`` to also split d_model over ``data``.
  """
  from blockdec import api  # api imports this module.
  api.check_params(params, cfg)
  return jax.device_put(params, param_shardings(cfg, mesh, rules))


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh,
                rules: Rules | None = None):
  """Random parameters created directly in their shards.

  ``eval_shape -> logical specs -> jit(init, out_shardings=...)``: no device
  ever holds the whole model, so models larger than one device's memory can
  be initialised. The values equal `blockdec.init_params(cfg, key)`.
  """
  init = jax.jit(functools.partial(transformer.init_params, cfg),
                 out_shardings=param_shardings(cfg, mesh, rules))
  return init(key)


def cache_shardings(mesh: Mesh, cache_shape: KVCache,
                    rules: Rules | None = None) -> KVCache:
  """Shardings of a KV cache per layer (batch and KV heads split)."""
  return tree_shardings(cache_shape, mesh, rules, axes=cache_axes(cache_shape))


def batch_sharding(mesh: Mesh, shape: Sequence[int],
                   rules: Rules | None = None) -> NamedSharding:
  """Sharding of an array whose first dim is the batch (tokens, lengths...)."""
  axes = ("batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------- training


def train_state_shardings(state, mesh: Mesh, rules: Rules | None = None):
  """Shardings of a train state (params, optimizer state, step, rng, ...).

  Leaves whose path ends in a parameter name are sharded as that parameter
  (so optimizer moments follow their weights); everything else is replicated.
  Pass the FSDP rules (`ShardingConfig.param_rules`) to shard d_model too.
  """
  return tree_shardings(state, mesh, rules, strict=False)


def shard_train_step(train_step: Callable, state, mesh: Mesh,
                     sharding: ShardingConfig | None = None, *,
                     batch_size: int, eval_step: Callable | None = None,
                     donate_state: bool = False,
                     compiler_options: dict | None = None):
  """`train_step(state, batch) -> (state, metrics)` jitted for `mesh`.

  The state's parameters and optimizer state are sharded by the parameter
  rules (tensor parallel, plus FSDP when `sharding.fsdp`); every batch leaf
  is split over ``data`` along its first (batch) dim; metrics come back
  replicated. XLA inserts the gradient all-reduces (data parallel) and the
  activation collectives (tensor parallel); the step's code is unchanged.

  Args:
    train_step: a pure function (jitted or not).
    state: the train state (arrays or ShapeDtypeStructs) fixing the shapes.
    mesh: from `make_mesh`.
    sharding: rules and FSDP switch; default `ShardingConfig()`.
    batch_size: rows of every batch (a batch not divisible by the ``data``
      size is replicated, see the module docstring).
    eval_step: optionally also jit `eval_step(params, batch) -> metrics`.
    donate_state: donate the old state's buffers (saves memory).
    compiler_options: XLA compile options of the step (`jax.jit`'s), e.g.
      `training.train.cpu_compiler_options`.

  Returns:
    ``(step, state_shardings, batch_sharding, eval_step or None)``. Place the
    state once with ``jax.device_put(state, state_shardings)`` and each batch
    with `put_batch`.
  """
  sharding = ShardingConfig() if sharding is None else sharding
  state_sh = train_state_shardings(state, mesh, sharding.param_rules)
  batch_sh = batch_sharding(mesh, (batch_size,), sharding.rules)
  # One sharding for the whole batch pytree: a prefix of its leaves.
  step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, replicated(mesh)),
                 donate_argnums=(0,) if donate_state else (),
                 compiler_options=compiler_options)
  if eval_step is not None:
    params_sh = getattr(state_sh, "params", None)
    if params_sh is None:
      raise ValueError("eval_step needs a state with a `params` field.")
    eval_step = jax.jit(eval_step, in_shardings=(params_sh, batch_sh),
                        out_shardings=replicated(mesh))
  return step, state_sh, batch_sh, eval_step


def put_batch(batch, sharding: NamedSharding):
  """Host batch (NumPy pytree, the same global batch on every process) ->
  global arrays laid out by `sharding`; each device copies only its rows.

  On one process this is `jax.device_put`; on several (multi-host) it is
  what lets every process pass the same host batch to a sharded step.
  """
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda index: np.asarray(x)[index]), batch)


def to_host(tree):
  """NumPy copy of a (possibly sharded) pytree, on every process.

  One process: `jax.device_get`. Several (multi-host): arrays are not fully
  addressable from one host, so they are all-gathered first.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


# ------------------------------------------------------------ checkpoints


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying target `shardings` (restore target)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
      tree, shardings)


def save_checkpoint(directory, tree) -> None:
  """Saves a (possibly sharded) pytree with orbax; every host calls this."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(_abspath(directory), tree)


def restore_checkpoint(directory, target):
  """Restores a tree saved by `save_checkpoint` onto the target shardings.

  `target` holds ShapeDtypeStructs with shardings (`abstract_like`), so a
  checkpoint written from one mesh (say data=4, model=2) is read straight
  into another layout (data=2, model=4): each device reads only its shards.
  """
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(_abspath(directory), target)


def restore_params(directory, cfg: ModelConfig, mesh: Mesh,
                   rules: Rules | None = None):
  """Parameters of `cfg` from a `save_checkpoint` directory, sharded on `mesh`."""
  return restore_checkpoint(
      directory, abstract_like(_param_shapes(cfg),
                               param_shardings(cfg, mesh, rules)))


def _abspath(directory):
  import os
  return os.path.abspath(os.fspath(directory))
