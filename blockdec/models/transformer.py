"""Decoder-only Transformer with Stern et al.'s proposal heads.

Parameter tree (names are stable; checkpoint import relies on them):

  embed/embedding            [V, d]
  pos_embed/embedding        [max_seq_len, d]        (position="learned")
  layer_{i}/attn_norm        RMSNorm or LayerNorm
  layer_{i}/attn/{q,k,v,o}   Dense
  layer_{i}/mlp_norm
  layer_{i}/mlp/{gate,up,down} (swiglu) or {fc,proj} (gelu)
  final_norm
  lm_head/kernel             [d, V]                  (tie_embeddings=False)
  proposal_heads/head_{j}/{fc1,fc2}   j = 2..k       (num_prediction_heads > 1)
  proposal_heads/head_{j}/{fc_in,fc1,fc2}            (head_type="hydra")
  eagle/fc, eagle/layer_{i}/..., eagle/norm          (eagle_layers > 0)
  encoder/layer_{i}/..., encoder/final_norm          (encoder_layers > 0)
  cross_{i}/norm, cross_{i}/{q,k,v,o}                (encoder_layers > 0)

Decoding on CPU adds layer_{i}/attn/qkv and layer_{i}/mlp/gate_up (the
kernels above joined, `with_fused_projections`) for its short calls; the
tree above stays the one checkpoints and checks know.

Head 1 is `final_norm -> vocabulary projection`. Head j >= 2 (Stern sec. 3) is
one residual feed-forward layer on the same normalised hidden state,
`h_j = h + fc2(relu(fc1(h)))`, followed by the shared vocabulary projection.
Everything under `proposal_heads` can be trained while the rest stays frozen,
which leaves head 1, and so greedy decoding, bit-for-bit unchanged. The
same holds for `eagle` (an EAGLE-style drafter, `EagleDrafter`).

Hydra heads (`head_type="hydra"`, Ankner et al. 2024) are dependent: head
j >= 2 at position t also reads the embeddings of tokens t + 1 .. t + j - 1
(the decided token and the drafts before its own), joined with h by a linear
map, `z = fc_in([h, e_{t+1}, ..., e_{t+j-1}])`, then `z + fc2(relu(fc1(z)))`.
Drafting with them is sequential (`blockdec.Blockwise` on such a model);
training feeds the targets of the heads before (teacher forcing).

An encoder-decoder (`encoder_layers > 0`, e.g. for translation) adds a
bidirectional encoder over a source sequence (the same blocks, with a
padding mask, sharing the token embedding) and a cross-attention sublayer
in every decoder layer, between self-attention and the MLP, each with its
own pre-norm (`cross_{i}`). The decoder with its heads is unchanged, so
every decoding method drafts and verifies target tokens as for an LM. The
source is encoded once per decode (`Transformer.encode`): its per-layer
cross-attention keys and values travel in the KV cache (`KVCache.memory`)
and are only read by later calls.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdec.config import ModelConfig
from blockdec.models import attention
from blockdec.models.kv_cache import KVCache, Memory


def _dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """[D/2] inverse frequencies, with Llama-3 scaling when configured."""
  d = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling is None:
    return inv_freq
  factor, low_ff, high_ff, original_max = cfg.rope_scaling
  low_wavelen = original_max / low_ff
  high_wavelen = original_max / high_ff
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


@functools.lru_cache(maxsize=32)
def rope_table(cfg: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [length, D/2] float32, for positions 0 .. length-1.

  Evaluated once at trace time and embedded as a constant.
  """
  with jax.ensure_compile_time_eval():
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * rope_frequencies(cfg)
    return jnp.cos(angles), jnp.sin(angles)


def rope_angles(cfg: ModelConfig, positions: jax.Array,
                table_length: int | None = None):
  """(cos, sin), each [B, T, 1, D/2] float32, for positions [B, T].

  Computed once per model call (`Transformer.trunk`) and shared by every
  layer's queries and keys. With `table_length` (decoding: the cache length,
  which bounds every position) they are looked up in `rope_table`; computed
  inside the loop instead, XLA fused the cosines and sines into every
  consumer and recomputed them for each head and layer, a fifth of a
  batch-8 k=8 decoding step on CPU.
  """
  if table_length is None:
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
  else:
    cos_table, sin_table = rope_table(cfg, table_length)
    cos, sin = cos_table[positions], sin_table[positions]
  return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]):
  """Rotates x [B, T, H, D] by `rope_angles` (halves convention)."""
  cos, sin = rope
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, ...], index [B, M] -> x at those block positions, [B, M, ...]."""
  return jnp.take_along_axis(
      x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _dense(cfg: ModelConfig, features: int, name: str, bias: bool) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=_dtype(cfg.dtype),
                  param_dtype=_dtype(cfg.param_dtype), name=name)


def _fused(module: nn.Module, name: str):
  """The fused projection `name` (`with_fused_projections`) in `module`'s
  params, or None where they hold none (or while initialising)."""
  if module.is_initializing():
    return None
  return module.variables.get("params", {}).get(name)


def _fused_dense(cfg: ModelConfig, x, fused, sizes):
  """x [..., d] through a fused projection: the parts [..., n] of `sizes`,
  each what its own `nn.Dense` gives."""
  x, kernel, bias = nn.dtypes.promote_dtype(
      x, fused["kernel"], fused.get("bias"), dtype=_dtype(cfg.dtype))
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  if bias is not None:
    y = y + bias
  return jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
  kw = dict(epsilon=cfg.norm_eps, dtype=_dtype(cfg.dtype),
            param_dtype=_dtype(cfg.param_dtype), name=name)
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(**kw)
  # Two-pass variance, as torch's LayerNorm: E[x^2] - E[x]^2 loses digits on
  # the large activations of pretrained GPT-2 checkpoints.
  return nn.LayerNorm(use_fast_variance=False, **kw)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache: KVCache | None = None,
               layer: int = 0, mask=None,
               rope: tuple[jax.Array, jax.Array] | None = None,
               empty_cache: bool = False, keep: jax.Array | None = None):
    """x [B, T, d]; cache: None (self-attention) or the stacked KV cache.

    With a cache, this layer's keys/values for the block are written at slots
    `positions` of layer `layer` (in place) and the block attends to them.
    `mask`: None for the causal block, or a block mask of
    `blockdec.kernels` (static: `TreeMask`,
    `BlockBidirectionalMask`, ...; runtime: `RuntimeMask`) saying which
    of the block's own keys each query sees; every query sees the committed
    prefix. For a tree, node i sits at `positions[:, i]` (offset + depth) but
    in slot `positions[:, 0] + i` (see `attention.cached_attention`).
    Without a cache a static mask's pattern is the whole attention pattern
    of the sequence (e.g. `kernels.DiffusionTrainingMask`).
    `rope`: `rope_angles` of `positions` (position="rope"), computed once
    per call by the trunk for all layers. `empty_cache` (static): nothing is
    committed before the block (prefill), so the cache is only written.
    `keep` (optional [B, M] block indices): every token's keys and values
    are written, but only the kept queries' outputs are projected.
    Returns (out [B, T or M, d], updated cache or None).
    """
    cfg = self.cfg
    dense = lambda n, bias, name: _dense(cfg, n, name, bias)
    b, t, _ = x.shape
    h, h_kv, d = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    from blockdec.kernels import masks  # pylint: disable=g-import-not-at-top
    causal = mask is None or isinstance(mask, masks.CausalBlockMask)
    # With keep, where the sequence attends only to itself, queries are
    # projected, rotated and attended at the kept rows only.
    query_positions = None
    if keep is not None and (causal if cache is None else
                             attention.attends_itself_only(
                                 cfg.attention_backend, mask, empty_cache)):
      query_positions = take_rows(positions, keep)
    rows = x if query_positions is None else take_rows(x, keep)
    fused = _fused(self, "qkv") if (query_positions is None and
                                    t <= FUSED_MAX_TOKENS) else None
    if fused is not None:
      q, k, v = _fused_dense(cfg, x, fused, (h * d, h_kv * d, h_kv * d))
    else:
      q = dense(h * d, cfg.qkv_bias, "q")(rows)
      k = dense(h_kv * d, cfg.qkv_bias, "k")(x)
      v = dense(h_kv * d, cfg.qkv_bias, "v")(x)
    q = q.reshape(b, -1, h, d)
    k = k.reshape(b, t, h_kv, d)
    v = v.reshape(b, t, h_kv, d)
    if cfg.position == "rope":
      q = apply_rope(q, rope if query_positions is None else
                     tuple(take_rows(a, keep) for a in rope))
      k = apply_rope(k, rope)
    if cache is None:
      if causal:
        out = attention.self_attention(q, k, v, positions, query_positions)
      elif isinstance(mask, attention.PaddingMask):  # An encoder.
        out = attention.cross_attention(q, k.swapaxes(1, 2),
                                        v.swapaxes(1, 2), mask.valid)
      elif isinstance(mask, (masks.TreeMask, masks.RuntimeMask)):
        raise ValueError(f"mask={mask!r} needs a KV cache (a tree's nodes "
                         "are placed in cache slots; a runtime mask is a "
                         "decoding mask); without one use None, a causal "
                         "mask or a static whole-sequence pattern.")
      elif isinstance(mask, masks.BlockMask) and mask.block_len == t:
        # A whole sequence under a static pattern (block-diffusion
        # training): query i sees key j iff pattern[i, j]; positions only
        # rotate.
        pattern = jnp.broadcast_to(jnp.asarray(mask.pattern()), (b, t, t))
        out = attention.dot_product_attention(
            q, k.swapaxes(1, 2), v.swapaxes(1, 2), pattern)
      else:
        raise ValueError(f"mask={mask!r} without a KV cache must be None, a "
                         f"causal mask or a static kernels.BlockMask with "
                         f"block_len == T = {t}.")
    else:
      out, cache = attention.cached_attention(
          q, k, v, cache, layer, positions, backend=cfg.attention_backend,
          mask=mask, empty=empty_cache, query_positions=query_positions)
    out = out.reshape(b, -1, h * d)
    if keep is not None and query_positions is None:
      out = take_rows(out, keep)
    return dense(cfg.d_model, cfg.proj_bias, "o")(out), cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = lambda n, name: _dense(cfg, n, name, cfg.proj_bias)
    if cfg.mlp == "swiglu":
      fused = _fused(self, "gate_up") if x.shape[-2] <= FUSED_MAX_TOKENS \
          else None
      if fused is not None:
        gate, up = _fused_dense(cfg, x, fused, (cfg.ff_dim, cfg.ff_dim))
        return dense(cfg.d_model, "down")(nn.silu(gate) * up)
      hidden = nn.silu(dense(cfg.ff_dim, "gate")(x)) * dense(cfg.ff_dim, "up")(x)
      return dense(cfg.d_model, "down")(hidden)
    hidden = nn.gelu(dense(cfg.ff_dim, "fc")(x), approximate=True)
    return dense(cfg.d_model, "proj")(hidden)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, cache=None, layer=0, mask=None,
               rope=None, empty_cache=False, cross=None, keep=None):
    """`cross`: an encoder-decoder's cross-attention sublayer for this layer
    (x -> update), applied between self-attention and the MLP. `keep`
    (optional [B, M] block indices): all T tokens write their keys and
    values, but the layer's output is computed at the kept ones only
    ([B, M, d]): the rest of the layer costs M / T."""
    attn_out, cache = Attention(self.cfg, name="attn")(
        _norm(self.cfg, "attn_norm")(x), positions, cache, layer, mask,
        rope, empty_cache, keep)
    if keep is not None:
      x = take_rows(x, keep)
    x = x + attn_out
    if cross is not None:
      x = x + cross(x)
    x = x + Mlp(self.cfg, name="mlp")(_norm(self.cfg, "mlp_norm")(x))
    return x, cache


class ProposalHead(nn.Module):
  """Stern's head j: one residual feed-forward layer on the final hidden state."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h):
    cfg = self.cfg
    dense = lambda n, name: _dense(cfg, n, name, True)
    return h + dense(cfg.d_model, "fc2")(nn.relu(dense(cfg.head_ff_dim, "fc1")(h)))


class HydraHead(nn.Module):
  """Hydra's head j: the hidden state and the j - 1 tokens before the target."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, embeddings):
    """h [..., d] and embeddings [..., j - 1, d] -> the head's state [..., d]."""
    cfg = self.cfg
    dense = lambda n, name: _dense(cfg, n, name, True)
    joined = jnp.concatenate(
        [h, embeddings.reshape(embeddings.shape[:-2] + (-1,)).astype(h.dtype)],
        axis=-1)
    z = dense(cfg.d_model, "fc_in")(joined)
    return z + dense(cfg.d_model, "fc2")(nn.relu(dense(cfg.head_ff_dim, "fc1")(z)))


class EagleDrafter(nn.Module):
  """An EAGLE-style drafter (Li et al. 2024): the next hidden state from this one.

  Position t reads the trunk's final hidden state h_t (the state that
  predicts token t + 1) and the embedding of token t + 1, and predicts
  h_{t+1}; the model's own vocabulary projection turns a predicted state
  into a distribution over token t + 2. A linear map joins the two inputs,
  then `cfg.eagle_layers` decoder blocks (causal, with their own KV cache)
  and a final norm, so predictions are on the trunk's normalised scale.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, features, embeddings, positions, cache=None, rope=None,
               empty_cache=False):
    cfg = self.cfg
    x = _dense(cfg, cfg.d_model, "fc", True)(
        jnp.concatenate([features.astype(embeddings.dtype), embeddings], -1))
    for i in range(cfg.eagle_layers):
      x, cache = Block(cfg, name=f"layer_{i}")(x, positions, cache, i, None,
                                                rope, empty_cache)
    return _norm(cfg, "norm")(x), cache


class CrossAttention(nn.Module):
  """A decoder layer's attention to the encoded source (encoder-decoder).

  Two uses: `project(encoded)` turns the encoder's output into this
  layer's keys and values once per source; `__call__(x, k, v, valid)`
  attends the decoder's states to them (pre-norm; returns the update).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    h, h_kv, d = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    self.norm = _norm(cfg, "norm")
    self.q = _dense(cfg, h * d, "q", cfg.qkv_bias)
    self.k = _dense(cfg, h_kv * d, "k", cfg.qkv_bias)
    self.v = _dense(cfg, h_kv * d, "v", cfg.qkv_bias)
    self.o = _dense(cfg, cfg.d_model, "o", cfg.proj_bias)

  def project(self, encoded):
    """encoded [B, S, d] -> keys, values [B, H_kv, S, D]."""
    b, s, _ = encoded.shape
    shape = (b, s, self.cfg.num_kv_heads, self.cfg.dim_per_head)
    k = self.k(encoded).reshape(shape).swapaxes(1, 2)
    v = self.v(encoded).reshape(shape).swapaxes(1, 2)
    return k, v

  def __call__(self, x, k, v, valid):
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q(self.norm(x)).reshape(b, t, cfg.n_heads, cfg.dim_per_head)
    out = attention.cross_attention(q, k, v, valid)
    return self.o(out.reshape(b, t, cfg.n_heads * cfg.dim_per_head))


class Encoder(nn.Module):
  """Bidirectional blocks over the (embedded) source; final norm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, valid):
    """x [B, S, d] embedded source, positions [B, S], valid [B, S] bool."""
    cfg = self.cfg
    rope = rope_angles(cfg, positions) if cfg.position == "rope" else None
    mask = attention.PaddingMask(valid)
    for i in range(cfg.encoder_layers):
      x, _ = Block(cfg, name=f"layer_{i}")(x, positions, None, i, mask, rope)
    return _norm(cfg, "final_norm")(x)


class Transformer(nn.Module):
  """The model. `__call__` returns logits of every head; see module docstring."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = _dtype(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt,
                          dtype=_dtype(cfg.dtype),
                          embedding_init=nn.initializers.normal(0.02))
    if cfg.position == "learned":
      self.pos_embed = nn.Embed(cfg.max_seq_len, cfg.d_model, param_dtype=pdt,
                                dtype=_dtype(cfg.dtype),
                                embedding_init=nn.initializers.normal(0.01))
    self.layers = [Block(cfg, name=f"layer_{i}") for i in range(cfg.n_layers)]
    self.final_norm = _norm(cfg, "final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False,
                              dtype=_dtype(cfg.dtype), param_dtype=pdt)
    if cfg.num_prediction_heads > 1:
      self.proposal_heads = ProposalHeads(cfg)
    if cfg.eagle_layers:
      self.eagle = EagleDrafter(cfg)
    if cfg.encoder_layers:
      self.encoder = Encoder(cfg)
      self.cross = [CrossAttention(cfg, name=f"cross_{i}")
                    for i in range(cfg.n_layers)]

  def _embed(self, tokens, positions):
    x = self.embed(tokens)
    if self.cfg.position == "learned":
      x = x + self.pos_embed(jnp.minimum(positions, self.cfg.max_seq_len - 1))
    return x

  def encode(self, source, source_lengths) -> Memory:
    """source [B, S] (right-padded), source_lengths [B] -> the `Memory` every
    decoder layer cross-attends to (an encoder-decoder only)."""
    if not self.cfg.encoder_layers:
      raise ValueError("encode needs an encoder-decoder (encoder_layers > "
                       "0); this model is decoder-only.")
    s = source.shape[1]
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), source.shape)
    valid = positions < source_lengths[:, None]
    # Padding may hold anything (even ids outside the vocabulary, whose
    # embedding lookup gives NaN): zeros keep every gather in range.
    source = jnp.where(valid, source, 0)
    encoded = self.encoder(self._embed(source, positions), positions, valid)
    kv = [cross.project(encoded) for cross in self.cross]
    return Memory(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv),
                  valid=valid)

  def trunk(self, tokens, positions, cache: KVCache | None = None,
            mask=None, empty_cache: bool = False,
            memory: Memory | None = None, keep: jax.Array | None = None):
    """tokens, positions [B, T] -> (normalised hidden [B, T, d], cache).

    With a cache, the block is written at slots `positions[:, 0] ...` and the
    returned cache has `end_index = positions[:, 0] + T`. `mask`: None (the
    causal block) or a block mask with `block_len == T`, static and hashable
    (`kernels.TreeMask(parents)` scores a token tree,
    `kernels.BlockBidirectionalMask(T, n)` a block-diffusion block) or a
    `kernels.RuntimeMask` (traced tree parents or pattern); see `Attention`.
    `empty_cache` (static): the cache holds nothing committed yet (prefill),
    so it is not read. `memory` (an encoder-decoder; `encode`): the source,
    by default the one the cache holds (`KVCache.memory`).
    `keep` (optional [B, M] block indices): return the hidden states at those
    tokens only, [B, M, d]. Every token still writes its keys and values,
    but the last layer's attention output, feed-forward and the final norm
    run at the kept tokens only: a prompt's call that needs the last
    token's state (prefill) skips ~1/L of its work for an L-layer model.
    """
    x = self._embed(tokens, positions)
    rope = None
    if self.cfg.position == "rope":
      rope = rope_angles(self.cfg, positions,
                         None if cache is None else cache.length)
    if memory is None and cache is not None:
      memory = cache.memory
    if self.cfg.encoder_layers and memory is None:
      raise ValueError("this encoder-decoder (encoder_layers="
                       f"{self.cfg.encoder_layers}) needs its source: pass "
                       "memory=encode(source, source_lengths) or a cache "
                       "holding it (KVCache.with_memory).")
    for i, layer in enumerate(self.layers):
      cross = None
      if self.cfg.encoder_layers:
        cross = functools.partial(self.cross[i], k=memory.k[i], v=memory.v[i],
                                  valid=memory.valid)
      last = i == len(self.layers) - 1
      x, cache = layer(x, positions, cache, i, mask, rope, empty_cache, cross,
                       keep if last else None)
    if keep is not None and not self.layers:
      x = take_rows(x, keep)
    if cache is not None:
      cache = cache.set_end_index(positions[:, 0] + tokens.shape[1])
    return self.final_norm(x), cache

  def vocab_logits(self, h):
    """h [..., d] -> float32 logits [..., V] through the shared projection."""
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)

  def head_logits(self, h, num_heads: int | None = None, tokens=None):
    """h [B, T, d] -> logits [B, T, num_heads, V] of heads 1..num_heads.

    Hydra heads (cfg.head_type == "hydra") also need `tokens` [B, T, >=
    num_heads - 1]: at each position the tokens after it (head j reads the
    first j - 1).
    """
    num_heads = num_heads or self.cfg.num_prediction_heads
    hs = [h]
    if num_heads > 1:
      embeddings = None
      if self.cfg.head_type == "hydra":
        if tokens is None:
          raise ValueError(
              "this model's proposal heads are Hydra heads (head_type="
              "'hydra'): they read the drafted tokens, which only "
              "blockdec.Blockwise's Hydra drafter feeds them.")
        embeddings = self.embed(tokens[..., :num_heads - 1])
      hs += self.proposal_heads(h, num_heads, embeddings)
    return self.vocab_logits(jnp.stack(hs, axis=2))

  def hydra_head(self, h, tokens, j: int):
    """Hydra head j (static) at h [B, d] after tokens [B, j - 1] -> logits
    [B, V]."""
    return self.vocab_logits(self.proposal_heads.heads[f"head_{j}"](
        h, self.embed(tokens)))

  def __call__(self, tokens, positions, cache=None, num_heads=None,
               mask=None, memory=None):
    """Logits of every head; Hydra heads read the tokens that follow in
    `tokens` (teacher forcing along the given text; 0 past its end)."""
    h, cache = self.trunk(tokens, positions, cache, mask, memory=memory)
    following, num_heads = None, num_heads or self.cfg.num_prediction_heads
    if self.cfg.head_type == "hydra" and num_heads > 1:
      following = following_tokens(tokens, num_heads - 1)
    return self.head_logits(h, num_heads, following), cache

  def eagle_step(self, features, tokens, positions, cache=None,
                 empty_cache: bool = False):
    """The EAGLE drafter (cfg.eagle_layers > 0) on a block.

    features [B, T, d]: trunk states h_t (or the drafter's own predictions)
    at `positions` [B, T]; tokens [B, T]: token t + 1 beside each. Returns
    (predicted h_{t+1} [B, T, d], cache): `cache` is the DRAFTER's KV cache
    (`make_eagle_cache`), written at `positions` like the trunk's.
    """
    rope = None
    if self.cfg.position == "rope":
      rope = rope_angles(self.cfg, positions,
                         None if cache is None else cache.length)
    out, cache = self.eagle(features, self.embed(tokens), positions, cache,
                            rope, empty_cache)
    if cache is not None:
      cache = cache.set_end_index(positions[:, 0] + tokens.shape[1])
    return out, cache

  def init_all(self, tokens, positions):
    """Touches every submodule (the EAGLE drafter and encoder too) for
    `init`."""
    memory = None
    if self.cfg.encoder_layers:
      memory = self.encode(tokens, jnp.ones(tokens.shape[:1], jnp.int32))
    h, _ = self.trunk(tokens, positions, memory=memory)
    following = None
    if self.cfg.head_type == "hydra":
      following = jnp.zeros(tokens.shape + (self.cfg.num_prediction_heads,),
                            jnp.int32)
    out = self.head_logits(h, tokens=following)
    if self.cfg.eagle_layers:
      self.eagle_step(h, tokens, positions)
    return out


def following_tokens(tokens: jax.Array, n: int) -> jax.Array:
  """tokens [B, T] -> [B, T, n]: at t, tokens t + 1 .. t + n (0 past T)."""
  padded = jnp.pad(tokens, ((0, 0), (0, n)))
  t = tokens.shape[1]
  return jnp.stack([padded[:, i:i + t] for i in range(1, n + 1)], axis=-1)


class ProposalHeads(nn.Module):
  cfg: ModelConfig

  def setup(self):
    head = HydraHead if self.cfg.head_type == "hydra" else ProposalHead
    self.heads = {f"head_{j}": head(self.cfg, name=f"head_{j}")
                  for j in range(2, self.cfg.num_prediction_heads + 1)}

  def __call__(self, h, num_heads, embeddings=None):
    """Heads 2..num_heads on h; Hydra heads read embeddings [..., >= j-1, d]."""
    if embeddings is None:
      return [self.heads[f"head_{j}"](h) for j in range(2, num_heads + 1)]
    return [self.heads[f"head_{j}"](h, embeddings[..., :j - 1, :])
            for j in range(2, num_heads + 1)]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Random parameters for `cfg` (a pytree of arrays)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(key, tokens, tokens,
                               method=Transformer.init_all)["params"]


# Hydra slot tables above this size are not built (`hydra_slot_tables`):
# with a large vocabulary they would outgrow the weights they replace.
HYDRA_TABLE_BYTES = 64 << 20

# Calls of at most this many tokens per row (decoding's calls) use the fused
# projections (`with_fused_projections`) where the params carry them; a
# prompt's prefill, a wide matrix product already, keeps the separate ones.
FUSED_MAX_TOKENS = 16


def fused_projections(params, cfg: ModelConfig) -> dict:
  """Each decoder layer's query, key and value kernels (and biases) joined
  into one `qkv` projection, and for swiglu gate and up into `gate_up`:
  {"layer_{i}": {"attn": {"qkv": {...}}, "mlp": {"gate_up": {...}}}}.
  `with_fused_projections` adds them to the params."""
  def join(module, names):
    parts = [module[n] for n in names]
    out = {"kernel": jnp.concatenate([p["kernel"] for p in parts], 1)}
    if all("bias" in p for p in parts):
      out["bias"] = jnp.concatenate([p["bias"] for p in parts])
    return out

  fused = {}
  for i in range(cfg.n_layers):
    layer = params[f"layer_{i}"]
    fused[f"layer_{i}"] = {"attn": {"qkv": join(layer["attn"], "qkv")}}
    if cfg.mlp == "swiglu":
      fused[f"layer_{i}"]["mlp"] = {"gate_up": join(layer["mlp"],
                                                    ("gate", "up"))}
  return fused


def with_fused_projections(params, fused: dict):
  """params with `fused_projections`'s entries added beside the separate
  kernels (which the prefill keeps using). Calls of at most
  FUSED_MAX_TOKENS tokens then make one matrix product per layer where they
  made three (query, key, value) and one where they made two (gate, up):
  the same weights and sums in fewer, wider products. On XLA:CPU that
  makes a one-token call a few per cent cheaper
  (experiments/results/fused_projections.md)."""
  out = dict(params)
  for name, parts in fused.items():
    layer = dict(out[name])
    for module, extra in parts.items():
      layer[module] = {**layer[module], **extra}
    out[name] = layer
  return out


def hydra_tables_fit(cfg: ModelConfig, block_size: int) -> bool:
  """Whether `hydra_slot_tables` builds tables for heads 2..block_size."""
  if cfg.head_type != "hydra" or block_size < 2:
    return False
  slots = (block_size - 1) * block_size // 2
  itemsize = jnp.dtype(_dtype(cfg.dtype)).itemsize
  return slots * cfg.vocab_size * cfg.d_model * itemsize <= HYDRA_TABLE_BYTES


def hydra_slot_tables(params, cfg: ModelConfig, block_size: int):
  """{"head_j": [j - 1, V, d]} for Hydra heads 2..block_size, or None.

  Hydra head j joins h and the embeddings of the j - 1 tokens before its
  target with one linear map, `fc_in([h, e_1, .., e_{j-1}])`, so each token
  slot s contributes `e_s @ W_s` (W_s the kernel's rows for that slot). A
  token comes from a vocabulary of V, so that product is one row of the
  table `E @ W_s` [V, d]. Drafting then gathers j - 1 rows where it read
  (j - 1) d x d weights: for the mid model's 7 heads the per-call read of
  fc_in falls from 20.6 MB to its h part, 4.1 MB (`hydra_head_from_slots`).
  Building the tables costs 2 V d^2 flops per slot (2.1 GFLOP for the mid
  model's 28 slots), so `blockdec.decode` builds them once per set of
  weights. None when they would exceed `HYDRA_TABLE_BYTES` (a large
  vocabulary), or for other head types.
  """
  if not hydra_tables_fit(cfg, block_size):
    return None
  d, dt = cfg.d_model, _dtype(cfg.dtype)
  embedding = params["embed"]["embedding"].astype(dt)  # As nn.Embed reads it.
  heads = params["proposal_heads"]
  return {f"head_{j}": jnp.einsum(
      "vd,sde->sve", embedding,
      heads[f"head_{j}"]["fc_in"]["kernel"][d:].reshape(j - 1, d, d).astype(dt))
          for j in range(2, block_size + 1)}


def _hydra_state_from_slots(params, cfg: ModelConfig, h, table, tokens,
                            j: int):
  """Hydra head j's state [..., d] at h [..., d] after tokens [..., j - 1]
  (`hydra_head_from_slots` before the vocabulary projection)."""
  p = params["proposal_heads"][f"head_{j}"]
  d, dt = cfg.d_model, _dtype(cfg.dtype)
  rows = table[jnp.arange(j - 1), tokens]  # [..., j - 1, d]
  z = (h.astype(dt) @ p["fc_in"]["kernel"][:d].astype(dt)
       + p["fc_in"]["bias"].astype(dt) + rows.sum(axis=-2))
  hidden = nn.relu(z @ p["fc1"]["kernel"].astype(dt)
                   + p["fc1"]["bias"].astype(dt))
  return z + hidden @ p["fc2"]["kernel"].astype(dt) + p["fc2"]["bias"].astype(dt)


def hydra_head_from_slots(params, cfg: ModelConfig, h, table, tokens, j: int):
  """Hydra head j's logits [B, V] at h [B, d] after tokens [B, j - 1], the
  tokens' share of fc_in read from `table` [j - 1, V, d] (head j's entry of
  `hydra_slot_tables`); equals `Transformer.hydra_head` up to float
  rounding (the sum runs in another order)."""
  z = _hydra_state_from_slots(params, cfg, h, table, tokens, j)
  return Transformer(cfg).apply({"params": params}, z,
                                method=Transformer.vocab_logits)


def hydra_slots_pay_off(cfg: ModelConfig, num_heads: int,
                        num_positions: int) -> bool:
  """Whether `hydra_logits_from_slots` is the cheaper way to run Hydra heads
  2..num_heads at `num_positions` positions at once (a training batch).

  The heads' own join multiplies each position's j - 1 token embeddings by
  their d x d blocks of fc_in; the tables multiply the V rows of the
  embedding by the same blocks once. They pay off when the vocabulary is
  smaller than the positions: the byte-level demo model (V = 256) trains
  on 16 x 255 positions a step, where the fc_in joins of its 7 Hydra heads
  were half of the step's flops.
  """
  return (hydra_tables_fit(cfg, num_heads)
          and cfg.vocab_size < num_positions)


def hydra_logits_from_slots(params, cfg: ModelConfig, h, following,
                            num_heads: int | None = None):
  """`Transformer.head_logits` of a Hydra model [..., k, V] at h [..., d],
  head j reading following[..., :j - 1], through slot tables built from
  `params` inside the call: gradients reach fc_in (and the embedding)
  through the tables, so training can use it (`hydra_slots_pay_off`).
  Equals `head_logits` up to float rounding."""
  k = num_heads or cfg.num_prediction_heads
  tables = hydra_slot_tables(params, cfg, k) if k > 1 else {}
  states = [h.astype(_dtype(cfg.dtype))] + [
      _hydra_state_from_slots(params, cfg, h, tables[f"head_{j}"],
                              following[..., :j - 1], j)
      for j in range(2, k + 1)]
  return Transformer(cfg).apply({"params": params}, jnp.stack(states, -2),
                                method=Transformer.vocab_logits)


def make_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  return KVCache.make(num_layers=cfg.n_layers, batch=batch, length=length,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
                      dtype=_dtype(cfg.dtype))


def make_eagle_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """The EAGLE drafter's KV cache (cfg.eagle_layers layers)."""
  return KVCache.make(num_layers=cfg.eagle_layers, batch=batch, length=length,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
                      dtype=_dtype(cfg.dtype))


def apply(params, cfg: ModelConfig, tokens, positions, cache=None,
          num_heads=None, mask=None, memory=None):
  """Logits [B, T, num_heads, V] (float32) and the updated cache.

  `mask` (see `Transformer.trunk`): None scores a causal block; a static
  block mask (e.g. `kernels.TreeMask(parents)`, a static argument under
  `jax.jit`) or a `kernels.RuntimeMask` (a traced one) another pattern.
  `memory`: an encoder-decoder's encoded source (`encode`).
  """
  return Transformer(cfg).apply({"params": params}, tokens, positions, cache,
                                num_heads, mask, memory)


def encode(params, cfg: ModelConfig, source, source_lengths) -> Memory:
  """An encoder-decoder's encoded source (`Transformer.encode`)."""
  return Transformer(cfg).apply({"params": params}, source, source_lengths,
                                method=Transformer.encode)


def forward_logits(params, cfg: ModelConfig, tokens, source=None,
                   source_lengths=None):
  """Head-1 logits [B, T, V] of full sequences tokens [B, T] (no cache);
  an encoder-decoder's given its source [B, S] and source_lengths [B]."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                               tokens.shape)
  memory = None if source is None else encode(params, cfg, source,
                                              source_lengths)
  logits, _ = apply(params, cfg, tokens, positions, None, num_heads=1,
                    memory=memory)
  return logits[:, :, 0]
