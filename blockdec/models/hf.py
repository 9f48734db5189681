"""Import and export of Hugging Face checkpoints (GPT-2 and the Llama family).

A checkpoint is the common local folder layout:

  config.json                      architecture and sizes
  model.safetensors                weights, or
  model.safetensors.index.json     + model-0000i-of-0000n.safetensors (sharded)
  tokenizer.json                   optional, read by `load_hf_tokenizer`
  blockdec_heads.safetensors       optional, blockdec's proposal heads 2..k

Weights are read with `safetensors` into NumPy (no torch), in float32,
bfloat16 or float16, and cast to the requested dtype.

Supported architectures and how they map onto `ModelConfig`:

  GPT2LMHeadModel     learned positions, LayerNorm (with bias), tanh-GELU MLP,
                      biases on every projection; `c_attn` is a Conv1D
                      [d, 3d] split into q, k, v (Conv1D stores [in, out], so
                      no transpose).
  LlamaForCausalLM    RoPE (default or Llama-3 scaling), RMSNorm, SwiGLU, GQA;
  MistralForCausalLM  attention/MLP biases only when both are on (proj_bias).
                      Mistral's sliding window is exact for sequences no
                      longer than the window, so `max_seq_len` is capped there.
  Qwen2ForCausalLM    Llama plus q/k/v biases (qkv_bias=True, proj_bias=False).

HF `nn.Linear` stores weights [out, in]; Flax `Dense` kernels are [in, out],
so they are transposed on the way in and out.

Proposal heads are not part of any HF architecture. `export_hf_checkpoint`
writes them to `blockdec_heads.safetensors` beside the model, which
transformers ignores, and `load_hf_checkpoint` reads them back; heads the
file lacks (or every head, for a plain HF checkpoint) are freshly initialised
from `seed`, ready to be trained on the frozen model.

    cfg, params = blockdec.load_hf_checkpoint("path/to/llama",
                                              num_prediction_heads=4)
    tokenizer = blockdec.load_hf_tokenizer("path/to/llama")  # tokenizers.Tokenizer
    blockdec.export_hf_checkpoint(cfg, params, "path/to/out")
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from blockdec.config import ModelConfig
from blockdec.models import transformer

HEADS_FILE = "blockdec_heads.safetensors"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"

# architectures entry -> family; model_type is the fallback when a config has
# no `architectures`.
SUPPORTED_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "mistral",
                "qwen2": "qwen2"}
_ARCH_OF_FAMILY = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
# Buffers some exporters store next to the weights; they hold no parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# ------------------------------------------------------------------ config


def _supported_list() -> str:
  return (f"architectures {sorted(SUPPORTED_ARCHITECTURES)} "
          f"(model_type {sorted(_MODEL_TYPES)})")


def _family(hf: dict, where: str) -> str:
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  for arch in archs:
    if arch in SUPPORTED_ARCHITECTURES:
      family = SUPPORTED_ARCHITECTURES[arch]
      implied = _MODEL_TYPES.get(model_type)
      if model_type is not None and implied != family:
        warnings.warn(
            f"{where}: architectures={archs!r} (read as {family}) contradicts "
            f"model_type={model_type!r}; reading the checkpoint as {family}, "
            "as architectures says. Fix config.json if that is wrong.",
            stacklevel=3)
      return family
  if not archs and model_type in _MODEL_TYPES:
    return _MODEL_TYPES[model_type]
  raise ValueError(
      f"{where}: architectures={archs!r}, model_type={model_type!r} is not "
      f"supported; blockdec reads {_supported_list()}.")


def _rope(hf: dict, where: str):
  """(rope_theta, rope_scaling tuple or None) from either config style.

  transformers 5 writes `rope_parameters` = {rope_type, rope_theta, ...};
  older configs have top-level `rope_theta` and `rope_scaling`.
  """
  params = dict(hf.get("rope_parameters") or {})
  if not params:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type == "llama3":
    try:
      scaling = (float(params["factor"]), float(params["low_freq_factor"]),
                 float(params["high_freq_factor"]),
                 int(params["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}: "
                       f"{params}.") from None
    return theta, scaling
  raise ValueError(f"{where}: rope_type={rope_type!r} is not supported; "
                   "allowed: 'default', 'llama3'.")


def config_from_hf(hf: dict, *, num_prediction_heads: int = 1,
                   head_hidden: int | None = None,
                   max_seq_len: int | None = None, dtype: str = "float32",
                   where: str = CONFIG_FILE,
                   head_type: str = "stern") -> tuple[ModelConfig, str]:
  """A `ModelConfig` and the family name for an HF `config.json` dict.

  Raises ValueError naming the option when the checkpoint uses something
  blockdec's Transformer does not compute (so its logits would differ).
  """
  family = _family(hf, where)
  common = dict(num_prediction_heads=num_prediction_heads,
                head_hidden=head_hidden, head_type=head_type, dtype=dtype,
                param_dtype=dtype,
                vocab_size=int(hf["vocab_size"]))
  if family == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"{where}: activation_function={act!r} is not supported;"
                       " allowed: 'gelu_new', 'gelu_pytorch_tanh'.")
    for key, want in (("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
      if hf.get(key, want) != want:
        raise ValueError(f"{where}: {key}={hf[key]!r} is not supported; "
                         f"blockdec needs {want}.")
    n_positions = int(hf.get("n_positions", 1024))
    _warn_cap(max_seq_len, n_positions, f"n_positions={n_positions}", where)
    cfg = ModelConfig(
        d_model=int(hf["n_embd"]), n_layers=int(hf["n_layer"]),
        n_heads=int(hf["n_head"]), d_ff=hf.get("n_inner") or None,
        max_seq_len=min(max_seq_len or n_positions, n_positions),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="gelu", position="learned", qkv_bias=True, proj_bias=True,
        **common)
    return cfg, family

  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{where}: hidden_act={act!r} is not supported; "
                     "allowed: 'silu' (SwiGLU).")
  d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or d_model // n_heads
  if family == "qwen2":
    qkv_bias, proj_bias = True, False
  else:
    attn_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
      raise ValueError(
          f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
          "supported; blockdec's proj_bias covers both (set both equal).")
    qkv_bias = proj_bias = attn_bias
  theta, scaling = _rope(hf, where)
  limit = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  sliding = (family == "mistral" or hf.get("use_sliding_window", False)
             or "sliding_attention" in (hf.get("layer_types") or []))
  why = f"max_position_embeddings={limit}"
  if window and sliding and int(window) < limit:
    # Full attention equals sliding-window attention up to the window.
    if max_seq_len is None or max_seq_len > int(window):
      warnings.warn(
          f"{where}: sliding_window={window} is below {why}; blockdec "
          f"attends to every position, which is exact only up to the window, "
          f"so max_seq_len is capped at {window}.", stacklevel=3)
    limit, why = int(window), f"sliding_window={window}"
  _warn_cap(max_seq_len, limit, why, where)
  cfg = ModelConfig(
      d_model=d_model, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      d_ff=int(hf["intermediate_size"]),
      head_dim=None if head_dim * n_heads == d_model else int(head_dim),
      max_seq_len=min(max_seq_len or limit, limit),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp="swiglu", position="rope", rope_theta=theta, rope_scaling=scaling,
      qkv_bias=qkv_bias, proj_bias=proj_bias, **common)
  return cfg, family


def _warn_cap(max_seq_len, limit, why, where):
  if max_seq_len is not None and max_seq_len > limit:
    warnings.warn(f"{where}: max_seq_len={max_seq_len} exceeds the "
                  f"checkpoint's {why}; using max_seq_len={limit}.",
                  stacklevel=4)


def hf_family_of(cfg: ModelConfig) -> str:
  """The HF family whose layout holds `cfg`, or ValueError saying why none."""
  gpt2 = dict(norm="layernorm", mlp="gelu", position="learned", qkv_bias=True,
              proj_bias=True)
  llama = dict(norm="rmsnorm", mlp="swiglu", position="rope")
  if all(getattr(cfg, k) == v for k, v in gpt2.items()):
    if cfg.num_kv_heads != cfg.n_heads or cfg.head_dim not in (
        None, cfg.d_model // cfg.n_heads):
      raise ValueError(f"GPT-2 layout needs n_kv_heads == n_heads and "
                       f"head_dim == d_model / n_heads; got {cfg}.")
    return "gpt2"
  if all(getattr(cfg, k) == v for k, v in llama.items()):
    if cfg.qkv_bias and not cfg.proj_bias:
      return "qwen2"
    if cfg.proj_bias and not cfg.qkv_bias:
      raise ValueError("qkv_bias=False with proj_bias=True has no HF layout "
                       "(Llama's attention_bias covers q, k, v and o).")
    return "llama"
  raise ValueError(
      "No supported HF architecture matches this config: GPT-2 needs "
      f"{gpt2}, Llama/Qwen2 need {llama}; got norm={cfg.norm!r}, "
      f"mlp={cfg.mlp!r}, position={cfg.position!r}, qkv_bias={cfg.qkv_bias}, "
      f"proj_bias={cfg.proj_bias}.")


def hf_config_from(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """The config.json dict transformers needs to rebuild `cfg`'s model."""
  family = hf_family_of(cfg)
  base = {"architectures": [_ARCH_OF_FAMILY[family]], "model_type": family,
          "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
          "dtype": dtype}
  if family == "gpt2":
    return {**base, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True}
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    factor, low, high, original = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                high_freq_factor=high,
                original_max_position_embeddings=original)
  out = {**base, "hidden_size": cfg.d_model,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_per_head,
         "intermediate_size": cfg.ff_dim,
         "max_position_embeddings": cfg.max_seq_len,
         "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
         "rope_parameters": rope}
  if family == "llama":
    out.update(attention_bias=cfg.proj_bias, mlp_bias=cfg.proj_bias)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# ------------------------------------------------------------- weight names


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor and the blockdec parameter(s) it holds.

  `linear`: an HF nn.Linear weight [out, in], transposed to a Flax kernel.
  Several `params` split the HF tensor evenly along its last axis (GPT-2's
  fused c_attn: weight [d, 3d] -> q, k, v kernels; bias [3d] -> biases).
  """
  hf: str
  params: tuple[tuple[str, ...], ...]
  linear: bool = False


def _entries(cfg: ModelConfig, family: str) -> list[_Entry]:
  out = []
  add = lambda hf, *params, linear=False: out.append(
      _Entry(hf, tuple(params), linear))
  if family == "gpt2":
    add("wte.weight", ("embed", "embedding"))
    add("wpe.weight", ("pos_embed", "embedding"))
    for i in range(cfg.n_layers):
      p, h = f"layer_{i}", f"h.{i}"
      for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        add(f"{h}.{hf_norm}.weight", (p, norm, "scale"))
        add(f"{h}.{hf_norm}.bias", (p, norm, "bias"))
      for kind in ("weight", "bias"):
        leaf = "kernel" if kind == "weight" else "bias"
        add(f"{h}.attn.c_attn.{kind}", *[(p, "attn", n, leaf) for n in "qkv"])
        add(f"{h}.attn.c_proj.{kind}", (p, "attn", "o", leaf))
        add(f"{h}.mlp.c_fc.{kind}", (p, "mlp", "fc", leaf))
        add(f"{h}.mlp.c_proj.{kind}", (p, "mlp", "proj", leaf))
    add("ln_f.weight", ("final_norm", "scale"))
    add("ln_f.bias", ("final_norm", "bias"))
    if not cfg.tie_embeddings:
      add("lm_head.weight", ("lm_head", "kernel"), linear=True)
    return out

  add("model.embed_tokens.weight", ("embed", "embedding"))
  for i in range(cfg.n_layers):
    p, h = f"layer_{i}", f"model.layers.{i}"
    add(f"{h}.input_layernorm.weight", (p, "attn_norm", "scale"))
    add(f"{h}.post_attention_layernorm.weight", (p, "mlp_norm", "scale"))
    for n in "qkvo":
      add(f"{h}.self_attn.{n}_proj.weight", (p, "attn", n, "kernel"),
          linear=True)
      if (cfg.qkv_bias and n != "o") or (cfg.proj_bias and n == "o"):
        add(f"{h}.self_attn.{n}_proj.bias", (p, "attn", n, "bias"))
    for n in ("gate", "up", "down"):
      add(f"{h}.mlp.{n}_proj.weight", (p, "mlp", n, "kernel"), linear=True)
      if cfg.proj_bias:
        add(f"{h}.mlp.{n}_proj.bias", (p, "mlp", n, "bias"))
  add("model.norm.weight", ("final_norm", "scale"))
  if not cfg.tie_embeddings:
    add("lm_head.weight", ("lm_head", "kernel"), linear=True)
  return out


def _base_shapes(cfg: ModelConfig) -> dict:
  """Shapes of the trunk's params (proposal heads excluded)."""
  shapes = jax.eval_shape(
      lambda key: transformer.init_params(
          cfg.replace(num_prediction_heads=1), key), jax.random.key(0))
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _set(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


# -------------------------------------------------------------- safetensors


class _Tensors:
  """Name -> file index of a single-file or sharded safetensors checkpoint.

  Tensors are read one at a time on demand, so peak host memory stays near
  one copy of the model. GPT-2 checkpoints name their tensors with or without
  a `transformer.` prefix; both are accepted.
  """

  def __init__(self, path: str):
    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(single):
      files = {WEIGHTS_FILE: single}
      with safe_open(single, framework="np") as f:
        weight_map = {k: WEIGHTS_FILE for k in f.keys()}
    elif os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(path, name) for name in set(weight_map.values())}
      for name, file in files.items():
        if not os.path.exists(file):
          raise FileNotFoundError(
              f"{index} names shard {name!r}, which is not in {path}.")
    else:
      present = sorted(os.listdir(path))
      hint = (" (pytorch .bin weights are not read; convert them to "
              "safetensors)" if any(p.endswith(".bin") for p in present) else "")
      raise FileNotFoundError(
          f"No {WEIGHTS_FILE} or {INDEX_FILE} in {path}{hint}; "
          f"the folder holds {present}.")
    self.path = path
    self.files = files
    self.map = {}
    for key, file in weight_map.items():
      short = key[len("transformer."):] if key.startswith("transformer.") else key
      self.map[short] = (key, file)

  def names(self) -> set[str]:
    return set(self.map)

  def shape(self, name: str) -> tuple[int, ...]:
    key, file = self.map[name]
    with safe_open(self.files[file], framework="np") as f:
      return tuple(f.get_slice(key).get_shape())

  def get(self, name: str) -> np.ndarray:
    key, file = self.map[name]
    with safe_open(self.files[file], framework="np") as f:
      return f.get_tensor(key)


def _read_json(path: str) -> dict:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint folder {path!r} does not exist.")
  if not os.path.exists(file):
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {path}; a HF checkpoint folder holds "
        f"{CONFIG_FILE} and {WEIGHTS_FILE} (or {INDEX_FILE}).")
  with open(file) as f:
    return json.load(f)


# -------------------------------------------------------------------- load


def load_hf_checkpoint(path: str | os.PathLike, *,
                       num_prediction_heads: int | None = None,
                       head_hidden: int | None = None,
                       dtype: str = "float32", max_seq_len: int | None = None,
                       seed: int = 0) -> tuple[ModelConfig, dict]:
  """Reads an HF checkpoint folder into `(ModelConfig, params)`.

  Args:
    path: folder with config.json and model.safetensors (or a sharded index).
    num_prediction_heads: k, head 1 included. None: the number stored in
      `blockdec_heads.safetensors` if present, else 1 (the plain model).
      Heads the folder does not hold are initialised from `seed`.
    head_hidden: proposal-head FFN width for fresh heads (None: d_model, or
      the stored heads' width).
    dtype: "float32" or "bfloat16", for both parameters and activations;
      weights stored in any float dtype are cast to it.
    max_seq_len: lower the model's position limit (GPT-2's learned position
      table is cut to it); default the checkpoint's own.
    seed: seeds fresh proposal heads.

  Returns:
    `(cfg, params)`, where params have the structure `init_params(cfg)` has.

  Raises:
    FileNotFoundError: a missing folder, config.json or weights.
    ValueError: unsupported architectures or options, missing tensors, shape
      mismatches.
  """
  path = os.fspath(path)
  hf = _read_json(path)
  where = os.path.join(path, CONFIG_FILE)
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {sorted(_NP_DTYPES)}.")
  stored_heads, heads_meta = _read_heads(path)
  if num_prediction_heads is None:
    num_prediction_heads = int(heads_meta.get("num_prediction_heads", 1))
  if head_hidden is None and "head_hidden" in heads_meta:
    head_hidden = int(heads_meta["head_hidden"])
  cfg, family = config_from_hf(
      hf, num_prediction_heads=num_prediction_heads, head_hidden=head_hidden,
      max_seq_len=max_seq_len, dtype=dtype, where=where,
      head_type=heads_meta.get("head_type", "stern"))
  tensors = _Tensors(path)
  shapes = _base_shapes(cfg)
  np_dtype = _NP_DTYPES[dtype]
  entries = _entries(cfg, family)
  missing = [e.hf for e in entries if e.hf not in tensors.names()]
  if missing:
    raise ValueError(
        f"{path}: {len(missing)} tensors that {_ARCH_OF_FAMILY[family]} with "
        f"this config.json needs are missing, e.g. {missing[:5]}; the "
        f"checkpoint holds e.g. {sorted(tensors.names())[:5]}.")
  params: dict = {}
  for entry in entries:
    want = [_get(shapes, p) for p in entry.params]
    want_hf = list(want[0])
    if entry.hf == "wpe.weight":  # Learned positions may be cut short.
      want_hf[0] = tensors.shape(entry.hf)[0]
    want_hf[-1] = sum(w[-1] for w in want)
    if entry.linear:
      want_hf = want_hf[::-1]
    got = tensors.shape(entry.hf)
    if tuple(got) != tuple(want_hf) or (
        entry.hf == "wpe.weight" and got[0] < cfg.max_seq_len):
      raise ValueError(
          f"{path}: tensor {entry.hf!r} has shape {tuple(got)}, but "
          f"config.json implies {tuple(want_hf)}.")
    value = tensors.get(entry.hf)
    if entry.linear:
      value = value.T
    if entry.hf == "wpe.weight":
      value = value[:cfg.max_seq_len]
    parts = np.split(value, len(entry.params), axis=-1)
    for p, part in zip(entry.params, parts):
      _set(params, p, jnp.asarray(part.astype(np_dtype)))
  _check_unused(path, tensors, entries, params, cfg)
  if cfg.num_prediction_heads > 1:
    params["proposal_heads"] = _heads(cfg, stored_heads, seed)
  return cfg, params


def _check_unused(path, tensors, entries, params, cfg):
  """Errors on weights the mapping would silently drop.

  A tied checkpoint may still carry `lm_head.weight`; it is accepted when it
  equals the embedding.
  """
  used = {e.hf for e in entries}
  unused = sorted(n for n in tensors.names() - used
                  if not n.endswith(_IGNORED_SUFFIXES))
  if unused == ["lm_head.weight"] and cfg.tie_embeddings:
    head = tensors.get("lm_head.weight").astype(np.float32)
    embed = np.asarray(params["embed"]["embedding"], np.float32)
    if head.shape == embed.shape and np.allclose(head, embed):
      return
  if unused:
    raise ValueError(
        f"{path}: tensors {unused[:5]} ({len(unused)} in all) have no place in "
        "blockdec's model for this config.json; refusing to drop them "
        "(is tie_word_embeddings right, or is this another architecture?).")


def _read_heads(path: str) -> tuple[dict, dict]:
  """Stored proposal heads {"head_j": {...}} and the file's metadata."""
  file = os.path.join(path, HEADS_FILE)
  if not os.path.exists(file):
    return {}, {}
  heads: dict = {}
  with safe_open(file, framework="np") as f:
    meta = dict(f.metadata() or {})
    for key in f.keys():
      _set(heads, tuple(key.split(".")), f.get_tensor(key))
  return heads, meta


def _heads(cfg: ModelConfig, stored: dict, seed: int) -> dict:
  """Proposal heads 2..k: stored ones where present, fresh ones after."""
  d, k = cfg.d_model, cfg.num_prediction_heads
  dtype = transformer._dtype(cfg.dtype)
  embeddings = (jnp.zeros((1, 1, k - 1, d), dtype)
                if cfg.head_type == "hydra" else None)
  fresh = transformer.ProposalHeads(cfg).init(
      jax.random.key(seed), jnp.zeros((1, 1, d), dtype), k,
      embeddings)["params"]
  out = {}
  for name, init in fresh.items():
    if name not in stored:
      out[name] = init
      continue
    leaves = {}
    for path, want in jax.tree_util.tree_flatten_with_path(init)[0]:
      keys = tuple(p.key for p in path)
      have = _get(stored[name], keys)
      if have.shape != want.shape:
        raise ValueError(
            f"{HEADS_FILE}: {name}.{'.'.join(keys)} has shape {have.shape}, "
            f"but cfg implies {want.shape} (head_hidden={cfg.head_ff_dim}).")
      _set(leaves, keys, jnp.asarray(have.astype(_NP_DTYPES[cfg.param_dtype])))
    out[name] = leaves
  return out


def load_hf_tokenizer(path: str | os.PathLike):
  """The checkpoint's `tokenizers.Tokenizer` from its tokenizer.json."""
  from tokenizers import Tokenizer  # Imported here: only this needs it.
  file = os.path.join(os.fspath(path), TOKENIZER_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(
        f"No {TOKENIZER_FILE} in {os.fspath(path)}; blockdec reads the fast "
        "tokenizer file only (not vocab.json/merges.txt or sentencepiece).")
  return Tokenizer.from_file(file)


def byte_tokenizer():
  """An HF `tokenizers.Tokenizer` whose ids are the UTF-8 bytes (id b = byte b).

  blockdec's byte models need no tokenizer, but an exported checkpoint should
  carry one that transformers and `load_hf_tokenizer` can use. This is a
  byte-level BPE with no merges whose vocabulary lists the 256 byte symbols in
  byte order, so `encode("ab").ids == [97, 98]` and decode inverts it.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def _byte_symbols() -> list[str]:
  """The printable character byte-level BPE uses for each byte 0..255.

  Bytes that are printable Latin-1 stand for themselves; the others (control
  characters, space, ...) take the code points 256, 257, ... in byte order.
  """
  printable = (set(range(ord("!"), ord("~") + 1))
               | set(range(ord("\xa1"), ord("\xac") + 1))
               | set(range(ord("\xae"), ord("\xff") + 1)))
  symbols, extra = [], 0
  for b in range(256):
    if b in printable:
      symbols.append(chr(b))
    else:
      symbols.append(chr(256 + extra))
      extra += 1
  return symbols


def _as_hf_tokenizer(tokenizer):
  """A `tokenizers.Tokenizer` from one, or from blockdec's training tokenizers."""
  from tokenizers import Tokenizer
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  if getattr(tokenizer, "kind", None) == "bytes":
    return byte_tokenizer()
  inner = getattr(tokenizer, "tokenizer", None)
  if isinstance(inner, Tokenizer):
    return inner
  raise TypeError(f"tokenizer={tokenizer!r} must be a tokenizers.Tokenizer or "
                  "a blockdec ByteTokenizer/BPETokenizer.")


# ------------------------------------------------------------------ export


def export_hf_checkpoint(cfg: ModelConfig, params, path: str | os.PathLike, *,
                         dtype: str | None = None, tokenizer=None,
                         config_overrides: dict[str, Any] | None = None) -> str:
  """Writes `params` as an HF checkpoint folder transformers can load.

  GPT-2-style configs (layernorm, gelu, learned positions, biases) are
  written as GPT2LMHeadModel, RoPE/RMSNorm/SwiGLU ones as LlamaForCausalLM
  (or Qwen2ForCausalLM when only q/k/v have biases). Proposal heads go to
  `blockdec_heads.safetensors`, which transformers ignores; an EAGLE
  drafter is not written (with a warning).

  Args:
    cfg, params: the model.
    path: output folder (created; existing files are overwritten).
    dtype: "float32" or "bfloat16" for the stored weights; None: cfg.param_dtype.
    tokenizer: saved as tokenizer.json: a `tokenizers.Tokenizer`, or a
      blockdec training tokenizer (a byte tokenizer becomes `byte_tokenizer()`).
    config_overrides: extra config.json entries, e.g. {"eos_token_id": 2}.

  Returns:
    The folder path.
  """
  from blockdec.api import check_params  # api imports models; import late.
  check_params(params, cfg)
  dtype = dtype or cfg.param_dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {sorted(_NP_DTYPES)}.")
  np_dtype = _NP_DTYPES[dtype]
  if cfg.encoder_layers:
    raise ValueError(f"export_hf_checkpoint writes GPT-2 / Llama decoder-only "
                     f"models; this is an encoder-decoder (encoder_layers="
                     f"{cfg.encoder_layers}): keep the blockdec checkpoint "
                     "(save_checkpoint).")
  if cfg.eagle_layers:
    warnings.warn(f"export_hf_checkpoint writes the model without its EAGLE "
                  f"drafter (eagle_layers={cfg.eagle_layers}): HF formats "
                  "have no place for it; keep the blockdec checkpoint "
                  "(save_checkpoint) to decode with blockdec.Eagle.",
                  stacklevel=2)
  family = hf_family_of(cfg)
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for entry in _entries(cfg, family):
    parts = [np.asarray(_get(params, p), np.float32) for p in entry.params]
    value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    if entry.linear:
      value = value.T
    tensors[entry.hf] = np.ascontiguousarray(value).astype(np_dtype)
  if family == "gpt2":
    tensors = {f"transformer.{k}" if k != "lm_head.weight" else k: v
               for k, v in tensors.items()}
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
  config = {**hf_config_from(cfg, dtype), **(config_overrides or {})}
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  heads_file = os.path.join(path, HEADS_FILE)
  if cfg.num_prediction_heads > 1:
    flat = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(
        params["proposal_heads"])[0]:
      name = ".".join(p.key for p in key_path)
      flat[name] = np.asarray(value, np.float32).astype(np_dtype)
    meta = {"format": "blockdec-proposal-heads",
            "num_prediction_heads": str(cfg.num_prediction_heads)}
    if cfg.head_hidden is not None:
      meta["head_hidden"] = str(cfg.head_hidden)
    if cfg.head_type != "stern":
      meta["head_type"] = cfg.head_type
    save_file(flat, heads_file, metadata=meta)
  elif os.path.exists(heads_file):
    os.remove(heads_file)  # Stale heads of an earlier export.
  if tokenizer is not None:
    _as_hf_tokenizer(tokenizer).save(os.path.join(path, TOKENIZER_FILE))
  return path


def import_transformers():
  """Imports `transformers` with the top-level name `kernels` bound correctly.

  transformers 5.25 and later depend on Hugging Face's `kernels` package and
  import it (`from kernels import ...`) when its models load. This
  repository's `kernels/` folder is installed as `blockdec.kernels`, but a
  process that has the checkout's root on `sys.path` (pytest does, for the
  `tests` package; so does `python -m ...` run from the root) would find the
  folder first under the bare name and fail with "cannot import name ... from
  'kernels'". This imports the installed `kernels` package, if there is one,
  with the checkout's root off `sys.path`, so `sys.modules["kernels"]` is
  Hugging Face's and every later import resolves to it.

  Returns the `transformers` module; raises ImportError if it is missing.
  """
  import importlib
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  folder = os.path.join(root, "kernels")
  loaded = sys.modules.get("kernels")
  if loaded is not None and _inside(getattr(loaded, "__file__", None), folder):
    del sys.modules["kernels"]  # The checkout's folder under the wrong name.
  if "kernels" not in sys.modules:
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path
                   if os.path.abspath(p or os.curdir) != root]
    try:
      importlib.import_module("kernels")
    except ImportError:
      pass  # transformers < 5.25 without it: nothing to shadow.
    finally:
      sys.path[:] = saved
  return importlib.import_module("transformers")


def _inside(path: str | None, folder: str) -> bool:
  return path is not None and os.path.abspath(path).startswith(
      folder + os.sep)
