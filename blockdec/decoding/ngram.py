"""An interpolated Kneser-Ney n-gram language model over token ids.

Kim et al. (2024) rescore the heads' top-K lattice with an n-gram LM trained
on the corpus tokens. This one is built with NumPy from token arrays and
queried inside `jax.jit`, so it can score lattice paths in the decoding loop.

The model (Chen & Goodman 1998, interpolated Kneser-Ney, one discount per
order) for a history h = (h_1 .. h_{n-1}) and token w:

  P_m(w | ctx) = max(c_m(ctx w) - D_m, 0) / C_m(ctx)
                 + D_m * N_m(ctx) / C_m(ctx) * P_{m-1}(w | ctx[1:])

where ctx is the last m-1 history tokens, c_n are raw counts, c_m (m < n) are
continuation counts (how many distinct tokens precede the m-gram),
C_m(ctx) = sum_w c_m(ctx w), N_m(ctx) = #{w : c_m(ctx w) > 0}, and
D_m = n1 / (n1 + 2 n2) from the counts of counts (clipped to [0.05, 1]). An
unseen context (C_m = 0) backs off with weight 1. The base case interpolates
the continuation unigram with the uniform distribution, so every token has
non-zero probability and every P_m(. | ctx) sums to one.

Storage, built to be looked up with `jnp.searchsorted` (no hashing, no
Python): every observed m-gram (m <= n-1) gets an id, its index in a sorted
table; order-m keys are `id(prefix) * V + last_token`, so a key fits in
int32 while (#distinct (m-1)-grams) * V < 2**31. Per order m >= 2 the model
holds `keys_m` [N_m] int32, `alpha_m` [N_m] float32 (the first term above)
and `gamma_m` [N_{m-1}] float32 (the back-off weight per context id); plus
the unigram [V]. For the byte-level (V = 256) stdlib training split
(~10 MB), a trigram model holds ~0.3 M bigram contexts and ~1 M trigrams,
~15 MB in all; a 4-gram ~2.5 M more entries (~30 MB). A lookup costs
(n-1) + (n-1)(n-2)/2 table lookups.

Lookups go through an open-addressing hash index per order (`slots`, built
from the sorted keys, not saved): a query probes a fixed number of slots
(the longest probe sequence of the build) in one gather. A binary search
over the sorted keys costs ~20 dependent gathers per lookup instead, which
on CPU made n-gram rescoring cost more than the model call it saves.

Example (order 2, toy corpus "abab" over V = 3 with a=0, b=1, c=2)::

    lm = NGramLM.build([np.array([0, 1, 0, 1])], order=2, vocab_size=3)
    lm.log_prob(jnp.array([[0]]), jnp.array([[1]]))  # log P(b | a), high
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockdec import validation

_INT32_MAX = np.iinfo(np.int32).max
_MIN_DISCOUNT, _MAX_DISCOUNT = 0.05, 1.0


@flax.struct.dataclass
class NGramLM:
  """Interpolated Kneser-Ney LM; a pytree usable inside `jax.jit`.

  Attributes:
    order: n (static).
    vocab_size: V (static).
    discounts: D_1 .. D_n (static, for inspection).
    unigram: [V] float32 P_1(w).
    keys: per order m = 2..n, [N_m] int32 sorted `id(prefix) * V + w`
      (a sentinel `2**31 - 1` keeps every table non-empty).
    alpha: per order m = 2..n, [N_m] float32 discounted m-gram term.
    gamma: per order m = 2..n, [N_{m-1}] float32 back-off weight of the
      context with that id (order-(m-1) id; token ids for m = 2).
    slots: per order m = 2..n, [S_m] int32 hash index: slot -> key index
      or -1 (S_m a power of two >= 2 N_m; see `_hash_index`).
    probes: per order, the slots a lookup scans (static).
  """

  unigram: jax.Array
  keys: tuple
  alpha: tuple
  gamma: tuple
  slots: tuple
  order: int = flax.struct.field(pytree_node=False)
  vocab_size: int = flax.struct.field(pytree_node=False)
  discounts: tuple = flax.struct.field(pytree_node=False)
  probes: tuple = flax.struct.field(pytree_node=False)

  @classmethod
  def _make(cls, unigram, keys, alpha, gamma, **static) -> "NGramLM":
    """The model from its tables, with the hash index built for `keys`."""
    index = [_hash_index(np.asarray(k)) for k in keys]
    return cls(unigram=jnp.asarray(unigram, jnp.float32),
               keys=tuple(jnp.asarray(k) for k in keys),
               alpha=tuple(jnp.asarray(a) for a in alpha),
               gamma=tuple(jnp.asarray(g) for g in gamma),
               slots=tuple(jnp.asarray(slots) for slots, _ in index),
               probes=tuple(probes for _, probes in index), **static)

  # ------------------------------------------------------------------ build

  @classmethod
  def build(cls, docs: Sequence[np.ndarray], order: int, vocab_size: int,
            discounts: Sequence[float] | None = None) -> "NGramLM":
    """Counts n-grams in `docs` (token-id arrays; n-grams never cross docs).

    Args:
      docs: 1-D integer arrays of token ids in [0, vocab_size).
      order: n >= 1.
      vocab_size: V.
      discounts: optional D_1..D_n overriding the count-of-counts estimate.
    """
    order = validation.check_int("order", order, low=1)
    vocab_size = validation.check_int("vocab_size", vocab_size, low=1)
    if float(vocab_size) ** order >= 2.0 ** 62:
      raise ValueError(f"order={order} is too high for vocab_size={vocab_size}:"
                       " V**order must stay below 2**62.")
    if discounts is not None and len(discounts) != order:
      raise ValueError(f"discounts={discounts} must hold {order} values "
                       "(D_1 .. D_n).")
    docs = [np.asarray(d, np.int64).reshape(-1) for d in docs]
    for d in docs:
      if d.size and (d.min() < 0 or d.max() >= vocab_size):
        raise ValueError("docs hold a token id outside the vocabulary "
                         f"[0, {vocab_size}): {int(d[(d < 0) | (d >= vocab_size)][0])}.")
    v = vocab_size

    def grams(m):  # all m-gram keys in base V, int64
      parts = []
      for d in docs:
        if d.size >= m:
          key = np.zeros(d.size - m + 1, np.int64)
          for i in range(m):
            key = key * v + d[i:d.size - m + 1 + i]
          parts.append(key)
      return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    observed = {m: np.unique(grams(m)) for m in range(1, order + 1)}
    # counts[m]: (sorted keys, count) with raw counts at order n and
    # continuation counts (distinct left neighbours) below.
    counts = {order: np.unique(grams(order), return_counts=True)}
    for m in range(order - 1, 0, -1):
      counts[m] = np.unique(observed[m + 1] % v ** m, return_counts=True)

    ds = []
    for m in range(1, order + 1):
      c = counts[m][1]
      if discounts is not None:
        ds.append(float(discounts[m - 1]))
        continue
      n1, n2 = np.sum(c == 1), np.sum(c == 2)
      d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
      ds.append(float(np.clip(d, _MIN_DISCOUNT, _MAX_DISCOUNT)))

    # Base case: continuation unigram interpolated with the uniform.
    c1 = np.zeros(v, np.float64)
    c1[counts[1][0]] = counts[1][1]
    total = c1.sum()
    if total > 0:
      unigram = (np.maximum(c1 - ds[0], 0) + ds[0] * np.sum(c1 > 0) / v) / total
    else:
      unigram = np.full(v, 1.0 / v)

    keys, alphas, gammas = [], [], []
    ids_prev = None  # sorted base-V keys of observed (m-1)-grams = their ids
    for m in range(2, order + 1):
      obs = observed[m]
      prefix = obs // v
      prefix_ids = prefix if m == 2 else np.searchsorted(ids_prev, prefix)
      num_ctx = v if m == 2 else ids_prev.size
      if num_ctx * v >= _INT32_MAX:
        raise ValueError(f"the order-{m} table has {num_ctx} contexts; "
                         f"{num_ctx} * V={v} overflows int32. Use a lower "
                         "order or a smaller corpus.")
      trie_keys = prefix_ids * v + obs % v  # sorted, as obs is
      c = np.zeros(obs.size, np.float64)
      ckeys, cvals = counts[m]
      c[np.searchsorted(obs, ckeys)] = cvals
      ctx_total = np.bincount(prefix_ids, weights=c, minlength=num_ctx)
      ctx_types = np.bincount(prefix_ids, weights=(c > 0), minlength=num_ctx)
      d = ds[m - 1]
      safe = np.maximum(ctx_total, 1e-30)
      alpha = np.where(c > 0, np.maximum(c - d, 0) / safe[prefix_ids], 0.0)
      gamma = np.where(ctx_total > 0, d * ctx_types / safe, 1.0)
      keys.append(np.append(trie_keys, _INT32_MAX).astype(np.int32))
      alphas.append(np.append(alpha, 0.0).astype(np.float32))
      gammas.append(gamma.astype(np.float32))
      ids_prev = obs
    return cls._make(unigram, keys, alphas, gammas, order=order,
                     vocab_size=v, discounts=tuple(ds))

  # ----------------------------------------------------------------- lookup

  @property
  def context_len(self) -> int:
    """n - 1, the history tokens a lookup uses."""
    return self.order - 1

  @property
  def num_entries(self) -> int:
    """Stored m-grams over all orders >= 2 (a size measure)."""
    return sum(int(k.shape[0]) - 1 for k in self.keys)

  def _find(self, m: int, ctx_id: jax.Array, token: jax.Array) -> jax.Array:
    """Id of the order-m gram (context id, token), or -1 if unobserved."""
    table, slots = self.keys[m - 2], self.slots[m - 2]
    query = ctx_id * self.vocab_size + token
    home = _hash(query, slots.shape[0])
    probe = (home[..., None] + jnp.arange(self.probes[m - 2], dtype=jnp.uint32)
             ) & jnp.uint32(slots.shape[0] - 1)  # [..., L]
    ids = slots[probe]
    hit = (ids >= 0) & (table[jnp.maximum(ids, 0)] == query[..., None])
    idx = jnp.max(jnp.where(hit, ids, -1), axis=-1)
    found = (ctx_id >= 0) & (token >= 0)
    return jnp.where(found, idx, -1).astype(jnp.int32)

  def _context_ids(self, context: jax.Array) -> list[jax.Array]:
    """ids[l-1] = id of the last l history tokens (l = 1..n-1), or -1."""
    ids = []
    for l in range(1, self.order):
      cur = context[..., -l]
      cur = jnp.where(cur >= 0, cur, -1)
      for i in range(1, l):
        cur = self._find(i + 1, cur, context[..., -l + i])
      ids.append(cur)
    return ids

  def log_prob(self, context: jax.Array, tokens: jax.Array) -> jax.Array:
    """log P(token | context) for M candidate tokens after each context.

    Args:
      context: [..., n-1] int32 history, oldest first; -1 marks unknown
        tokens (before the start), which makes the model back off.
      tokens: [..., M] int32 candidates, same leading shape as `context`.

    Returns:
      [..., M] float32 natural-log probabilities.
    """
    context = jnp.asarray(context, jnp.int32)
    tokens = jnp.asarray(tokens, jnp.int32)
    if context.shape[-1] != self.context_len:
      raise ValueError(f"context has {context.shape[-1]} tokens; this order-"
                       f"{self.order} model needs {self.context_len}.")
    return _log_prob(self, context, tokens)

  def _log_prob(self, context, tokens):
    p = self.unigram[tokens]
    if self.order > 1:
      ctx_ids = [c[..., None] for c in self._context_ids(context)]  # [..., 1]
      for m in range(2, self.order + 1):
        ctx = ctx_ids[m - 2]
        gid = self._find(m, ctx, tokens)
        alpha = jnp.where(gid >= 0, self.alpha[m - 2][jnp.maximum(gid, 0)], 0.)
        gamma = jnp.where(ctx >= 0, self.gamma[m - 2][jnp.maximum(ctx, 0)], 1.)
        p = alpha + gamma * p
    return jnp.log(p)

  def sequence_log_probs(self, tokens: jax.Array) -> jax.Array:
    """[T] tokens -> [T] log P(tokens[t] | tokens[t-n+1 .. t-1]).

    The first tokens see -1 (unknown) history. For held-out evaluation.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    n1 = self.context_len
    padded = jnp.concatenate([jnp.full((n1,), -1, jnp.int32), tokens])
    idx = jnp.arange(tokens.shape[0])[:, None] + jnp.arange(n1)[None, :]
    context = padded[idx]  # [T, n-1]
    return self.log_prob(context, tokens[:, None])[:, 0]


  # ------------------------------------------------------------ persistence

  def save(self, path: str) -> None:
    """Writes the tables to a safetensors file."""
    from safetensors.numpy import save_file
    tensors = {"unigram": np.asarray(self.unigram)}
    for m in range(2, self.order + 1):
      tensors[f"keys_{m}"] = np.asarray(self.keys[m - 2])
      tensors[f"alpha_{m}"] = np.asarray(self.alpha[m - 2])
      tensors[f"gamma_{m}"] = np.asarray(self.gamma[m - 2])
    meta = {"order": str(self.order), "vocab_size": str(self.vocab_size),
            "discounts": ",".join(repr(d) for d in self.discounts)}
    save_file(tensors, path, metadata=meta)

  @classmethod
  def load(cls, path: str) -> "NGramLM":
    """Reads a model written by `save`."""
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata()
      order = int(meta["order"])
      get = lambda name: f.get_tensor(name)
      orders = range(2, order + 1)
      return cls._make(
          get("unigram"), [get(f"keys_{m}") for m in orders],
          [get(f"alpha_{m}") for m in orders],
          [get(f"gamma_{m}") for m in orders], order=order,
          vocab_size=int(meta["vocab_size"]),
          discounts=tuple(float(x) for x in meta["discounts"].split(",")))


_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash, odd, < 2**32.


def _hash(query, size: int):
  """Home slot in [0, size) (size a power of two) of int32 keys; the same
  value with NumPy or JAX arrays (uint32 arithmetic wraps mod 2**32)."""
  xp = np if isinstance(query, np.ndarray) else jnp
  bits = size.bit_length() - 1
  h = query.astype(xp.uint32) * xp.uint32(_HASH_MULTIPLIER)
  return h >> xp.uint32(32 - bits) if bits else h & xp.uint32(0)


def _hash_index(keys: np.ndarray) -> tuple[np.ndarray, int]:
  """(slots, probes): an open-addressing index of keys[:-1] (the sentinel
  is left out) with at least twice as many slots as keys.

  Built in rounds: in round r every unplaced key tries slot home + r and
  the lowest-indexed key wins each free slot. Key i thus sits within
  `probes` slots of its home, and a lookup that compares all of them finds
  it (or learns it is absent) in one gather.
  """
  n = keys.shape[0] - 1
  size = 1 << max(int(np.ceil(np.log2(max(2 * n, 2)))), 1)
  slots = np.full(size, -1, np.int32)
  home = _hash(keys[:n], size).astype(np.int64)
  pending = np.arange(n)
  probes = 0
  while pending.size:
    pos = (home[pending] + probes) & (size - 1)
    free = slots[pos] < 0
    pos, cand = pos[free], pending[free]
    pos, first = np.unique(pos, return_index=True)
    slots[pos] = cand[first]
    placed = np.zeros(n, bool)
    placed[cand[first]] = True
    pending = pending[~placed[pending]]
    probes += 1
  return slots, max(probes, 1)


# Jitted once per shape (a no-op wrapper inside an outer jit): eager
# dispatch of the binary searches would be slow.
_log_prob = jax.jit(lambda lm, context, tokens: lm._log_prob(context, tokens))
