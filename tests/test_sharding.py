"""Sharding on 8 fake CPU devices, meshes (8,1), (4,2), (2,4), (1,8).

The checks live in tests/sharding_checks.py and run in a subprocess: the
8-device XLA flag must be set before jax is imported, and this pytest
process (and every xdist worker) has imported jax already. Each test runs a
few checks in one process to pay for jax's start-up and compiles once.
"""

import os
import subprocess
import sys

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "sharding_checks.py")


def _run(*cases):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # sharding_checks.py sets its own.
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, _SCRIPT, *cases], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (
      f"sharding_checks.py {' '.join(cases)} failed:\n{proc.stdout}\n"
      f"{proc.stderr[-6000:]}")
  for case in cases:
    assert f"ok {case} " in proc.stdout, proc.stdout


def test_mesh_params_cache_and_checkpoint():
  """make_mesh, parameter shardings (DEFAULT and FSDP rules, shard shapes),
  sharded init, cache shardings, save on (4,2) -> restore on (2,4)."""
  _run("mesh", "params_sharding", "cache_sharding", "checkpoint")


def test_sharded_decoding_equals_one_device():
  """Greedy and blockwise tokens on every mesh == one-device tokens."""
  _run("decode")


def test_every_method_decodes_sharded_as_on_one_device():
  """Refined, sampling, draft model, prompt lookup and lookahead on a mesh
  == one device."""
  _run("decode_methods")


def test_model_drafters_decode_sharded_as_on_one_device():
  """Block diffusion, EAGLE and Hydra on a mesh == one device."""
  _run("decode_model_drafters")


def test_sharded_pallas_decoding_equals_xla():
  """The Pallas kernel under shard_map == xla on one device. (Apart from
  the other decoding checks so that xdist spreads the suite's longest
  test over both workers.)"""
  _run("decode_pallas")


def test_sharded_training_equals_one_device():
  """The train step on every mesh (FSDP on (4,2), a heads regime too) ==
  one device; the Trainer runs sharded from config.sharding.mesh_shape and a
  run checkpointed on (4,2) resumes on (2,4)."""
  _run("train_step", "trainer")
