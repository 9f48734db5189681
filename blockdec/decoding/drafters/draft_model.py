"""A small draft model as a drafter (speculative decoding).

Leviathan et al. 2023 and Chen et al. 2023: a smaller model with the
target's vocabulary drafts D tokens one at a time, and one target call
verifies them. The draft model keeps its own KV cache in the drafter's
carry. Rolling it back to a row's accepted length costs nothing: a cache
slot holds the token at that position (`models/kv_cache.py`), so the next
draft call simply writes over the rejected slots.

One drafting round, after a call committed up to position `pos - 1` and
decided the root at `pos`:

    call 0   feed [last committed token, root] at [pos - 1, pos]
             -> draft 1 (the last committed token is in the draft cache
             already unless the whole block was accepted, when its draft was
             never fed; feeding it again writes the same keys and values)
    call j   feed draft j at pos + j -> draft j + 1   (j = 1 .. D - 1)

D draft-model calls in all, the last D - 1 in a `lax.scan`. Greedy drafts
are argmaxes; with sampling each draft is drawn from the draft model's
filtered distribution q (the run's `Sampling`), which the
speculative-sampling verifier needs to stay lossless.

Speculative prefill (`speculative_prefill=True`, `core` module doc): the
first round drafts D + 1 tokens before the target's prefill, from the
draft model's own prompt call (its logits at the last prompt token give
draft 1, then D steps), and the target's prompt call verifies them.

Early exit (`stop_below`): a row's draft ends at the first token the draft
model gives less than that probability (the token itself included), as
transformers' `assistant_confidence_threshold` does; the draft steps run
in a `lax.while_loop` that ends once every row has ended (or at D), and
`Draft.length` says how many tokens of each row are real, so the adaptive
rule verifies no more. Slots no step reached hold token 0, drawn from
q = one-hot(0): a deterministic draft, which the speculative-sampling
verifier accepts with probability p(0) and otherwise resamples from p
without 0, so verifying it is still lossless.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from blockdec.decoding import sampling as sampling_lib
from blockdec.decoding.adaptive import proposal_confidence
from blockdec.decoding.core import Draft, Drafter, View
from blockdec.decoding.drafters.refined import history_tokens
from blockdec.decoding.rescoring import tree_call


class DraftModelDrafter(Drafter):
  """Drafts `block_size - 1` tokens with a small model's own loop.

  Built inside the jitted decode (it holds the draft model's parameters,
  which are traced). Carry: cache (the draft model's), tokens [B, D],
  q [B, D, V] with sampling, confidence [B, D] (the draft model's
  probability of each drafted token) for the adaptive rule's "confidence"
  estimate or the early exit, and with `stop_below` length [B] (how many
  drafts are real, `Draft.length`).

  Args:
    block_size: k, the root plus D = k - 1 drafts per call.
    score_fn: the draft model's scoring callable (`api.model_score_fn`).
    params: its parameters.
    cache: its empty cache, with room for P + N + k positions.
    stop_below: None, or end a row's draft at its first token the draft
      model gives less than this probability (module doc: early exit).
    speculative_prefill: draft the first round before the target's prefill,
      which verifies it (module doc).
  """

  def __init__(self, block_size: int, score_fn: Callable, params: Any,
               cache: Any, stop_below: float | None = None,
               speculative_prefill: bool = False):
    self.block_size, self.score_fn = block_size, score_fn
    self.params, self.cache = params, cache
    self.stop_below = stop_below
    self.speculative_prefill = speculative_prefill

  @property
  def num_drafts(self) -> int:
    return self.block_size - 1

  def _choose(self, logits, view: View, index):
    """The draft that is generated token `index` [B] from logits [B, V] ->
    (tokens [B], q or None, confidence [B] or None): the draft model's
    probability of its token, when the adaptive rule asks for it
    (`Context.want_confidence`) or the early exit reads it."""
    token, q = sampling_lib.draft(logits, view.context.sampling, view.keys,
                                  index)
    if not view.context.want_confidence and self.stop_below is None:
      return token, q, None
    if q is None:
      return token, q, proposal_confidence(logits[:, None])[:, 0]
    return token, q, jnp.take_along_axis(q, token[:, None], -1)[:, 0]

  def _draft(self, cache, view: View):
    d = self.num_drafts
    batch = view.lengths.shape[0]
    if d == 0:
      return {"cache": cache, "tokens": jnp.zeros((batch, 0), jnp.int32)}
    pos = view.prompt_lengths + view.lengths  # the root's position
    last = history_tokens(view.prompts, view.prompt_lengths, view.generated,
                          view.lengths, 1)[:, 0]
    fed = jnp.stack([last, view.next_token], axis=1)
    positions = pos[:, None] - 1 + jnp.arange(2, dtype=jnp.int32)
    head_fn, cache = tree_call(self.score_fn, self.params, fed, positions,
                               cache)
    logits = head_fn(jnp.ones((batch, 1), jnp.int32), 1)[:, 0, 0]
    return self._drafts_from(cache, view, logits, pos, view.lengths, d)

  def _drafts_from(self, cache, view: View, logits, pos, root_index, d):
    """Drafts 1 .. d after a root at position `pos` [B] that is generated
    token `root_index` [B] (draft j: position pos + j, index root_index +
    j), draft 1 from `logits` [B, V] (the draft model at the root)."""
    batch = pos.shape[0]
    token, q, conf = self._choose(logits, view, root_index + 1)
    if self.stop_below is not None:
      return self._draft_until_unsure(cache, view, pos, root_index, d,
                                      token, q, conf)

    def step(carry, depth):
      cache, token = carry
      head_fn, cache = tree_call(self.score_fn, self.params, token[:, None],
                                 (pos + depth - 1)[:, None], cache)
      logits = head_fn(jnp.zeros((batch, 1), jnp.int32), 1)[:, 0, 0]
      token, q, conf = self._choose(logits, view, root_index + depth)
      return (cache, token), (token, q, conf)

    (cache, _), (rest, rest_q, rest_conf) = jax.lax.scan(
        step, (cache, token), jnp.arange(2, d + 1, dtype=jnp.int32))
    tokens = jnp.concatenate([token[:, None], rest.T], axis=1)  # [B, D]
    out = {"cache": cache, "tokens": tokens}
    if q is not None:
      out["q"] = jnp.concatenate([q[:, None], jnp.moveaxis(rest_q, 0, 1)],
                                 axis=1)  # [B, D, V]
    if conf is not None:
      out["confidence"] = jnp.concatenate([conf[:, None], rest_conf.T],
                                          axis=1)  # [B, D]
    return out

  def _draft_until_unsure(self, cache, view: View, pos, root_index, d,
                          token, q, conf):
    """Drafts 2 .. d after draft 1 (token, q, conf), each row until its
    first token below `stop_below` (module doc: early exit)."""
    batch = token.shape[0]
    tokens = jnp.zeros((batch, d), jnp.int32).at[:, 0].set(token)
    confs = jnp.zeros((batch, d), jnp.float32).at[:, 0].set(conf)
    qs = None
    if q is not None:  # Unreached slots: token 0 drawn from one-hot(0).
      qs = jnp.zeros((batch, d) + q.shape[1:], q.dtype)
      qs = qs.at[:, :, 0].set(1).at[:, 0].set(q)
    going = conf >= self.stop_below  # [B] rows still drafting
    length = jnp.ones((batch,), jnp.int32)

    def cond(carry):
      depth, going = carry[0], carry[3]
      return (depth <= d) & jnp.any(going)

    def step(carry):
      depth, cache, token, going, length, tokens, confs, qs = carry
      head_fn, cache = tree_call(self.score_fn, self.params, token[:, None],
                                 (pos + depth - 1)[:, None], cache)
      logits = head_fn(jnp.zeros((batch, 1), jnp.int32), 1)[:, 0, 0]
      token, q, conf = self._choose(logits, view, root_index + depth)
      # Rows that ended keep drafting beside the others (their tokens are
      # real draws, only not counted in `length`).
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, depth - 1, 1)
      confs = jax.lax.dynamic_update_index_in_dim(confs, conf, depth - 1, 1)
      if qs is not None:
        qs = jax.lax.dynamic_update_index_in_dim(qs, q, depth - 1, 1)
      length = length + going
      going = going & (conf >= self.stop_below)
      return depth + 1, cache, token, going, length, tokens, confs, qs

    _, cache, _, _, length, tokens, confs, qs = jax.lax.while_loop(
        cond, step, (jnp.asarray(2, jnp.int32), cache, token, going, length,
                     tokens, confs, qs))
    out = {"cache": cache, "tokens": tokens, "length": length,
           "confidence": confs}
    if qs is not None:
      out["q"] = qs
    return out

  @property
  def prompt_features(self):
    return False  # init reads no hidden states.

  def _prefill(self, view: View):
    """(logits [B, V] at each row's last prompt token, cache): the draft
    model's prompt call."""
    batch, p = view.prompts.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch, p))
    head_fn, cache = tree_call(self.score_fn, self.params, view.prompts,
                               positions, self.cache, prefill=True,
                               keep=(view.prompt_lengths - 1)[:, None])
    return head_fn(jnp.zeros((batch, 1), jnp.int32), 1)[:, 0, 0], cache

  @property
  def drafts_at_prefill(self):
    return self.speculative_prefill

  def prefill_draft(self, view: View):
    # The last prompt token stands in for the root: draft 1 is generated
    # token 0, at the position after the prompt; D + 1 drafts.
    logits, cache = self._prefill(view)
    out = self._drafts_from(cache, view, logits, view.prompt_lengths - 1,
                            view.lengths - 1, self.num_drafts + 1)
    return {"cache": out["cache"]}, self.propose(out, view)

  def init(self, view: View):
    # The logits at the last prompt token go unread: the target decided
    # the root there.
    _, cache = self._prefill(view)
    return self._draft(cache, view)

  def update(self, carry, view: View):
    return self._draft(carry["cache"], view)

  def propose(self, carry, view: View) -> Draft:
    q = carry.get("q")
    return Draft(tokens=carry["tokens"][:, None],
                 q=None if q is None else q[:, None],
                 confidence=carry.get("confidence"),
                 length=carry.get("length"))
