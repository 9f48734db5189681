"""Public entry points: bind the model to the model-agnostic decoding loops.

Inputs are checked on the host before anything is traced, so bad input gives
a `TypeError` (wrong type) or `ValueError` (wrong value) naming the argument,
the value and what is allowed instead of a silent wrong answer (JAX clamps
out-of-range gathers without complaint). NumPy integer scalars are ints.

Under a caller's own `jax.jit`, the arrays are tracers and the checks that
need their values are skipped: token ids inside the vocabulary, prompt
lengths in [1, P] (the budget is then checked against the padded width P)
and finite weights (weights the jitted function closes over are concrete and
still checked). Shapes, dtypes, the config and every option are still
checked; the prompts' padding is zeroed inside the compiled decode either
way. Check once outside the jit (e.g. call `check_params` and decode one
batch eagerly), or keep the inputs trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from blockdec import cpu_compile
from blockdec import decoding
from blockdec import methods
from blockdec import sharding as sharding_lib
from blockdec import validation
from blockdec.config import ModelConfig
from blockdec.decoding import AcceptanceRule, DecodeOptions, DecodeOutput, Exact
from blockdec.decoding import core
from blockdec.models import transformer


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Random parameters for `cfg`."""
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"cfg must be a blockdec.ModelConfig, got {type(cfg).__name__}.")
  return jax.jit(transformer.init_params, static_argnums=0)(cfg, key)


def model_score_fn(cfg: ModelConfig,
                   num_heads: int | None = None) -> decoding.SplitScoreFn:
  """The scoring callable of the decoding loops for this model.

  Split into trunk and heads so the blockwise loop runs the proposal heads
  only at the last accepted position.
  """
  model = transformer.Transformer(cfg)

  def trunk(params, tokens, positions, cache, mask=None):
    # mask: None (causal block) or a block mask, e.g. kernels.TreeMask for
    # multi-draft verification (see Transformer.trunk).
    return model.apply({"params": params}, tokens, positions, cache, mask,
                       method=transformer.Transformer.trunk)

  def prefill(params, tokens, positions, cache, keep=None):
    return model.apply({"params": params}, tokens, positions, cache, None,
                       True, keep=keep, method=transformer.Transformer.trunk)

  def heads(params, hidden, n):
    return model.apply({"params": params}, hidden, n,
                       method=transformer.Transformer.head_logits)

  return decoding.SplitScoreFn(trunk=trunk, heads=heads,
                               num_heads=num_heads or cfg.num_prediction_heads,
                               prefill=prefill)


def cache_length(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
  """Slots a decode needs: the prompt, the budget and one call's nodes."""
  return prompt_len + max_new_tokens + block_size


def _decode_impl(params, prompts, prompt_lengths, key, arrays, source=None, *,
                 cfg: ModelConfig, options: DecodeOptions,
                 method: methods.Method, cache_sharding=None) -> DecodeOutput:
  batch, p = prompts.shape
  # Padding may hold anything; feed zeros so every gather is in range.
  prompts = jnp.where(jnp.arange(p) < prompt_lengths[:, None], prompts, 0)
  reference = (isinstance(method, methods.Autoregressive)
               and options.sampling is None)
  k = options.block_size
  drafter = None if reference else method.drafter(
      cfg, k, arrays, batch=batch, cache_length=p + options.max_new_tokens,
      make_cache=transformer.make_cache,
      score_fn=lambda c, n: model_score_fn(c, num_heads=n), params=params)
  slots = 1 if drafter is None else drafter.cache_slots
  cache = transformer.make_cache(
      cfg, batch, cache_length(p, options.max_new_tokens, slots))
  if source is not None:  # An encoder-decoder: encode once, keep in the cache.
    cache = cache.with_memory(transformer.encode(params, cfg, *source))
  score = model_score_fn(cfg, num_heads=min(k, cfg.num_prediction_heads))
  if cache_sharding is not None:
    # Keep the cache split (batch over data, kv heads over model) through
    # every call of the loop, not only where XLA's propagation would put it.
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    score = _constrain_cache(score, cache_sharding)
  if reference:  # The plain greedy loop every exact method is tested against.
    return decoding.greedy_decode(score, params, prompts, prompt_lengths,
                                  cache, options)
  return core.run(score, params, prompts, prompt_lengths, cache, options,
                  drafter, key=key,
                  compact_fn=lambda c, src, off, end: c.move_slots(src, off,
                                                                   end))


def _constrain_cache(score: decoding.SplitScoreFn, cache_sharding):
  """`score` whose trunks pin the returned cache to `cache_sharding`."""

  def pinned(fn):
    def trunk(params, tokens, positions, cache, *args, **kwargs):
      hidden, cache = fn(params, tokens, positions, cache, *args, **kwargs)
      return hidden, jax.lax.with_sharding_constraint(cache, cache_sharding)
    return trunk

  return dataclasses.replace(
      score, trunk=pinned(score.trunk),
      prefill=None if score.prefill is None else pinned(score.prefill))


def _decode_fn(params, prompts, prompt_lengths, key, arrays, source=None, *,
               cfg: ModelConfig, options: DecodeOptions,
               method: methods.Method) -> DecodeOutput:
  return _decode_impl(params, prompts, prompt_lengths, key, arrays, source,
                      cfg=cfg, options=options, method=method)


# Compiled with XLA:CPU's decoding options where the weights live on the CPU
# (`cpu_compile`).
_decode = cpu_compile.jit(_decode_fn,
                          static_argnames=("cfg", "options", "method"))


@functools.lru_cache(maxsize=64)
def _sharded_decoder(cfg: ModelConfig, options: DecodeOptions,
                     method: methods.Method, mesh: jax.sharding.Mesh, rules,
                     prompts_shape):
  """`_decode` jitted for one mesh: params, prompts and cache sharded.

  Cached per (config, options, method, mesh, rules, shapes), so repeated
  calls reuse one compiled function. Returns (fn, param, prompt and row
  shardings); the key and the method's arrays are replicated.
  """
  batch, p = prompts_shape
  cache_shape = jax.eval_shape(functools.partial(
      transformer.make_cache, cfg, batch,
      cache_length(p, options.max_new_tokens, _cache_slots(method, options))))
  param_sh = sharding_lib.param_shardings(cfg, mesh, rules)
  prompt_sh = sharding_lib.batch_sharding(mesh, prompts_shape, rules)
  row_sh = sharding_lib.batch_sharding(mesh, (batch,), rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(
      functools.partial(
          _decode_impl, cfg=cfg, options=options, method=method,
          cache_sharding=sharding_lib.cache_shardings(mesh, cache_shape,
                                                      rules)),
      in_shardings=(param_sh, prompt_sh, row_sh, replicated, replicated),
      out_shardings=row_sh)
  return fn, param_sh, prompt_sh, row_sh


# Hydra slot tables already built, per set of weights (`_once_per_arrays`).
_HYDRA_TABLES: dict = {}


@functools.partial(jax.jit, static_argnames=("cfg", "block_size"))
def _build_hydra_tables(params, cfg, block_size):
  return transformer.hydra_slot_tables(params, cfg, block_size)


def _hydra_tables(params, cfg: ModelConfig, block_size: int):
  """`transformer.hydra_slot_tables` for these weights, built once per set
  of arrays (inline when the weights are traced, e.g. under a caller's
  jit)."""
  if not transformer.hydra_tables_fit(cfg, block_size):
    return None
  leaves = [params["embed"]["embedding"]] + [
      params["proposal_heads"][f"head_{j}"]["fc_in"]["kernel"]
      for j in range(2, block_size + 1)]
  if not all(_is_concrete(x) for x in leaves):
    return transformer.hydra_slot_tables(params, cfg, block_size)
  return _once_per_arrays(
      _HYDRA_TABLES, leaves,
      lambda: _build_hydra_tables(params, cfg, block_size),
      tag=(cfg, block_size), size=4)


# Fused projections already built, per set of weights (`_once_per_arrays`).
_FUSED: dict = {}
# Whether decoding on XLA:CPU adds the fused projections (tests turn it off
# to compare).
FUSE_PROJECTIONS_ON_CPU = True


@functools.partial(jax.jit, static_argnames=("cfg",))
def _build_fused(params, cfg):
  return transformer.fused_projections(params, cfg)


def with_fused_projections(params, cfg: ModelConfig):
  """params plus each layer's fused query/key/value and gate/up projections
  (`transformer.with_fused_projections`) where the weights are concrete
  arrays on XLA:CPU, built once per set of arrays (the cache holds the
  joined copies, about 0.7x the layers' weights, for the 4 latest sets of
  weights still alive); params unchanged elsewhere (accelerators, a
  caller's jit, numpy arrays) or when FUSE_PROJECTIONS_ON_CPU is off."""
  if not FUSE_PROJECTIONS_ON_CPU or cfg.n_layers == 0:
    return params
  names = (("attn", ("q", "k", "v")),) + (
      (("mlp", ("gate", "up")),) if cfg.mlp == "swiglu" else ())
  leaves = [x for i in range(cfg.n_layers) for module, parts in names
            for part in parts
            for x in params[f"layer_{i}"][module][part].values()]
  if not (all(isinstance(x, jax.Array) for x in leaves)
          and cpu_compile.on_cpu(leaves)):
    return params
  fused = _once_per_arrays(_FUSED, leaves,
                           lambda: _build_fused(params, cfg), tag=cfg,
                           size=4)
  return transformer.with_fused_projections(params, fused)


class HostArraysWarning(UserWarning):
  """Weights passed to a decode as numpy (host) arrays: every call copies
  them to the device again."""


def _warn_host_arrays(tree, name: str) -> None:
  """Warns (once per call site, Python's default filter) when `tree` holds
  numpy arrays: a jitted call copies them to the device on every call,
  which for the demo base costs more than a decoding step."""
  host = [x for x in jax.tree_util.tree_leaves(tree)
          if isinstance(x, np.ndarray)]
  if host:
    mib = sum(x.nbytes for x in host) / 2**20
    warnings.warn(
        f"{name}: {len(host)} arrays ({mib:.1f} MiB) are numpy arrays on the "
        "host, so every decode call copies them to the device again; place "
        "them on the device once with jax.device_put (e.g. `params = "
        "jax.device_put(params)`).", HostArraysWarning,
        stacklevel=_caller_stacklevel())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
  """`warnings.warn`'s stacklevel of the first frame outside blockdec."""
  level, frame = 2, sys._getframe(2)  # pylint: disable=protected-access
  while frame is not None and frame.f_code.co_filename.startswith(
      _PACKAGE_DIR):
    frame, level = frame.f_back, level + 1
  return level


def _run_decode(params, prompts, prompt_lengths, cfg, options, method, mesh,
                rules, key, source=None) -> DecodeOutput:
  arrays = method.arrays_for(params, cfg, options.block_size)
  _warn_host_arrays(params, "params")
  _warn_host_arrays(arrays, f"{type(method).__name__}'s weights")
  method = method.without_arrays()
  if mesh is None:
    params = with_fused_projections(params, cfg)
    return _decode(params, prompts, prompt_lengths, key, arrays, source,
                   cfg=cfg, options=options, method=method)
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (blockdec.make_mesh), "
                    f"got {type(mesh).__name__}.")
  # Halving the batch mid-loop would change the row count the mesh and the
  # cache's sharding constraints were laid out for.
  options = dataclasses.replace(options, compact_rows=False)
  rules = sharding_lib.DEFAULT_RULES if rules is None else \
      sharding_lib.ShardingConfig(rules=rules).rules
  fn, param_sh, prompt_sh, row_sh = _sharded_decoder(
      cfg, options, method, mesh, rules, tuple(prompts.shape))
  # A no-op for arrays already placed this way (e.g. by shard_params).
  params = jax.device_put(params, param_sh)
  prompts = jax.device_put(prompts, prompt_sh)
  prompt_lengths = jax.device_put(prompt_lengths, row_sh)
  # The method's arrays are replicated (Hydra's tables, built from sharded
  # weights, come out sharded).
  arrays = jax.device_put(arrays, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  # The mesh in context lets the Pallas attention wrap itself in shard_map.
  with jax.set_mesh(mesh):
    return fn(params, prompts, prompt_lengths, key, arrays)


def _cache_slots(method: methods.Method, options: DecodeOptions) -> int:
  """Cache slots one call of `method` writes past the committed length."""
  return method.cache_slots(options.block_size)


def decode(params, cfg: ModelConfig, prompts, prompt_lengths,
           max_new_tokens: int = 64, *,
           method: methods.Method = methods.Blockwise(),
           sampling: decoding.Sampling | None = None,
           key: jax.Array | None = None, eos_id: int | None = None,
           pad_id: int = 0, mesh: jax.sharding.Mesh | None = None,
           rules=None, compact_rows: bool = True, source=None,
           source_lengths=None) -> DecodeOutput:
  """Decodes with any method of the draft-and-verify family.

  Args:
    params: from `init_params` or a checkpoint.
    cfg: the model's config.
    prompts: int [B, P], right-padded.
    prompt_lengths: int [B], each in [1, P].
    max_new_tokens: budget N per row.
    method: `blockdec.Autoregressive()`, `blockdec.Blockwise(block_size,
      acceptance, adaptive)` (default: all heads, `Exact()`),
      `blockdec.Refined(...)`, `blockdec.DraftModel(draft_cfg,
      draft_params, block_size)`, `blockdec.Eagle(block_size)`,
      `blockdec.PromptLookup(ngram, block_size)`, `blockdec.Lookahead(...)`
      or `blockdec.BlockDiffusion(...)`.
    sampling: None for greedy decoding, or `blockdec.Sampling(temperature,
      top_k, top_p)`: `Autoregressive` then samples ancestrally and the
      drafting methods verify by lossless speculative sampling (with
      `Exact()`), so the output is distributed as the model's own samples.
    key: `jax.random.key(seed)`, required with sampling. A row's draws
      depend only on the key, its index in the batch and its position, so
      the same key and inputs give the same output.
    eos_id: a token that ends its row (counted in `lengths`), or None.
    pad_id: written after each row's end.
    mesh: run sharded on this ``("data", "model")`` mesh
      (`blockdec.make_mesh`): batch rows over ``data``; heads, MLP,
      vocabulary and the KV cache's kv heads over ``model``. None: one
      device.
    rules: logical-axis rules for the mesh (default
      `blockdec.sharding.DEFAULT_RULES`).
    compact_rows: once at most half of the rows are still decoding, go on
      with a batch of half the size (same tokens; the stragglers stop paying
      for finished rows). Ignored with a mesh.
    source: an encoder-decoder's (`cfg.encoder_layers > 0`) source tokens
      int [B, S], right-padded; encoded once, then every method decodes the
      target from `prompts` (e.g. a BOS token) as for an LM. None for a
      decoder-only model.
    source_lengths: int [B], each in [1, S] (with `source`).

  Returns:
    `DecodeOutput`: tokens [B, N] (`pad_id` after each row's end), lengths
    [B], num_calls [B] (model calls after prefill while the row was
    active), accepted_hist [B, K] (`accepted_hist[b, a-1]` counts row b's
    calls that committed a tokens); `block_efficiency` is tokens per call.
  """
  if not isinstance(method, methods.Method):
    raise TypeError(f"method={method!r} must be a blockdec method spec: "
                    "Autoregressive(), Blockwise(...), Refined(...), "
                    "DraftModel(...), PromptLookup(...).")
  if sampling is not None and not isinstance(sampling, decoding.Sampling):
    raise TypeError(f"sampling={sampling!r} must be None (greedy) or a "
                    "blockdec.Sampling(temperature, top_k, top_p).")
  _check_cfg(cfg)
  max_new_tokens = validation.check_int("max_new_tokens", max_new_tokens,
                                        low=1)
  eos_id = _check_token_arg("eos_id", eos_id, cfg, optional=True)
  pad_id = _check_token_arg("pad_id", pad_id, cfg)
  compact_rows = validation.check_bool("compact_rows", compact_rows)
  key = _check_key(key, sampling)
  block_size = method.resolve_block_size(cfg)
  if not method.reads_heads and (isinstance(block_size, bool) or not
                                 isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"{type(method).__name__} block size {block_size!r} must "
                     "be a positive int.")
  prompts, prompt_lengths = _check_inputs(
      params, cfg, prompts, prompt_lengths, max_new_tokens,
      block_size if method.reads_heads else 1)
  source = _check_source(cfg, source, source_lengths, prompts.shape[0],
                         method, mesh)
  acceptance = method.verifier(cfg)
  if not isinstance(acceptance, decoding.Verifier):
    raise TypeError(f"acceptance={acceptance!r} must be a blockdec verifier "
                    "(Exact(), Typical(...), TopK(n), Distance(eps), "
                    "MinBlock(l)).")
  acceptance.validate(block_size, sampling)
  adaptive = method.adaptive
  if adaptive is not None:
    if not isinstance(adaptive, decoding.AdaptiveBlockSize):
      raise TypeError(f"adaptive={adaptive!r} must be None or a "
                      "blockdec.AdaptiveBlockSize.")
    adaptive.validate(block_size)
  if isinstance(method, methods.Refined):
    _check_refined(method, cfg, sampling)
  method.check(cfg, sampling, positions=prompts.shape[1] + max_new_tokens)
  options = DecodeOptions(max_new_tokens=max_new_tokens, block_size=block_size,
                          acceptance=acceptance, eos_id=eos_id, pad_id=pad_id,
                          compact_rows=bool(compact_rows), adaptive=adaptive,
                          sampling=sampling)
  return _run_decode(params, prompts, prompt_lengths, cfg, options, method,
                     mesh, rules, key, source)


def _check_source(cfg, source, source_lengths, batch, method, mesh):
  """(source [B, S] int32, source_lengths [B] int32) of an encoder-decoder,
  or None for a decoder-only model; raises on anything else."""
  if not cfg.encoder_layers:
    if source is not None or source_lengths is not None:
      raise ValueError("source/source_lengths are for an encoder-decoder "
                       "(encoder_layers > 0); this model is decoder-only: "
                       "put the context in prompts.")
    return None
  if source is None or source_lengths is None:
    raise ValueError(f"this model is an encoder-decoder (encoder_layers="
                     f"{cfg.encoder_layers}): pass source [B, S] and "
                     "source_lengths [B] (the prompts are the target's start, "
                     "e.g. its BOS token).")
  if mesh is not None:
    raise ValueError("decoding an encoder-decoder on a mesh is not "
                     "supported; pass mesh=None.")
  if isinstance(method, methods.DraftModel):
    raise ValueError("DraftModel drafts with a decoder-only LM, which cannot "
                     "read an encoder-decoder's source; use Blockwise, "
                     "Refined, PromptLookup or Lookahead.")
  source, source_lengths = jnp.asarray(source), jnp.asarray(source_lengths)
  if source.ndim != 2 or source.shape[0] != batch or source.shape[1] == 0:
    raise ValueError(f"source must be a non-empty int array [B={batch}, S], "
                     f"got shape {source.shape}.")
  validation.check_int_dtype("source", source)
  if source_lengths.shape != (batch,):
    raise ValueError(f"source_lengths must have shape ({batch},), got "
                     f"{source_lengths.shape}.")
  validation.check_int_dtype("source_lengths", source_lengths)
  s = source.shape[1]
  if s > cfg.max_seq_len:
    raise ValueError(f"source width S={s} exceeds max_seq_len="
                     f"{cfg.max_seq_len}.")
  if _is_concrete(source_lengths):
    lengths = np.asarray(source_lengths)
    if lengths.min() < 1 or lengths.max() > s:
      raise ValueError(f"source_lengths={lengths.tolist()} must all be in "
                       f"[1, S={s}] (an empty source has nothing to "
                       "translate).")
    valid = np.arange(s)[None, :] < lengths[:, None]
    _check_token_ids("source", source, cfg.vocab_size, valid)
  return source.astype(jnp.int32), source_lengths.astype(jnp.int32)


def _check_key(key, sampling):
  if sampling is None:
    return None
  if key is None:
    raise ValueError("sampling needs a PRNG key: pass key=jax.random.key(seed) "
                     "(same key and inputs, same output).")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be one PRNG key, got shape {key.shape}.")
    return key
  if key.shape == (2,) and key.dtype == jnp.uint32:  # jax.random.PRNGKey(...)
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be jax.random.key(seed) (or a legacy uint32[2] "
                   f"PRNGKey), got dtype {key.dtype} shape {key.shape}.")


def _check_refined(method, cfg, sampling):
  if cfg.head_type == "hydra":
    raise ValueError("Refined searches a lattice of independent heads' "
                     "candidates, but this model's proposal heads are Hydra "
                     "heads (head_type='hydra'), which read the drafted "
                     "tokens: decode with blockdec.Blockwise(block_size).")
  if method.lattice_width > cfg.vocab_size:
    raise ValueError(f"lattice_width={method.lattice_width!r} must be in "
                     f"[1, vocab_size={cfg.vocab_size}].")
  if method.ngram is not None and method.ngram.vocab_size != cfg.vocab_size:
    raise ValueError(f"the n-gram LM's vocab_size={method.ngram.vocab_size} "
                     f"differs from the model's {cfg.vocab_size}.")
  if method.rescorer is not None:
    rescorer_cfg, rescorer_params = method.rescorer
    check_params(rescorer_params, rescorer_cfg, name="rescorer params")
    if rescorer_cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"the rescorer's vocab_size={rescorer_cfg.vocab_size} "
                       f"differs from the model's {cfg.vocab_size}.")
  if method.adaptive is not None and method.num_drafts > 1:
    raise ValueError("the adaptive draft length works on one chain; got "
                     f"Refined(num_drafts={method.num_drafts}).")


def greedy_decode(params, cfg: ModelConfig, prompts, prompt_lengths, *,
                  max_new_tokens: int = 64, eos_id: int | None = None,
                  pad_id: int = 0, mesh: jax.sharding.Mesh | None = None,
                  rules=None, source=None, source_lengths=None
                  ) -> DecodeOutput:
  """Greedy decoding with head 1: `decode(method=Autoregressive())`.

  Returns:
    `DecodeOutput` with tokens [B, N], lengths [B], num_calls [B]
    (== lengths), accepted_hist [B, 1]. Arguments as in `decode`.
  """
  return decode(params, cfg, prompts, prompt_lengths, max_new_tokens,
                method=methods.Autoregressive(), eos_id=eos_id, pad_id=pad_id,
                mesh=mesh, rules=rules, source=source,
                source_lengths=source_lengths)


def blockwise_decode(params, cfg: ModelConfig, prompts, prompt_lengths, *,
                     max_new_tokens: int = 64, block_size: int | None = None,
                     acceptance: AcceptanceRule = Exact(),
                     eos_id: int | None = None,
                     pad_id: int = 0, mesh: jax.sharding.Mesh | None = None,
                     rules=None, compact_rows: bool = True,
                     adaptive: decoding.AdaptiveBlockSize | None = None,
                     source=None, source_lengths=None) -> DecodeOutput:
  """Blockwise parallel decoding with the model's proposal heads, greedy:
  `decode(method=Blockwise(block_size, acceptance, adaptive))`.

  With `acceptance=Exact()` (the default) the tokens equal `greedy_decode`'s.
  Arguments as in `decode` and `blockdec.Blockwise`.

  Returns:
    `DecodeOutput`; `accepted_hist[b, a-1]` counts row b's calls that
    accepted a tokens, and `block_efficiency` is tokens per call.
  """
  block_size = validation.check_int("block_size", block_size, optional=True)
  return decode(params, cfg, prompts, prompt_lengths, max_new_tokens,
                method=methods.Blockwise(block_size=block_size,
                                         acceptance=acceptance,
                                         adaptive=adaptive),
                eos_id=eos_id, pad_id=pad_id, mesh=mesh, rules=rules,
                compact_rows=compact_rows, source=source,
                source_lengths=source_lengths)


def refined_blockwise_decode(params, cfg: ModelConfig, prompts,
                             prompt_lengths, *, max_new_tokens: int = 64,
                             block_size: int | None = None,
                             num_drafts: int = 1, lattice_width: int = 4,
                             beam_width: int | None = None,
                             ngram: decoding.NGramLM | None = None,
                             ngram_weight: float = 1.0,
                             rescorer: tuple | None = None,
                             rescorer_weight: float = 1.0,
                             rescorer_parallel: bool = False,
                             acceptance: AcceptanceRule = Exact(),
                             eos_id: int | None = None,
                             pad_id: int = 0,
                             mesh: jax.sharding.Mesh | None = None,
                             rules=None, compact_rows: bool = True,
                             adaptive: decoding.AdaptiveBlockSize | None = None
                             ) -> DecodeOutput:
  """Blockwise decoding with rescored lattice drafts (Kim et al. 2024), greedy:
  `decode(method=Refined(...))`; see `blockdec.Refined` for the options.

  With `Exact()` the tokens equal `greedy_decode`'s whatever the drafts.

  Returns:
    `DecodeOutput`; `block_efficiency` is tokens per (main-model) call.
  """
  block_size = validation.check_int("block_size", block_size, optional=True)
  num_drafts = validation.check_int("num_drafts", num_drafts)
  lattice_width = validation.check_int("lattice_width", lattice_width)
  beam_width = validation.check_int("beam_width", beam_width, optional=True)
  return decode(params, cfg, prompts, prompt_lengths, max_new_tokens,
                method=methods.Refined(
                    block_size=block_size, num_drafts=num_drafts,
                    lattice_width=lattice_width, beam_width=beam_width,
                    ngram=ngram, ngram_weight=ngram_weight, rescorer=rescorer,
                    rescorer_weight=rescorer_weight,
                    rescorer_parallel=rescorer_parallel,
                    acceptance=acceptance, adaptive=adaptive),
                eos_id=eos_id, pad_id=pad_id, mesh=mesh, rules=rules,
                compact_rows=compact_rows)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_logits(params, tokens, source, cfg):
  return transformer.forward_logits(params, cfg, tokens,
                                    *(source or (None, None)))


def forward_logits(params, cfg: ModelConfig, tokens, source=None,
                   source_lengths=None) -> jax.Array:
  """Head-1 logits [B, T, V] (float32) of full sequences tokens [B, T]; an
  encoder-decoder's given its source [B, S] and source_lengths [B]."""
  check_params(params, cfg)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or 0 in tokens.shape:
    raise ValueError(f"tokens must be a non-empty int array [B, T], got "
                     f"shape {tokens.shape}.")
  validation.check_int_dtype("tokens", tokens)
  if tokens.shape[1] > cfg.max_seq_len:
    raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                     f"max_seq_len={cfg.max_seq_len}.")
  _check_token_ids("tokens", tokens, cfg.vocab_size)
  source = _check_source(cfg, source, source_lengths, tokens.shape[0],
                         methods.Autoregressive(), None)
  return _forward_logits(params, tokens.astype(jnp.int32), source, cfg)


# ----------------------------------------------------------------- validation


@functools.lru_cache(maxsize=32)
def _expected_shapes(cfg: ModelConfig):
  shapes = jax.eval_shape(functools.partial(transformer.init_params, cfg),
                          jax.random.key(0))
  return jax.tree_util.tree_flatten_with_path(shapes)


def _check_cfg(cfg) -> None:
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"cfg must be a blockdec.ModelConfig, got {type(cfg).__name__}.")


# Sets of device arrays already found to fit a config (`_once_per_arrays`):
# a model decoded many times is walked once per config, not once per call.
_PARAMS_CHECKED: dict = {}


def check_params(params, cfg: ModelConfig, *, name: str = "params") -> None:
  """Raises ValueError if `params` do not have the structure `cfg` implies,
  or if a weight is NaN or infinite (checked once per set of device arrays
  and config; the finite check is skipped for tracers, e.g. under a
  caller's `jax.jit`)."""
  _check_cfg(cfg)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if leaves and all(isinstance(x, jax.Array) and _is_concrete(x)
                    for x in leaves):
    _once_per_arrays(_PARAMS_CHECKED, leaves,
                     lambda: _check_params(params, cfg, name),
                     tag=(cfg, treedef))
  else:
    _check_params(params, cfg, name)


def _check_params(params, cfg: ModelConfig, name: str) -> None:
  expected, expected_def = _expected_shapes(cfg)
  got, got_def = jax.tree_util.tree_flatten_with_path(params)
  if got_def != expected_def:
    want = {jax.tree_util.keystr(p) for p, _ in expected}
    have = {jax.tree_util.keystr(p) for p, _ in got}
    missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
    raise ValueError(
        f"{name} do not match the config: "
        f"missing {missing}, unexpected {extra} (showing up to 5 each). "
        "Were they made for another ModelConfig (e.g. num_prediction_heads "
        f"or n_layers)? cfg={cfg}")
  for (path, want), (_, have) in zip(expected, got):
    if tuple(want.shape) != tuple(np.shape(have)):
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} has shape {tuple(np.shape(have))}"
          f" but the config implies {tuple(want.shape)}; cfg={cfg}")
  _check_finite(got, name)


def _once_per_arrays(store: dict, leaves, build, *, tag=None, size: int = 16):
  """`build()`, run once per set of concrete arrays `leaves` and kept in
  `store` under (tag, their ids); weak references guard the entry, so a
  freed array's reused id is not mistaken for it. Not kept when `build`
  raises or an array cannot be weakly referenced; the oldest of `size`
  entries makes room, after the entries of freed arrays."""
  key = (tag, tuple(id(x) for x in leaves))
  hit = store.get(key)
  if hit is not None and all(r() is x for r, x in zip(hit[0], leaves)):
    return hit[1]
  # Eagerly, even under a caller's jax.jit whose function closes over the
  # arrays: staged there, a result could not be read on the host (the
  # finite check) and, kept, would leak that trace's tracers into later
  # calls (the Hydra tables).
  with jax.ensure_compile_time_eval():
    value = build()
  try:
    refs = tuple(weakref.ref(x) for x in leaves)
  except TypeError:
    return value
  # Entries of freed arrays go first: their values (e.g. fused weights)
  # would otherwise stay alive until evicted.
  for dead in [k for k, (rs, _) in store.items()
               if any(r() is None for r in rs)]:
    del store[dead]
  if len(store) >= size:
    store.pop(next(iter(store)))
  store[key] = (refs, value)
  return value


# Sets of parameter arrays already found finite, so a model decoded many
# times is scanned once (`_once_per_arrays`).
_FINITE_CHECKED: dict = {}


@jax.jit
def _non_finite_counts(leaves):
  return jnp.stack([jnp.sum(~jnp.isfinite(x)) for x in leaves])


def _check_finite(flat, name: str) -> None:
  """Raises ValueError naming the first leaf of `flat` (path, array pairs)
  holding NaN or inf: such weights make every logit NaN, and the argmax of
  NaN logits is token 0, so decoding would return zeros at full speed."""
  leaves = [leaf for _, leaf in flat]
  if not leaves or not all(_is_concrete(x) for x in leaves):
    return

  def check():
    counts = np.asarray(_non_finite_counts(leaves))
    if counts.any():
      i = int(np.flatnonzero(counts)[0])
      path, leaf = flat[i]
      raise ValueError(
          f"{name}{jax.tree_util.keystr(path)} holds {int(counts[i])} NaN or "
          f"infinite values of {np.size(leaf)} ({int((counts > 0).sum())} of "
          f"{len(leaves)} arrays are affected); non-finite weights make every "
          "logit NaN. Load the checkpoint again or check the training run's "
          "loss.")

  _once_per_arrays(_FINITE_CHECKED, leaves, check)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_token_ids(name, tokens, vocab_size, valid=None):
  if not _is_concrete(tokens):
    return
  values = np.asarray(tokens)
  if valid is not None:
    values = values[np.asarray(valid)]
  if values.size and (values.min() < 0 or values.max() >= vocab_size):
    bad = values[(values < 0) | (values >= vocab_size)][0]
    raise ValueError(f"{name} holds token id {int(bad)} outside the vocabulary "
                     f"[0, {vocab_size}).")


def _check_token_arg(name, value, cfg, optional=False):
  """A token id argument (eos_id, pad_id) as a Python int in the vocabulary."""
  return validation.check_int(name, value, low=0, high=cfg.vocab_size - 1,
                              optional=optional,
                              hint=f" (vocab_size={cfg.vocab_size})")


def _check_inputs(params, cfg, prompts, prompt_lengths, max_new_tokens,
                  block_size):
  check_params(params, cfg)
  # Host inputs are checked and masked on the host and sent once; a jax
  # array is kept (a tracer under the caller's jit, or an array on device).
  prompts, prompt_lengths = _as_array(prompts), _as_array(prompt_lengths)
  if prompts.ndim != 2 or prompts.shape[1] == 0 or prompts.shape[0] == 0:
    raise ValueError(
        f"prompts must be a non-empty int array [B, P], got shape {prompts.shape}.")
  validation.check_int_dtype("prompts", prompts)
  if prompt_lengths.shape != (prompts.shape[0],):
    raise ValueError(f"prompt_lengths must have shape ({prompts.shape[0]},), "
                     f"got {prompt_lengths.shape}.")
  validation.check_int_dtype("prompt_lengths", prompt_lengths)
  k = cfg.num_prediction_heads
  if not validation.is_int(block_size) or not 1 <= block_size <= k:
    raise ValueError(f"block_size={block_size!r} must be an int in [1, {k}] "
                     f"(the model has num_prediction_heads={k}).")
  p = prompts.shape[1]
  if _is_concrete(prompt_lengths):
    lengths = np.asarray(prompt_lengths)
    if lengths.min() < 1:
      raise ValueError(
          f"empty prompt: prompt_lengths={lengths.tolist()} must all be >= 1 "
          "(a row needs at least one token to condition on).")
    if lengths.max() > p:
      raise ValueError(f"prompt_lengths={lengths.tolist()} exceed the prompt "
                       f"width P={p}.")
    longest = int(lengths.max())
    valid = np.arange(p)[None, :] < lengths[:, None]
    _check_token_ids("prompts", prompts, cfg.vocab_size, valid)
  else:
    longest = p
  if longest + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"prompt length {longest} + max_new_tokens={max_new_tokens} = "
        f"{longest + max_new_tokens} exceeds max_seq_len={cfg.max_seq_len}.")
  # Host arrays stay numpy (the compiled call sends them in its own C++
  # dispatch) and jax arrays as they are; the compiled call masks the
  # padding itself (`_decode_impl`), tracers under a caller's jit included.
  return _as_array(prompts, np.int32), _as_array(prompt_lengths, np.int32)


def _as_array(x, dtype=None):
  """`x` itself if a jax array (or tracer), else a numpy array; cast to
  `dtype` if given."""
  if isinstance(x, jax.Array):
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)
  return np.asarray(x, dtype=dtype)
