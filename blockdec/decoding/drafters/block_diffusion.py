"""Block diffusion as a drafter: the model denoises a block of [MASK] tokens.

A model adapted for block diffusion (`configs/block_diffusion.py`) predicts
a masked position from the logits of the position before it (token shift,
so its head 1 keeps its autoregressive meaning), attending to the committed
cache causally and to its own block both ways. One block of b tokens after
the decided token (the root) at position `pos`:

    feed   [root, x_1, .., x_{b-1}] at pos .. pos + b - 1 with
           BlockBidirectionalMask(b); x_j is [MASK] until decided
    read   logits at i predict x_{i+1}; confidence = its largest probability
           ([MASK] itself excluded)
    decide every undecided x_j whose confidence is >= threshold, and at
           least the most confident one; repeat until the block is decided
           (order "left_to_right": only the run of such x_j that starts at
           the first undecided one, and at least that one)

These denoising calls go through `View.score`, which writes nothing to the
target's cache, and are reported in `Draft.calls`. The block then goes to
the core's ordinary verification call, a causal call on [root, x_1 .. x_b]
that writes the block's clean (autoregressive) keys and values:

  * `AcceptAll(mask)`: the drafts are the output (block diffusion proper;
    lossy), and the call's last logits decide the token after the block;
  * `Exact()`: the model in autoregressive mode verifies its own diffusion
    draft (self-speculative, as S2D2): the output is the adapted model's
    greedy output token for token.

With `stop_token` (AdaBlock-style adaptive block size) the block ends after
the first decided `stop_token` (e.g. a newline) whose preceding positions
are all decided: the positions after it become [MASK] filler, never
accepted, and are decoded in the next block with that line as context.

Fused drafting (`guesses` = (r_0, .., r_{b-1}), not all 0; self-
speculative mode): the verification call also denoises the next block. If
the call accepts a < b drafts, the token after them (the next root) is the
model's correction at x_{a+1}, which differs from the draft there; the
denoiser's r_a runner-ups at x_{a+1} guess it. For every a in [0, b) and
each of its r_a guesses g the call feeds one more block, an extra node
group `[g, MASK x (b - 1)]` at positions a + 1 .. a + b after the root,
under x_1 .. x_a, seeing itself both ways (`core.ExtraNodes.groups`):
exactly the first denoising call of the next block, had the next root
been g. After the call, a row whose root is one of its accepted length's
guesses takes that group's logits as its first denoising step, so its
next block needs one denoising call fewer (none at threshold 0). Other
rows (every draft accepted, or no guess right) denoise as before. A call
then feeds (b + 1) + sum(r_a) * b nodes and commits only the chain's.

Sub-block cache (`sub_block_size` = s < b; Fast-dLLM v2's idea, made
exact). The fed block's slots 0 .. b-1 ([root, x_1 .. x_{b-1}]) fall into
sub-blocks of s. Once a row's leading decided tokens x_1 .. x_D cover whole
sub-blocks, the first F = s * floor(D / s) slots are frozen: their tokens
are final and no logits there are needed (slot i predicts x_{i+1}, decided).
A frozen slot attends causally, as committed text does (the verification
call writes committed blocks causally, and training shows the denoiser
clean text before its block), so its keys and values never change again;
the other slots see the whole block both ways. A denoising step therefore
feeds only slots [w, b), where w is the number of slots frozen in every row
as of the previous step, and reads slots [0, w) from the KV cache: each
step writes its block's keys and values past the committed length
(`View.write_score`), where the next step finds them before its first
position and the verification call overwrites them. The fed width is one
of ceil(b / s) static sizes (one while loop each, in order); a row ahead
of the others gets its extra frozen slots through a per-row pattern
(`kernels.RuntimePatternMask`). Reading the cache equals recomputing the
whole block under the same per-row pattern (`reuse_cache=False`, tested),
so the cache changes nothing but the work; the frozen-causal rule itself
changes the denoiser's view from plain block diffusion (s = b, no
freezing), which is measured in experiments/results/block_diffusion.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blockdec.decoding.core import Draft, Drafter, ExtraNodes, View
from blockdec.decoding.lattice import DraftTree
from blockdec.kernels import masks


class BlockDiffusionDrafter(Drafter):
  """Drafts a block of `block_size` tokens by parallel denoising.

  Args:
    block_size: b, tokens drafted per block (after the root).
    threshold: confidence at which a masked position is decided; 1.0
      decides one position per denoising call, 0.0 all of them in one.
    order: "confidence" (any position may be decided) or "left_to_right"
      (the decided positions always form a prefix of the block).
    mask_id: the model's [MASK] token.
    stop_token: end a block after this token (None: fixed blocks).
    guesses: (r_0, r_1, ..) guessed next roots after a accepted drafts
      (at most b entries, validated by `methods.BlockDiffusion`) whose next
      block the verification call denoises too (fused drafting; empty or
      all 0: off). Needs a verifier that rejects (`Exact()`).
    sub_block_size: s, the sub-block cache's granularity (None or >= b:
      off, every step feeds and recomputes the whole block).
    reuse_cache: False recomputes the frozen slots in every step instead of
      reading them from the cache (the reference the cache is tested
      against; same output).
  """

  ORDERS = ("confidence", "left_to_right")

  def __init__(self, block_size: int, threshold: float, mask_id: int,
               stop_token: int | None = None, guesses: tuple[int, ...] = (),
               order: str = "confidence", sub_block_size: int | None = None,
               reuse_cache: bool = True):
    if order not in self.ORDERS:
      raise ValueError(f"order={order!r}; allowed: {self.ORDERS}.")
    self.block_size, self.threshold, self.order = block_size, threshold, order
    self.sub_block_size = (None if sub_block_size is None
                           or sub_block_size >= block_size else sub_block_size)
    self.reuse_cache = reuse_cache
    self.mask_id, self.stop_token = mask_id, stop_token
    # Group i guesses the next root after outcome[i] accepted drafts with
    # the denoiser's rank[i]-th runner-up there.
    self.outcome = tuple(a for a, r in enumerate(guesses) for _ in range(r))
    self.rank = tuple(g for r in guesses for g in range(r))
    self.num_runner_ups = max(guesses, default=0)  # Kept per position.

  @property
  def fused(self) -> bool:
    return bool(self.outcome)

  @property
  def num_drafts(self) -> int:
    return self.block_size

  @property
  def tree(self) -> DraftTree | None:
    # Fused drafting feeds extra nodes, which ride on a (one-chain) tree.
    return DraftTree(1, self.block_size + 1) if self.fused else None

  @property
  def extra(self) -> ExtraNodes | None:
    if not self.fused:
      return None
    b = self.block_size
    parents, depths, groups = [], [], []
    for i, a in enumerate(self.outcome):  # The chain's node a is x_a.
      first = b + 1 + len(parents)  # The group's root in the whole call.
      parents += [a] + [first + j for j in range(b - 1)]
      depths += [a + 1 + j for j in range(b)]
      groups += [i] * b
    return ExtraNodes(tuple(parents), tuple(depths), tuple(groups))

  def _empty(self, rows):
    """A carry without a started block."""
    b, r = self.block_size, self.num_runner_ups
    return dict(tokens=jnp.full((rows, b), self.mask_id, jnp.int32),
                decided=jnp.zeros((rows, b), bool),
                runner_ups=jnp.zeros((rows, b, r), jnp.int32))

  @property
  def prompt_features(self):
    return False  # init reads no hidden states.

  def init(self, view: View):
    return self._empty(view.lengths.shape[0]) if self.fused else None

  def runner_ups(self, logits):
    """[B, b, r] the r likeliest tokens after the argmax ([MASK] excluded)."""
    logits = logits.at[..., self.mask_id].set(-jnp.inf)
    _, top = jax.lax.top_k(logits, self.num_runner_ups + 1)
    return top[..., 1:].astype(jnp.int32)

  def update(self, carry, view: View):
    if not self.fused:
      return None
    b, rows, groups = self.block_size, view.lengths.shape[0], len(self.outcome)
    accepted = view.num_committed - 1  # In [0, b] (EOS or budget: done).
    guessed = view.extra_tokens.reshape(rows, groups, b)[..., 0]
    outcome = jnp.asarray(self.outcome, jnp.int32)
    hit = ((guessed == view.next_token[:, None])
           & (outcome[None] == accepted[:, None]))  # [B, groups]
    group = jnp.argmax(hit, axis=-1)
    logits = view.extra_logits.reshape(rows, groups, b, -1)
    logits = jnp.take_along_axis(logits, group[:, None, None, None],
                                 axis=1)[:, 0]  # [B, b, V]
    empty = self._empty(rows)
    tokens, decided, _ = self.denoise_step(logits, empty["tokens"],
                                           empty["decided"])
    started = dict(tokens=tokens, decided=decided,
                   runner_ups=self.runner_ups(logits))
    ok = jnp.any(hit, axis=-1)
    return jax.tree_util.tree_map(
        lambda x, y: jnp.where(ok.reshape((rows,) + (1,) * (x.ndim - 1)),
                               x, y), started, empty)

  def denoise_step(self, logits, tokens, decided):
    """One denoising decision.

    Args:
      logits: [B, b, V] head-1 logits of the fed block (i predicts x_{i+1}).
      tokens: [B, b] int32 the block's tokens ([MASK] where undecided).
      decided: [B, b] bool.

    Returns:
      (tokens, decided, confidence [B, b]) after deciding every undecided
      position at or above the threshold, and at least the most confident.
    """
    logits = logits.at[..., self.mask_id].set(-jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    confidence = jnp.max(probs, axis=-1)
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pending = ~decided
    sure = confidence >= self.threshold
    if self.order == "left_to_right":
      # The first undecided position, and the sure ones right after it.
      first = jax.nn.one_hot(jnp.argmax(pending, axis=-1), self.block_size,
                             dtype=bool)
      run = jnp.cumprod((decided | sure | first).astype(jnp.int32),
                        axis=-1).astype(bool)
      decide = pending & run
    else:
      best = jnp.argmax(jnp.where(pending, confidence, -1.0), axis=-1)
      first = jax.nn.one_hot(best, self.block_size, dtype=bool)
      decide = pending & (sure | first)
    tokens = jnp.where(decide, predicted, tokens)
    decided = decided | decide
    if self.stop_token is not None:
      ready = jnp.cumprod(decided.astype(jnp.int32), axis=-1).astype(bool)
      stop = ready & (tokens == self.stop_token)
      after = (jnp.arange(self.block_size)[None]
               > jnp.argmax(stop, axis=-1)[:, None])
      cut = jnp.any(stop, axis=-1, keepdims=True) & after
      tokens = jnp.where(cut, self.mask_id, tokens)
      decided = decided | cut
    return tokens, decided, confidence

  def propose(self, carry, view: View) -> Draft:
    b, rows = self.block_size, view.lengths.shape[0]
    root = view.next_token.astype(jnp.int32)
    positions = ((view.prompt_lengths + view.lengths)[:, None]
                 + jnp.arange(b, dtype=jnp.int32))
    mask = masks.BlockBidirectionalMask(b)

    start = self._empty(rows) if carry is None else carry
    start = dict(start, calls=jnp.zeros((rows,), jnp.int32))
    s = self.sub_block_size
    if s is not None and self.reuse_cache:
      start.update(cache=view.cache, written=jnp.zeros((), jnp.int32))

    def cond(c):
      return ~jnp.all(c["decided"])

    def fed_block(c):
      return jnp.concatenate([root[:, None], c["tokens"][:, :b - 1]], axis=1)

    def frozen(c):
      """[B] slots frozen per row: whole sub-blocks of decided x_1 .. x_D."""
      lead = jnp.sum(jnp.cumprod(c["decided"].astype(jnp.int32), axis=-1),
                     axis=-1)
      return (lead // s) * s

    def pattern(first, width, num_frozen):
      """[B, width, width] fed slots first .. b-1: causal where frozen."""
      slot = first + jnp.arange(width, dtype=jnp.int32)
      causal = jnp.tri(width, dtype=bool)[None]
      return masks.RuntimePatternMask(jnp.where(
          (slot[None, :] < num_frozen[:, None])[..., None], causal, True))

    def decide(c, logits):
      tokens, decided = c["tokens"], c["decided"]
      tokens, now, _ = self.denoise_step(logits, tokens, decided)
      c = dict(c, tokens=tokens, decided=now, calls=(
          c["calls"] + jnp.any(~decided, axis=-1)).astype(jnp.int32))
      if self.fused:  # Runner-ups of the step that decided a position.
        c["runner_ups"] = jnp.where((now & ~decided)[..., None],
                                    self.runner_ups(logits), c["runner_ups"])
      return c

    if s is None:
      def body(c):
        return decide(c, view.score(fed_block(c), positions, mask))
    elif not self.reuse_cache:
      def body(c):  # The reference: every slot fed, none read from cache.
        return decide(c, view.score(fed_block(c), positions,
                                    pattern(0, b, frozen(c))))
    else:
      def branch(first, c):
        """A step feeding slots first .. b-1; slots < first are cached."""
        num_frozen, width = frozen(c), b - first
        logits, cache = view.write_score(
            c["cache"], fed_block(c)[:, first:], positions[:, first:],
            pattern(first, width, num_frozen))
        # Slots < first predict decided tokens only: no logits needed.
        logits = jnp.pad(logits, ((0, 0), (first, 0), (0, 0)))
        # Slots < min(num_frozen) were causal in every row: cached now.
        written = jnp.maximum(c["written"], jnp.min(num_frozen))
        return decide(dict(c, cache=cache, written=written), logits)

    # Every step decides at least one position of every unfinished row, so
    # the loop ends after at most b steps.
    if s is None or not self.reuse_cache:
      out = jax.lax.while_loop(cond, body, start)
    else:
      # Slots cached in every row: a multiple of s below b while any row is
      # undecided (its frozen slots precede its first undecided token), and
      # never fewer. One loop per width, in order; a loop runs while the
      # cache holds exactly its slots (none when `written` jumped past).
      # Consecutive loops, not a `lax.switch` in one: XLA copied the whole
      # KV cache into and out of the switch's branches (8% slower at b = 16
      # on the demo model than recomputing every slot).
      out = start
      for first in range(0, b, s):
        out = jax.lax.while_loop(
            lambda c, first=first: cond(c) & (c["written"] == first),
            functools.partial(branch, first), out)
    extra = None
    if self.fused:  # Group i: [runner-up rank[i] at x_{outcome[i]+1}, MASK..].
      groups = len(self.outcome)
      roots = out["runner_ups"][:, jnp.asarray(self.outcome),
                                jnp.asarray(self.rank)]  # [B, groups]
      extra = jnp.concatenate([
          roots[..., None],
          jnp.full((rows, groups, b - 1), self.mask_id, jnp.int32)],
          axis=-1).reshape(rows, groups * b)
    return Draft(tokens=out["tokens"][:, None], calls=out["calls"],
                 extra=extra, cache=out.get("cache"))
