"""HF checkpoint import/export against transformers itself.

Tiny random GPT-2, Llama (GQA; Llama-3 RoPE scaling) and Qwen2 models are built
from configs (no download), saved with `save_pretrained`, loaded with blockdec
and compared logit for logit and token for token with transformers' own
forward pass and `generate(do_sample=False)`.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip(
    "transformers", reason="the hf extra (torch, transformers) is not installed")

# torch in the process: `make test` runs these apart (see pyproject markers).
pytestmark = pytest.mark.torch

import blockdec  # noqa: E402
from blockdec import metrics as metrics_lib  # noqa: E402
from blockdec.models import hf  # noqa: E402

# transformers >= 5.25 imports HF's `kernels`, which the checkout's kernels/
# folder would shadow here (the root is on sys.path for the tests package).
transformers = hf.import_transformers()
from safetensors.numpy import load_file, save_file  # noqa: E402

VOCAB = 97
ATOL = 1e-4
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _gpt2():
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
      **NO_SPECIAL))


def _llama_gqa():
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, **NO_SPECIAL))


def _llama3_scaled():
  # Tied embeddings and a head_dim that is not hidden_size / heads.
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
      head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16},
      rope_theta=500_000.0, **NO_SPECIAL))


def _qwen2():
  return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, **NO_SPECIAL))


BUILDERS = {"gpt2": _gpt2, "llama_gqa": _llama_gqa,
            "llama3_scaled": _llama3_scaled, "qwen2": _qwen2}


def _scale_up(model):
  """Larger random weights, so logits differ by more than float noise.

  HF initialises with std 0.02, which makes every logit ~0 and greedy ties
  likely; std 0.3 gives a model with decisive argmaxes.
  """
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or ".ln_" in name or name.startswith("transformer.ln"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (folder, torch model) for every tiny architecture."""
  torch.manual_seed(0)
  out = {}
  for name, build in BUILDERS.items():
    model = _scale_up(build())
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    out[name] = (str(folder), model)
  return out


def _tokens(batch, length, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, size=(batch, length))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(saved, name):
  folder, model = saved[name]
  cfg, params = blockdec.load_hf_checkpoint(folder)
  tokens = _tokens(2, 40)
  got = np.asarray(blockdec.forward_logits(params, cfg, tokens))
  want = _hf_logits(model, tokens)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_and_blockwise_match_generate(saved, name):
  folder, model = saved[name]
  cfg, params = blockdec.load_hf_checkpoint(folder, num_prediction_heads=3)
  prompts = _tokens(2, 7, seed=1)
  new = 16
  with torch.no_grad():
    want = model.generate(torch.tensor(prompts), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new,
                          attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          pad_token_id=0)[:, prompts.shape[1]:].numpy()
  lengths = np.full((2,), prompts.shape[1], np.int32)
  greedy = blockdec.greedy_decode(params, cfg, prompts, lengths,
                                  max_new_tokens=new)
  blockwise = blockdec.blockwise_decode(params, cfg, prompts, lengths,
                                        max_new_tokens=new, block_size=3)
  np.testing.assert_array_equal(np.asarray(greedy.tokens), want)
  np.testing.assert_array_equal(np.asarray(blockwise.tokens), want)


def test_loaded_model_is_llama_gqa_config(saved):
  cfg, _ = blockdec.load_hf_checkpoint(saved["llama3_scaled"][0])
  assert cfg.num_kv_heads == 1 and cfg.dim_per_head == 16
  assert cfg.tie_embeddings and cfg.rope_theta == 500_000.0
  assert cfg.rope_scaling == (8.0, 1.0, 4.0, 16)
  cfg, _ = blockdec.load_hf_checkpoint(saved["qwen2"][0])
  assert cfg.qkv_bias and not cfg.proj_bias
  cfg, _ = blockdec.load_hf_checkpoint(saved["gpt2"][0])
  assert (cfg.norm, cfg.mlp, cfg.position, cfg.norm_eps) == (
      "layernorm", "gelu", "learned", 1e-5)


def test_fresh_heads_are_seeded_and_leave_head1_alone(saved):
  folder = saved["llama_gqa"][0]
  cfg1, base = blockdec.load_hf_checkpoint(folder)
  cfg, a = blockdec.load_hf_checkpoint(folder, num_prediction_heads=4, seed=3)
  _, b = blockdec.load_hf_checkpoint(folder, num_prediction_heads=4, seed=3)
  _, c = blockdec.load_hf_checkpoint(folder, num_prediction_heads=4, seed=4)
  assert sorted(a["proposal_heads"]) == ["head_2", "head_3", "head_4"]
  leaves = lambda p: jax.tree_util.tree_leaves(p["proposal_heads"])
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  assert not np.array_equal(leaves(a)[1], leaves(c)[1])
  blockdec.check_params(a, cfg)
  tokens = _tokens(1, 12)
  np.testing.assert_array_equal(blockdec.forward_logits(a, cfg, tokens),
                                blockdec.forward_logits(base, cfg1, tokens))


def test_sharded_checkpoint(tmp_path, saved):
  _, model = saved["llama_gqa"]
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / hf.INDEX_FILE)
  cfg, params = blockdec.load_hf_checkpoint(tmp_path)
  tokens = _tokens(1, 20)
  np.testing.assert_allclose(blockdec.forward_logits(params, cfg, tokens),
                             _hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_bfloat16_weights_load(tmp_path, saved):
  _, model = saved["qwen2"]
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  model.to(torch.float32)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  cfg, params = blockdec.load_hf_checkpoint(tmp_path)
  assert params["embed"]["embedding"].dtype == np.float32
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32).eval()
  tokens = _tokens(1, 20)
  np.testing.assert_allclose(blockdec.forward_logits(params, cfg, tokens),
                             _hf_logits(ref, tokens), atol=ATOL, rtol=0)
  cfg16, params16 = blockdec.load_hf_checkpoint(tmp_path, dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert params16["embed"]["embedding"].dtype == jax.numpy.bfloat16


# ------------------------------------------------------------------- export

EXPORT_CONFIGS = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned",
                 qkv_bias=True, proj_bias=True, norm_eps=1e-5, max_seq_len=64),
    "llama": dict(n_kv_heads=2, tie_embeddings=False, rope_theta=1e4,
                  rope_scaling=(4.0, 1.0, 4.0, 16), max_seq_len=64),
    "qwen2": dict(n_kv_heads=1, qkv_bias=True, max_seq_len=64),
}


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_export_round_trip(tmp_path, name):
  cfg = blockdec.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2,
                             n_heads=4, d_ff=64, num_prediction_heads=3,
                             **EXPORT_CONFIGS[name])
  params = blockdec.init_params(cfg, jax.random.key(1))
  # Init leaves biases and norm offsets at zero; make them count.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(
          jax.random.key(hash(jax.tree_util.keystr(p)) % 2**31), x.shape)
      if jax.tree_util.keystr(p).endswith(("['bias']", "['scale']")) else x,
      params)
  blockdec.export_hf_checkpoint(cfg, params, tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model_type"] == name
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens = _tokens(2, 30)
  ours = np.asarray(blockdec.forward_logits(params, cfg, tokens))
  np.testing.assert_allclose(_hf_logits(model, tokens), ours, atol=ATOL, rtol=0)

  cfg2, params2 = blockdec.load_hf_checkpoint(tmp_path)
  assert cfg2.num_prediction_heads == 3  # From blockdec_heads.safetensors.
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_export_bfloat16(tmp_path, saved):
  cfg, params = blockdec.load_hf_checkpoint(saved["llama_gqa"][0],
                                            num_prediction_heads=2)
  blockdec.export_hf_checkpoint(cfg, params, tmp_path, dtype="bfloat16")
  stored = load_file(tmp_path / hf.WEIGHTS_FILE)
  assert {str(v.dtype) for v in stored.values()} == {"bfloat16"}
  _, back = blockdec.load_hf_checkpoint(tmp_path)
  as_bf16 = lambda x: np.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(a, as_bf16(b)), back, params)


def test_tokenizer(tmp_path, saved):
  from tokenizers import Tokenizer, models
  tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2},
                                   unk_token="[UNK]"))
  cfg, params = blockdec.load_hf_checkpoint(saved["gpt2"][0])
  blockdec.export_hf_checkpoint(cfg, params, tmp_path, tokenizer=tok)
  loaded = blockdec.load_hf_tokenizer(tmp_path)
  assert loaded.token_to_id("world") == 1
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    blockdec.load_hf_tokenizer(saved["gpt2"][0])


# ------------------------------------------------------------------- errors


def _copy(src, dst):
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(dst / name, "wb") as g:
      g.write(f.read())
  return dst


def _edit_config(folder, **changes):
  file = folder / "config.json"
  config = json.loads(file.read_text())
  config.update(changes)
  file.write_text(json.dumps(config))


def test_error_unsupported_architecture(tmp_path, saved):
  folder = _copy(saved["llama_gqa"][0], tmp_path)
  _edit_config(folder, architectures=["BertForMaskedLM"], model_type="bert")
  with pytest.raises(ValueError, match="BertForMaskedLM.*LlamaForCausalLM"):
    blockdec.load_hf_checkpoint(folder)


def test_error_unsupported_rope_and_activation(tmp_path, saved):
  folder = _copy(saved["llama_gqa"][0], tmp_path)
  _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                        "rope_theta": 1e4})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    blockdec.load_hf_checkpoint(folder)
  _edit_config(folder, rope_parameters=None, hidden_act="gelu")
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    blockdec.load_hf_checkpoint(folder)


def test_error_missing_files(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    blockdec.load_hf_checkpoint(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="No config.json"):
    blockdec.load_hf_checkpoint(tmp_path)
  folder = _copy(saved["gpt2"][0], tmp_path)
  os.remove(folder / hf.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    blockdec.load_hf_checkpoint(folder)


def test_error_missing_tensor_and_shape_mismatch(tmp_path, saved):
  folder = _copy(saved["llama_gqa"][0], tmp_path)
  weights = load_file(folder / hf.WEIGHTS_FILE)
  name = "model.layers.1.mlp.up_proj.weight"
  save_file({k: v for k, v in weights.items() if k != name},
            folder / hf.WEIGHTS_FILE, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    blockdec.load_hf_checkpoint(folder)
  save_file(weights, folder / hf.WEIGHTS_FILE, metadata={"format": "pt"})
  _edit_config(folder, intermediate_size=40)
  with pytest.raises(ValueError, match=r"has shape \(48, 32\).*\(40, 32\)"):
    blockdec.load_hf_checkpoint(folder)


def test_error_export_without_hf_layout(tmp_path):
  cfg = blockdec.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1,
                             n_heads=4, norm="layernorm")
  params = blockdec.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="No supported HF architecture"):
    blockdec.export_hf_checkpoint(cfg, params, tmp_path)


# ----------------------------------------------- heads on a frozen checkpoint


def test_frozen_heads_training_on_hf_checkpoint(tmp_path):
  """configs/hf_heads.py trains heads on an HF folder; the base stays exact."""
  from blockdec.training import pipeline, train
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model = _scale_up(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2,
      **NO_SPECIAL)))
  cfg, params = blockdec.load_hf_checkpoint(_save(model, tmp_path / "gpt2"))
  folder = tmp_path / "gpt2_bytes"
  blockdec.export_hf_checkpoint(cfg, params, folder,
                                tokenizer=hf.byte_tokenizer())
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(20):
    (corpus / f"m{i}.py").write_text(
        f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 8)

  config = pipeline.load_config(os.path.join(root, "configs", "hf_heads.py"),
                                "tiny")
  config.hf_checkpoint = str(folder)
  assert config.init_from == str(folder)  # Follows hf_checkpoint.
  config.data.corpus = str(corpus)
  config.data.valid_fraction, config.data.test_fraction = 0.2, 0.1
  config.progress, config.steps = False, 2
  config.diagnostics.num_prompts = 0  # Decoding is checked below instead.
  summary = train.train(config, tmp_path / "run")
  assert summary["steps"] == 2 and summary["regime"] == "frozen"
  hcfg, hparams, tokenizer = blockdec.load_checkpoint(tmp_path / "run")
  assert hcfg.num_prediction_heads == 4
  for key in params:  # The pretrained weights: bit-for-bit.
    jax.tree_util.tree_map(np.testing.assert_array_equal, hparams[key],
                           params[key])
  prompt = tokenizer.encode("def f")
  np.testing.assert_array_equal(prompt, list(b"def f"))
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt[None]), do_sample=False,
                          max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0)[:, len(prompt):].numpy()
  out = blockdec.blockwise_decode(hparams, hcfg, prompt[None],
                                  np.array([len(prompt)]), max_new_tokens=10)
  np.testing.assert_array_equal(out.tokens, want)


def _save(model, folder):
  model.save_pretrained(folder)
  return folder


def test_gpt2_tiny_config_to_hf_and_distilled_heads(tmp_path):
  """The benchmark's GPT-2 path: configs/gpt2_tiny.py (BPE) trains a
  GPT-2-layout model, exported it loads as GPT2LMHeadModel, heads are
  distilled on the HF folder by configs/hf_heads.py, and blockwise
  decoding with them equals transformers' greedy output."""
  from blockdec.training import pipeline
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(20):
    (corpus / f"m{i}.py").write_text(
        f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 8)

  def small(c):
    c.data.corpus = str(corpus)
    c.data.valid_fraction, c.data.test_fraction = 0.2, 0.1
    c.data.eval_batches, c.data.seq_len = 1, 32
    c.progress, c.steps, c.batch_size = False, 2, 4
    c.eval_every = c.checkpoint_every = 2
    c.diagnostics.num_prompts = 0
    return c

  base_config = small(pipeline.load_config(
      os.path.join(root, "configs", "gpt2_tiny.py")))
  base_config.data.bpe_vocab_size = 300
  base_config.model.d_model, base_config.model.n_layers = 32, 1
  base = pipeline.train_or_load(base_config, tmp_path / "cache")
  assert (base.cfg.norm, base.cfg.mlp, base.cfg.position) == (
      "layernorm", "gelu", "learned")
  folder = tmp_path / "gpt2_bpe"
  blockdec.export_hf_checkpoint(base.cfg, base.params, folder,
                                tokenizer=base.tokenizer)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  assert type(model).__name__ == "GPT2LMHeadModel"

  heads = small(pipeline.load_config(
      os.path.join(root, "configs", "hf_heads.py"), "tiny"))
  heads.hf_checkpoint = str(folder)
  heads.regime = "distill"
  run = pipeline.train_or_load(heads, tmp_path / "cache")
  assert run.cfg.num_prediction_heads == 4
  prompt = blockdec.load_hf_tokenizer(folder).encode("def f1(x):").ids
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), do_sample=False,
                          max_new_tokens=12, min_new_tokens=12,
                          pad_token_id=0)[:, len(prompt):].numpy()
  for adaptive in (None, blockdec.AdaptiveBlockSize()):
    out = blockdec.blockwise_decode(run.params, run.cfg, np.array([prompt]),
                                    np.array([len(prompt)]), max_new_tokens=12,
                                    adaptive=adaptive)
    np.testing.assert_array_equal(out.tokens, want)


def test_hf_peers_block_sizes_flag():
  """experiments/hf_peers.py --block-sizes: MODEL=K pairs, errors naming
  what is allowed."""
  import argparse
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  assert hf_peers.block_sizes_flag("gpt2-tiny-hydra=4, demo-llama=8") == {
      "gpt2-tiny-hydra": 4, "demo-llama": 8}
  for bad in ("gpt2-tiny-hydra=1", "nope=4", "gpt2-tiny-hydra", "demo-llama=x"):
    with pytest.raises(argparse.ArgumentTypeError, match="MODEL=K"):
      hf_peers.block_sizes_flag(bad)


def test_hf_peers_times_the_systems_of_a_group_interleaved():
  """Each round calls every system once, so a drift of the machine's speed
  during the run reaches all of them alike."""
  import pathlib
  import statistics
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  log = []

  def make(name):
    def fn():
      log.append(name)
      return f"{name}{len(log)}"
    return fn

  out = hf_peers.interleaved({"a": make("a"), "b": make("b")}, repeats=2)
  assert log == ["a", "b", "a", "b", "a", "b"]  # Warm-ups, then 2 rounds.
  assert out["a"][3] == "a5" and out["b"][3] == "b6"  # The last results.
  assert len(out["a"][2]) == 2
  assert out["b"][1] == statistics.median(out["b"][2])


def test_hf_peers_paired_ratio_reads_rounds_side_by_side():
  """The round-by-round speedup divides each round's two times (the same
  machine speed), not one median by the other."""
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  # The machine slows 3x in round 2: each round's ratio stays 5x, 6x, 4x.
  mine = {"times_s": [1.0, 3.0, 1.0]}
  peer = {"times_s": [5.0, 18.0, 4.0]}
  assert hf_peers.paired(mine, peer) == (
      "round by round 5.00x, 4.00-6.00x over 3 rounds")


def test_import_transformers_binds_hf_kernels_not_the_checkout_folder():
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  loaded = sys.modules.get("kernels")
  if loaded is not None:  # transformers >= 5.25 with HF's kernels installed.
    folder = os.path.join(root, "kernels")
    assert not os.path.abspath(loaded.__file__).startswith(folder + os.sep)
    assert hasattr(loaded, "CUDAProperties")
  # The import that failed under transformers 5.25 before the fix.
  assert hf.import_transformers().GPT2LMHeadModel.__name__ == "GPT2LMHeadModel"


@pytest.mark.torch
@pytest.mark.parametrize("slow_count", [1, 2])
def test_hf_peers_gives_each_system_its_faster_torch_thread_count(
    monkeypatch, slow_count):
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  seen = []

  def fake_timed(fn):  # A clock on which `slow_count` threads run 3x slower.
    n = torch.get_num_threads()
    seen.append(n)
    return (3.0 if n == slow_count else 1.0), fn()

  monkeypatch.setattr(hf_peers, "without_gc", fake_timed)
  before = torch.get_num_threads()
  try:
    best = hf_peers.pick_torch_threads(lambda: None, rounds=2)
    assert best == 3 - slow_count
    assert seen == [2, 1, 1, 2]  # The counts take turns.
    assert torch.get_num_threads() == best  # Left set for the system.
    torch.set_num_threads(slow_count)
    run = hf_peers.with_torch_threads(torch.get_num_threads, best)
    assert run() == best  # Each system sets its own count when it runs.
  finally:
    torch.set_num_threads(before)


def test_hf_peers_batch_one_rows_decode_one_by_one():
  """experiments/hf_peers.py at batch 1 decodes its prompts one after
  another: the stacked output equals each row decoded alone, and calls add
  up per row."""
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  from tests.helpers import random_model
  cfg, params = random_model(3)
  prompts = np.random.RandomState(0).randint(
      1, cfg.vocab_size, (3, 5)).astype(np.int32)
  fn, _ = hf_peers.system_call(
      "blockdec-blockwise", hf_model=None, hf_draft=None, cfg=cfg,
      params=params, draft=None, prompts=prompts, new_tokens=6,
      temperature=0.0, block_size=4, rows_one_by_one=True)
  out = fn()
  assert out.tokens.shape == (3, 6) and out.num_calls.shape == (3,)
  for i in range(3):
    alone = blockdec.blockwise_decode(params, cfg, prompts[i:i + 1],
                                      np.array([5]), max_new_tokens=6,
                                      block_size=4)
    np.testing.assert_array_equal(out.tokens[i], np.asarray(alone.tokens)[0])
    assert out.num_calls[i] == int(np.asarray(alone.num_calls)[0])


def test_hf_peers_draft_model_block_per_row():
  """experiments/hf_peers.py: blockdec-draft-model verifies 16 tokens per
  call in greedy batch-1 rows, 4 in sampled batch-1 rows and 8 at batch 8,
  or --draft-block-size's block in every row; the row decodes what that
  DraftModel decodes."""
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  from tests.helpers import random_model
  cfg, params = random_model(3)
  draft = blockdec.DraftModel(cfg, params, block_size=hf_peers.DRAFT_BLOCK_SIZE)
  prompts = np.random.RandomState(1).randint(
      1, cfg.vocab_size, (2, 5)).astype(np.int32)
  common = dict(hf_model=None, hf_draft=None, cfg=cfg, params=params,
                draft=draft, new_tokens=6)
  cases = [(prompts[:1], 0.0, None, 16), (prompts[:1], 0.6, None, 4),
           (prompts, 0.0, None, 8), (prompts, 0.6, None, 8),
           (prompts[:1], 0.0, 4, 4), (prompts[:1], 0.6, 6, 6)]
  for rows, temperature, fixed, want in cases:
    fn, settings = hf_peers.system_call(
        "blockdec-draft-model", prompts=rows, temperature=temperature,
        draft_block=fixed, **common)
    assert settings == f"block_size={want}", (temperature, fixed, settings)
    if not temperature:
      alone = blockdec.decode(
          params, cfg, rows, np.full((len(rows),), 5), 6,
          method=dataclasses.replace(draft, block_size=want))
      np.testing.assert_array_equal(np.asarray(fn().tokens),
                                    np.asarray(alone.tokens))
  assert hf_peers.draft_block_size(1, 0.0) == 16
  assert hf_peers.draft_block_size(1, 0.6) == 4
  assert hf_peers.draft_block_size(8, 0.6) == 8
  assert hf_peers.draft_block_size(8, 0.0, fixed=12) == 12


def test_hf_peers_sampled_rows_draft_with_the_sampled_draft(tmp_path):
  """experiments/hf_peers.bench_model: with `sampled_draft`, rows at
  temperature > 0 give both sides that draft (and its note), greedy rows
  the greedy-text one; a sampled blockdec row decodes what a DraftModel of
  the sampled draft decodes."""
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "experiments"))
  import hf_peers
  from tests.helpers import random_model
  cfg, params = random_model(3, vocab_size=64, num_prediction_heads=2)
  folders = {}
  for name, seed in (("base", None), ("greedy", 5), ("sampled", 6)):
    c, p = (cfg, params) if seed is None else random_model(
        2, param_seed=seed, n_layers=1, vocab_size=cfg.vocab_size,
        num_prediction_heads=1, max_seq_len=cfg.max_seq_len)
    folders[name] = tmp_path / name
    blockdec.export_hf_checkpoint(c, p, folders[name])
  prompts = np.random.RandomState(0).randint(
      1, cfg.vocab_size, (2, 5)).astype(np.int32)
  rows = hf_peers.bench_model(
      "tiny", folders["base"], folders["greedy"], {"random": {1: prompts}},
      6, ["hf-assisted", "blockdec-draft-model"], 1, {},
      temperatures=(0.0, 0.6), draft_note="greedy-text draft",
      sampled_draft=(folders["sampled"], "sampled-text draft"))
  notes = {(r["system"], r["temperature"]): r["note"] for r in rows}
  assert notes == {
      ("hf-assisted", 0.0): "greedy-text draft",
      ("blockdec-draft-model", 0.0): "greedy-text draft",
      ("hf-assisted", 0.6): "sampled-text draft",
      ("blockdec-draft-model", 0.6): "sampled-text draft"}
  dcfg, dparams = blockdec.load_hf_checkpoint(folders["sampled"])
  hcfg, hparams = blockdec.load_hf_checkpoint(folders["base"])
  fn, _ = hf_peers.system_call(
      "blockdec-draft-model", hf_model=None, hf_draft=None, cfg=hcfg,
      params=hparams, prompts=prompts, new_tokens=6, temperature=0.6,
      rows_one_by_one=True,
      draft=blockdec.DraftModel(dcfg, dparams, block_size=4))
  alone = fn()
  row = next(r for r in rows if r["system"] == "blockdec-draft-model"
             and r["temperature"] == 0.6)
  assert row["block_efficiency"] == pytest.approx(float(
      metrics_lib.block_efficiency(np.asarray(alone.lengths),
                                   np.asarray(alone.num_calls))))
