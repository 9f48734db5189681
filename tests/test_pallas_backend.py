"""The pallas attention backend decodes exactly like the xla reference."""

import numpy as np
import pytest

import blockdec
from tests.helpers import ragged_prompts, random_model


@pytest.mark.parametrize("arch", [0, 5])
def test_pallas_and_xla_backends_decode_identically(arch):
  cfg, params = random_model(arch)
  pallas_cfg = cfg.replace(attention_backend="pallas")
  prompts, lengths = ragged_prompts(arch, 3, 6, cfg.vocab_size)
  for fn, kw in ((blockdec.greedy_decode, {}),
                 (blockdec.blockwise_decode, dict(block_size=4))):
    want = fn(params, cfg, prompts, lengths, max_new_tokens=16, **kw)
    got = fn(params, pallas_cfg, prompts, lengths, max_new_tokens=16, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.num_calls, want.num_calls)


def test_pallas_and_xla_backends_decode_fused_block_diffusion_identically():
  # Denoising calls (block-bidirectional mask) and fused verification calls
  # (a tree mask or'ed with each guessed block's both-ways pattern).
  cfg, params = random_model(2, num_prediction_heads=1, vocab_size=12)
  cfg = cfg.replace(mask_token_id=11)
  prompts, lengths = ragged_prompts(2, 3, 6, 11)
  # With the sub-block cache: per-row runtime patterns over shorter blocks.
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=12)
  for sub_block in (None, 1):
    method = blockdec.BlockDiffusion(3, 0.5, acceptance=blockdec.Exact(),
                                     next_block_guesses=1,
                                     sub_block_size=sub_block)
    want = blockdec.decode(params, cfg, prompts, lengths, 12, method=method)
    got = blockdec.decode(params, cfg.replace(attention_backend="pallas"),
                          prompts, lengths, 12, method=method)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.num_calls, want.num_calls)
    np.testing.assert_array_equal(want.tokens, greedy.tokens)


def test_pallas_prefill_logits_match_xla():
  cfg, params = random_model(3)
  from blockdec.models import transformer
  import jax.numpy as jnp
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  out = {}
  for backend in ("xla", "pallas"):
    c = cfg.replace(attention_backend=backend)
    out[backend], _ = transformer.apply(params, c, tokens, positions,
                                        transformer.make_cache(c, 2, 24))
  # Whole-model logits: float32 rounding of the two attention paths adds up
  # over the layers (2.4e-5 seen on an Intel Xeon, under 2e-5 on AMD EPYC);
  # a wrong mask moves logits by tenths.
  np.testing.assert_allclose(out["pallas"], out["xla"], atol=1e-4, rtol=1e-4)
