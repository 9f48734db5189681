"""Hardening (issue 19): bad input gets a clear error naming the argument,
NumPy integer scalars are ints, non-finite weights are caught, damaged
checkpoints are named and survived, the CLI speaks UTF-8."""

import gc
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockdec
from blockdec import sharding
from tests.helpers import random_model

PROMPTS, LENGTHS = np.array([[1, 2, 3]]), np.array([3])


@pytest.fixture(scope="module")
def model():
  return random_model(0)


def _raises(error, message):
  return pytest.raises(error, match=re.escape(message))


# ---------------------------------------------------------- decode arguments


@pytest.mark.parametrize("kw,error,message", [
    (dict(eos_id=2.5), TypeError, "eos_id=2.5 must be None or an integer"),
    (dict(eos_id="2"), TypeError, "eos_id='2'"),
    (dict(pad_id=None), TypeError, "pad_id=None must be an integer in [0, "),
    (dict(pad_id=-1), ValueError, "pad_id=-1"),
    (dict(max_new_tokens=8.0), TypeError, "max_new_tokens=8.0"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens=True"),
    (dict(prompt_lengths=np.array([2.7])), TypeError,
     "prompt_lengths must be an integer array"),
    (dict(prompts=np.array([[1.0, 2.0, 3.0]])), TypeError,
     "prompts must be an integer array"),
    (dict(compact_rows="yes"), TypeError, "compact_rows='yes'"),
    (dict(sampling=blockdec.Sampling()), ValueError, "PRNG key"),
    (dict(method=blockdec.Blockwise(1, adaptive=blockdec.AdaptiveBlockSize())),
     ValueError, "block_size=1 drafts none"),
    (dict(method=blockdec.Blockwise(2, acceptance="exact")), TypeError,
     "acceptance='exact'"),
    (dict(method="blockwise"), TypeError, "method='blockwise'"),
])
def test_decode_arguments_are_named(model, kw, error, message):
  cfg, params = model
  args = dict(prompts=PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=4)
  args.update(kw)
  with _raises(error, message):
    blockdec.decode(params, cfg, args.pop("prompts"), args.pop("prompt_lengths"),
                    args.pop("max_new_tokens"), **args)


def test_wrappers_name_their_arguments(model):
  cfg, params = model
  with _raises(ValueError, "block_size=1 drafts none"):
    blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS, max_new_tokens=4,
                              block_size=1,
                              adaptive=blockdec.AdaptiveBlockSize())
  with _raises(TypeError, "block_size=2.0"):
    blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS, block_size=2.0)
  with _raises(TypeError, "lattice_width='4'"):
    blockdec.refined_blockwise_decode(params, cfg, PROMPTS, LENGTHS,
                                      lattice_width="4")
  with _raises(TypeError, "cfg must be a blockdec.ModelConfig"):
    blockdec.greedy_decode(params, cfg.to_dict(), PROMPTS, LENGTHS)


def test_numpy_integer_scalars_are_ints(model):
  cfg, params = model
  want = blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS,
                                   max_new_tokens=8, block_size=2, eos_id=5)
  got = blockdec.blockwise_decode(
      params, cfg, PROMPTS, LENGTHS, max_new_tokens=np.int64(8),
      block_size=np.int32(2), eos_id=np.int16(5), pad_id=np.uint8(0))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  got = blockdec.refined_blockwise_decode(
      params, cfg, PROMPTS, LENGTHS, max_new_tokens=np.int64(8),
      block_size=np.int32(2), num_drafts=np.int64(1),
      lattice_width=np.int64(2))
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_numpy_scalars_in_specs_are_python_numbers():
  assert blockdec.TopK(np.int64(2)) == blockdec.TopK(2)
  assert type(blockdec.MinBlock(np.int32(2)).l) is int
  assert type(blockdec.Distance(np.int64(1)).eps) is int
  s = blockdec.Sampling(np.float32(0.5), np.int64(4), np.float64(0.9))
  assert s == blockdec.Sampling(0.5, 4, 0.9) and type(s.top_k) is int
  assert hash(s) == hash(blockdec.Sampling(0.5, 4, 0.9))
  a = blockdec.AdaptiveBlockSize(np.float32(0.5), sizes=(np.int64(2),))
  assert a == blockdec.AdaptiveBlockSize(0.5, sizes=(2,))
  assert blockdec.Typical(np.float32(0.5)).posterior_threshold == 0.5


@pytest.mark.parametrize("make,error,message", [
    (lambda: blockdec.MinBlock(2, base="x"), TypeError, "MinBlock base='x'"),
    (lambda: blockdec.MinBlock(0), ValueError, "MinBlock l=0"),
    (lambda: blockdec.TopK(2.0), TypeError, "TopK n=2.0"),
    (lambda: blockdec.Distance(-1), ValueError, "Distance eps=-1"),
    (lambda: blockdec.Sampling(top_k=2.5), TypeError, "Sampling top_k=2.5"),
    (lambda: blockdec.Sampling(top_p="0.9"), TypeError, "Sampling top_p='0.9'"),
    (lambda: blockdec.Sampling(float("nan")), ValueError,
     "Sampling temperature=nan"),
    (lambda: blockdec.Typical("0.1"), TypeError,
     "Typical posterior_threshold='0.1'"),
    (lambda: blockdec.AdaptiveBlockSize(token_cost="0.3"), TypeError,
     "AdaptiveBlockSize token_cost='0.3'"),
    (lambda: blockdec.AdaptiveBlockSize(sizes=(2.0,)), ValueError,
     "AdaptiveBlockSize sizes=(2.0,)"),
    (lambda: blockdec.NGramLM.build([np.arange(4)], order=2.0, vocab_size=8),
     TypeError, "order=2.0"),
    (lambda: sharding.ShardingConfig(rules=(("batch", "dat"),)), ValueError,
     "names the mesh axis 'dat'"),
    (lambda: sharding.ShardingConfig(rules=(("btch", "data"),)), ValueError,
     "names the logical axis 'btch'"),
])
def test_specs_name_bad_fields(make, error, message):
  with _raises(error, message):
    make()


def test_decode_with_a_mesh_checks_its_rules(model):
  cfg, params = model
  mesh = blockdec.make_mesh((1, 1))
  with _raises(ValueError, "names the mesh axis 'modle'"):
    blockdec.greedy_decode(params, cfg, PROMPTS, LENGTHS, max_new_tokens=2,
                           mesh=mesh, rules=(("heads", "modle"),))


# ------------------------------------------------------------ forward_logits


@pytest.mark.parametrize("tokens,error,message", [
    (np.zeros((0, 3), np.int32), ValueError, "tokens must be a non-empty"),
    (np.zeros((1, 0), np.int32), ValueError, "got shape (1, 0)"),
    (np.array([[1.5, 2.0]]), TypeError, "tokens must be an integer array"),
    (np.array([1, 2]), ValueError, "tokens must be a non-empty int array [B, T]"),
    (np.array([[1, 99]]), ValueError, "tokens holds token id 99"),
])
def test_forward_logits_arguments(model, tokens, error, message):
  cfg, params = model
  with _raises(error, message):
    blockdec.forward_logits(params, cfg, tokens)


# ------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_named(model, bad):
  cfg, params = model
  broken = jax.tree_util.tree_map(lambda x: x, params)
  kernel = np.array(broken["layer_0"]["mlp"]["down"]["kernel"])
  kernel[0, 0] = bad
  broken["layer_0"]["mlp"]["down"]["kernel"] = jnp.asarray(kernel)
  message = "params['layer_0']['mlp']['down']['kernel'] holds 1 NaN or infinite"
  with _raises(ValueError, message):
    blockdec.blockwise_decode(broken, cfg, PROMPTS, LENGTHS, max_new_tokens=4)
  with _raises(ValueError, message):
    blockdec.forward_logits(broken, cfg, PROMPTS)
  with _raises(ValueError, message):
    blockdec.check_params(broken, cfg)


def test_finite_weights_are_checked_once_per_params_object(model, monkeypatch):
  from blockdec import api
  cfg, params = model
  params = jax.tree_util.tree_map(lambda x: x + 0, params)  # Fresh arrays.
  calls = []
  real = api._non_finite_counts
  monkeypatch.setattr(api, "_non_finite_counts",
                      lambda leaves: calls.append(1) or real(leaves))
  for _ in range(3):
    blockdec.check_params(params, cfg)
  assert len(calls) == 1
  blockdec.check_params(jax.tree_util.tree_map(lambda x: x + 0, params), cfg)
  assert len(calls) == 2


def test_checks_that_need_values_are_skipped_under_jit(model):
  """The documented caveat: under a caller's jax.jit, out-of-vocabulary ids
  pass unchecked (shapes and options are still checked)."""
  cfg, params = model
  fn = jax.jit(lambda p, t: blockdec.forward_logits(p, cfg, t))
  fn(params, np.array([[1, cfg.vocab_size + 5]]))  # No error: values unseen.
  with _raises(TypeError, "tokens must be an integer array"):
    fn(params, np.array([[1.0, 2.0]]))


def test_weights_closed_over_by_a_callers_jit_are_checked(model):
  """Weights a jitted function closes over are concrete: they are checked
  (finite) as outside a jit; the count used to be staged into the caller's
  trace and fail to convert (TracerArrayConversionError)."""
  cfg, params = model
  fresh = jax.tree_util.tree_map(lambda x: x + 0, params)  # Never checked.
  decode = lambda w: jax.jit(lambda p, n: blockdec.blockwise_decode(
      w, cfg, p, n, max_new_tokens=4).tokens)(PROMPTS, LENGTHS)
  eager = blockdec.blockwise_decode(params, cfg, PROMPTS, LENGTHS,
                                    max_new_tokens=4)
  np.testing.assert_array_equal(decode(fresh), eager.tokens)
  broken = jax.tree_util.tree_map(lambda x: x + 0, params)
  broken["embed"]["embedding"] = broken["embed"]["embedding"].at[0, 0].set(
      np.inf)
  with _raises(ValueError, "params['embed']['embedding'] holds 1 NaN or "
               "infinite"):
    decode(broken)


# ---------------------------------------------------------------- checkpoints


def _tiny_run_config(corpus):
  from tests.test_training import tiny
  config = tiny("base_lm", corpus, steps=4, checkpoint_every=1, log_every=1,
                eval_every=2)
  config.keep_checkpoints = 3
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A finished tiny run and the same run killed after step 3 (orbax steps
  1..3 kept): (config, finished folder, killed folder)."""
  from blockdec.training import train
  from tests.test_training_data import write_corpus
  root = tmp_path_factory.mktemp("runs")
  config = _tiny_run_config(write_corpus(root / "corpus", n=30))
  train.train(config, root / "finished")
  killed = train.Trainer(config, root / "killed").run(stop_at_step=3)
  assert killed[1] is None
  return config, root / "finished", root / "killed"


def _copy_run(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _assert_same_params(a, b):
  _, pa, _ = blockdec.load_checkpoint(a)
  _, pb, _ = blockdec.load_checkpoint(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _flip_bit(path, offset=-5):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x04
  path.write_bytes(bytes(data))


def test_params_file_has_a_checksum_and_the_usual_mode(model, tmp_path):
  import os
  import safetensors
  cfg, params = model
  blockdec.save_checkpoint(tmp_path, cfg, params)
  path = tmp_path / "params.safetensors"
  mode = lambda p: os.stat(p).st_mode & 0o777
  assert mode(path) == mode(tmp_path / "model_config.json")
  with safetensors.safe_open(str(path), "np") as f:
    assert len(f.metadata()["sha256"]) == 64


@pytest.mark.parametrize("damage,message", [
    (_truncate, "does not read as a safetensors file"),
    (_flip_bit, "SHA-256"),
    (lambda p: p.write_bytes(b""), "does not read as a safetensors file"),
])
def test_damaged_params_file_is_named(model, tmp_path, damage, message):
  from blockdec.checkpointing import DamagedCheckpointError
  cfg, params = model
  blockdec.save_checkpoint(tmp_path, cfg, params)
  path = tmp_path / "params.safetensors"
  damage(path)
  with pytest.raises(DamagedCheckpointError, match=re.escape(message)) as e:
    blockdec.load_checkpoint(tmp_path, with_tokenizer=False)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "torn summary"])
def test_damaged_cached_run_is_reported_and_finished_again(runs, tmp_path,
                                                           damage):
  from blockdec.training import pipeline
  config, finished, _ = runs
  config = config.copy_and_resolve_references()
  config.workdir = str(_copy_run(finished, tmp_path / "run"))
  if damage == "truncated":
    _truncate(tmp_path / "run" / "params.safetensors")
  elif damage == "bit-flipped":
    _flip_bit(tmp_path / "run" / "params.safetensors")
  else:
    _truncate(tmp_path / "run" / "summary.json")
  logs = []
  run = pipeline.train_or_load(config, tmp_path, log=logs.append)
  assert "is damaged" in logs[0] and logs[-1].startswith("[train]"), logs
  assert (tmp_path / "run" / "params.safetensors.damaged").exists()
  assert run.summary["steps"] == 4
  _assert_same_params(finished, tmp_path / "run")
  logs.clear()
  pipeline.train_or_load(config, tmp_path, log=logs.append)
  assert logs == [f"[cache] {config.name}: reusing {tmp_path / 'run'}"]


def _damage_orbax(kind, step_dir):
  if kind == "missing metadata":
    (step_dir / "default" / "_METADATA").unlink()
  elif kind == "truncated data":
    data = step_dir / "default" / "ocdbt.process_0" / "d"
    _truncate(max(data.iterdir(), key=lambda p: p.stat().st_size))
  elif kind == "empty step":
    import shutil
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# Orbax's reader of the truncated step leaves coroutines and callbacks
# behind when the read fails; they raise only when the garbage collector
# finalises them. The test collects them itself (below), so their
# "Exception ignored" reports land here instead of in a later test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["missing metadata", "truncated data",
                                  "empty step"])
def test_resume_skips_a_damaged_orbax_step(runs, tmp_path, kind, capsys):
  from blockdec.training import train
  config, finished, killed = runs
  run = _copy_run(killed, tmp_path / "run")
  _damage_orbax(kind, run / "checkpoints" / "3")
  # Unfinished run: load_checkpoint falls back to step 2 as well.
  _, params, _ = blockdec.load_checkpoint(run, with_tokenizer=False)
  assert params is not None
  train.train(config, run)
  assert "checkpoints/3 does not restore" in capsys.readouterr().out
  assert (run / "checkpoints.damaged" / "3.damaged").is_dir()
  _assert_same_params(finished, run)  # Resumed from step 2, exactly.
  rows = lambda d: [(r["split"], r["step"], r["loss"])
                    for r in train.read_metrics(d / "metrics.jsonl")]
  assert rows(run) == rows(finished)
  gc.collect()


def test_no_valid_orbax_step_fails_naming_the_folder(runs, tmp_path):
  from blockdec.checkpointing import DamagedCheckpointError
  from blockdec.training import train
  config, _, killed = runs
  run = _copy_run(killed, tmp_path / "run")
  for step in (1, 2, 3):
    _damage_orbax("missing metadata", run / "checkpoints" / str(step))
  with pytest.raises(DamagedCheckpointError,
                     match=re.escape(f"no orbax step under {run / 'checkpoints'}")):
    train.train(config, run)


def test_torn_metrics_line_is_dropped_on_resume(runs, tmp_path):
  from blockdec.checkpointing import DamagedCheckpointError
  from blockdec.training import train
  config, finished, killed = runs
  run = _copy_run(killed, tmp_path / "run")
  metrics = run / "metrics.jsonl"
  with open(metrics, "a") as f:
    f.write('{"split": "train", "step": 4, "lo')  # Killed mid-write.
  assert train.read_metrics(metrics)[-1]["step"] == 3
  train.train(config, run)
  rows = lambda d: [(r["split"], r["step"], r["loss"])
                    for r in train.read_metrics(d / "metrics.jsonl")]
  assert rows(run) == rows(finished)
  lines = metrics.read_text().splitlines()
  metrics.write_text("\n".join(["{torn", *lines]) + "\n")
  with pytest.raises(DamagedCheckpointError, match=re.escape(f"{metrics}:1")):
    train.read_metrics(metrics)


# ------------------------------------------------------------------------ CLI


def _cli(*args):
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "blockdec.cli", *args],
                        capture_output=True, text=True, timeout=300, env=env,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


@pytest.fixture
def byte_checkpoint(tmp_path):
  from blockdec.training.tokenizers import ByteTokenizer
  cfg, params = random_model(0, vocab_size=256, num_prediction_heads=2)
  blockdec.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  return tmp_path


@pytest.mark.parametrize("prompt,escapes,expected", [
    ("héllo ☃", False, "héllo ☃"),
    ("a\\nb", False, "a\\nb"),               # As given: backslash, n.
    ("a\\n☃\\xe9", True, "a\n☃é"),
])
def test_cli_prompt_reaches_the_model_as_utf8(byte_checkpoint, monkeypatch,
                                              capsys, prompt, escapes,
                                              expected):
  from absl import flags
  from blockdec import api, cli
  seen = []
  real = api.decode

  def spy(params, cfg, prompts, lengths, *args, **kw):
    seen.append(np.asarray(prompts)[0, :int(np.asarray(lengths)[0])].tolist())
    return real(params, cfg, prompts, lengths, *args, **kw)

  monkeypatch.setattr(api, "decode", spy)
  argv = ["blockdec", "decode", f"--checkpoint={byte_checkpoint}",
          f"--prompt={prompt}", "--max_new_tokens=2"]
  try:
    cli.main(flags.FLAGS(argv + ["--prompt_escapes"] * escapes))
  finally:
    flags.FLAGS.unparse_flags()
  assert seen and all(ids == list(expected.encode("utf-8")) for ids in seen)
  assert capsys.readouterr().out.startswith(expected)


def test_cli_bad_escape_names_the_prompt(byte_checkpoint):
  from blockdec import cli
  with _raises(ValueError, "--prompt='a\\\\x' has a bad escape sequence"):
    cli.prompt_text("a\\x", escapes=True)


def test_cli_help_lists_commands_and_exits_0():
  proc = _cli("--help")
  assert proc.returncode == 0, proc.stderr
  for word in ("train", "decode", "eval", "--prompt_escapes", "--num_prompts",
               "--config", "--verbose"):
    assert word in proc.stdout


@pytest.mark.parametrize("args,message", [
    (("train", "--config=configs/nope.py:tiny"),
     "--config=configs/nope.py:tiny: config file configs/nope.py not found"),
    (("train", "--config=configs/base_lm.py:tiny", "--config.nosuch=1"),
     "--config.nosuch=1: the config has no field 'nosuch'"),
    (("eval", "--num_prompts=0", "--checkpoint=x"), "--num_prompts=0"),
    (("eval", "--checkpoint=/nonexistent"), "checkpoint folder /nonexistent"),
    (("frob",), "see blockdec --help"),
])
def test_cli_errors_are_one_line(args, message):
  proc = _cli(*args)
  assert proc.returncode in (1, 2)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_cli_verbose_shows_the_traceback():
  proc = _cli("eval", "--checkpoint=/nonexistent", "--verbose")
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "checkpoint folder /nonexistent" in proc.stderr


# ----------------------------------------------------------- load_hf_checkpoint


@pytest.fixture
def hf_folder(tmp_path):
  import json
  from blockdec.models.hf import byte_tokenizer
  cfg = blockdec.ModelConfig(vocab_size=256, d_model=32, n_layers=1,
                             n_heads=2, max_seq_len=64)
  params = blockdec.init_params(cfg, jax.random.key(0))
  blockdec.export_hf_checkpoint(cfg, params, tmp_path,
                                tokenizer=byte_tokenizer())

  def edit(**changes):
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))

  return tmp_path, edit


def test_hf_caps_are_warnings_that_say_what_was_done(hf_folder):
  folder, edit = hf_folder
  with pytest.warns(UserWarning, match=re.escape(
      "max_seq_len=1000 exceeds the checkpoint's max_position_embeddings=64; "
      "using max_seq_len=64")):
    cfg, _ = blockdec.load_hf_checkpoint(folder, max_seq_len=1000)
  assert cfg.max_seq_len == 64
  edit(sliding_window=32, use_sliding_window=True)
  with pytest.warns(UserWarning, match=re.escape(
      "sliding_window=32 is below max_position_embeddings=64")):
    cfg, _ = blockdec.load_hf_checkpoint(folder)
  assert cfg.max_seq_len == 32


def test_hf_contradicting_model_type_is_a_warning(hf_folder):
  folder, edit = hf_folder
  edit(model_type="gpt2")
  with pytest.warns(UserWarning, match=re.escape(
      "architectures=['LlamaForCausalLM'] (read as llama) contradicts "
      "model_type='gpt2'")):
    cfg, _ = blockdec.load_hf_checkpoint(folder)
  assert cfg.norm == "rmsnorm"
