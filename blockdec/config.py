"""Model configuration: one frozen, hashable, validated dataclass.

`ModelConfig` is passed as a static argument to jitted functions, so it must be
hashable and never change after construction. Every field is checked in
`__post_init__`: a value of the wrong type raises a `TypeError`, a bad value a
`ValueError`, each naming the field, the value and what is allowed. NumPy
scalars are stored as the Python numbers they equal.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from blockdec import validation

_NORMS = ("rmsnorm", "layernorm")
_MLPS = ("swiglu", "gelu")
_POSITIONS = ("rope", "learned")
_BACKENDS = ("xla", "pallas")
_DTYPES = ("float32", "bfloat16")
_HEAD_TYPES = ("stern", "hydra")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Transformer with `num_prediction_heads` output heads.

  Head 1 is the model's own next-token distribution; heads 2..k are Stern et
  al.'s residual feed-forward proposal heads that predict the token 2..k
  positions ahead, all sharing the vocabulary projection.

  The defaults describe a Llama-style model (RMSNorm, RoPE, SwiGLU, GQA);
  `norm="layernorm"`, `mlp="gelu"`, `position="learned"` and the bias flags
  describe GPT-2.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention).
  d_ff: int | None = None  # None: 4 * d_model.
  max_seq_len: int = 1024
  num_prediction_heads: int = 1  # k, head 1 included.
  head_dim: int | None = None  # None: d_model // n_heads.
  head_hidden: int | None = None  # Proposal-head FFN width; None: d_model.
  tie_embeddings: bool = True
  norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
  norm_eps: float = 1e-6
  mlp: Literal["swiglu", "gelu"] = "swiglu"
  position: Literal["rope", "learned"] = "rope"
  rope_theta: float = 10_000.0
  # Llama-3 RoPE frequency scaling: a hashable tuple of
  # (factor, low_freq_factor, high_freq_factor, original_max_position), or None.
  rope_scaling: tuple[float, float, float, int] | None = None
  qkv_bias: bool = False
  proj_bias: bool = False  # Bias on attention output and MLP projections.
  attention_backend: Literal["xla", "pallas"] = "xla"
  dtype: Literal["float32", "bfloat16"] = "float32"  # Activations.
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  # The [MASK] token of a model adapted for block diffusion
  # (configs/block_diffusion.py), or None: an autoregressive model only.
  mask_token_id: int | None = None
  # Decoder layers of an EAGLE-style drafter on the trunk's features
  # (configs/eagle.py, `blockdec.Eagle`), or 0: none.
  eagle_layers: int = 0
  # The proposal heads' kind: "stern" (head j reads the final hidden state
  # alone) or "hydra" (head j also reads the embeddings of the j - 1 tokens
  # before its target: Hydra's dependent heads, `blockdec.Hydra`).
  head_type: Literal["stern", "hydra"] = "stern"
  # Layers of a bidirectional encoder over a source sequence, or 0: a
  # decoder-only LM. With an encoder every decoder layer also cross-attends
  # to the encoded source (an encoder-decoder, e.g. for translation); the
  # encoder shares the token embedding (one vocabulary for both sides).
  encoder_layers: int = 0

  def __post_init__(self):
    def store(name, value):  # Normalised (e.g. np.int64 -> int) in place.
      object.__setattr__(self, name, value)

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                 "num_prediction_heads"):
      store(name, validation.check_int(name, getattr(self, name), low=1))
    for name in ("n_kv_heads", "d_ff", "head_dim", "head_hidden"):
      store(name, validation.check_int(name, getattr(self, name), low=1,
                                       optional=True))
    for name in ("tie_embeddings", "qkv_bias", "proj_bias"):
      store(name, validation.check_bool(name, getattr(self, name)))
    for name in ("norm_eps", "rope_theta"):
      store(name, validation.check_number(name, getattr(self, name), low=0,
                                          low_open=True))
    store("rope_scaling", _check_rope_scaling(self.rope_scaling))
    store("eagle_layers", validation.check_int("eagle_layers",
                                               self.eagle_layers, low=0))
    store("encoder_layers", validation.check_int("encoder_layers",
                                                 self.encoder_layers, low=0))
    store("mask_token_id", validation.check_int(
        "mask_token_id", self.mask_token_id, low=0, high=self.vocab_size - 1,
        optional=True))
    _check_choice("norm", self.norm, _NORMS)
    _check_choice("head_type", self.head_type, _HEAD_TYPES)
    _check_choice("mlp", self.mlp, _MLPS)
    _check_choice("position", self.position, _POSITIONS)
    _check_choice("attention_backend", self.attention_backend, _BACKENDS)
    _check_choice("dtype", self.dtype, _DTYPES)
    _check_choice("param_dtype", self.param_dtype, _DTYPES)
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
          f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
          "(or set head_dim explicitly).")
    if self.num_kv_heads > self.n_heads or self.n_heads % self.num_kv_heads:
      raise ValueError(
          f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}.")
    if self.position == "rope" and self.dim_per_head % 2:
      raise ValueError(
          f"head_dim={self.dim_per_head} must be even for rotary embeddings.")

  @property
  def is_encoder_decoder(self) -> bool:
    return self.encoder_layers > 0

  @property
  def num_kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

  @property
  def ff_dim(self) -> int:
    return 4 * self.d_model if self.d_ff is None else self.d_ff

  @property
  def head_ff_dim(self) -> int:
    return self.d_model if self.head_hidden is None else self.head_hidden

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if d["rope_scaling"] is not None:
      d["rope_scaling"] = list(d["rope_scaling"])
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown ModelConfig fields {unknown}; "
                       f"allowed: {sorted(known)}.")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = tuple(d["rope_scaling"])
    return cls(**d)


def _check_choice(name, value, allowed):
  if not isinstance(value, str):
    raise TypeError(f"{name}={value!r} must be a string; allowed: {allowed}.")
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported; allowed: {allowed}.")


def _check_rope_scaling(scaling):
  """Llama-3 scaling (factor, low_freq_factor, high_freq_factor,
  original_max_position) as a tuple of Python numbers, or None.

  The frequencies divide by the factor, by each frequency factor and by
  their difference, so all must be > 0 and high_freq_factor > low_freq_factor.
  """
  if scaling is None:
    return None
  what = ("rope_scaling must be None or a tuple (factor, low_freq_factor, "
          "high_freq_factor, original_max_position)")
  if not isinstance(scaling, tuple) or len(scaling) != 4:
    raise ValueError(f"{what}; got {scaling!r}.")
  factor, low, high, original = scaling
  factor, low, high = (
      validation.check_number(f"rope_scaling {name}", value, low=0,
                              low_open=True)
      for name, value in (("factor", factor), ("low_freq_factor", low),
                          ("high_freq_factor", high)))
  original = validation.check_int("rope_scaling original_max_position",
                                  original, low=1)
  if not high > low:
    raise ValueError(f"rope_scaling high_freq_factor={high} must exceed "
                     f"low_freq_factor={low}; got {scaling!r}.")
  return (factor, low, high, original)
