import re

import numpy as np
import pytest

import blockdec

BASE = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4)


@pytest.mark.parametrize("field,value,error,message", [
    ("vocab_size", 0, ValueError, "vocab_size=0 must be a positive integer"),
    ("d_model", 30, ValueError, "d_model=30 must be divisible by n_heads=4"),
    ("n_kv_heads", 3, ValueError, "n_kv_heads=3 must divide n_heads=4"),
    ("num_prediction_heads", 0, ValueError, "num_prediction_heads=0"),
    ("norm", "batchnorm", ValueError, "norm='batchnorm' is not supported"),
    ("attention_backend", "cuda", ValueError, "attention_backend='cuda'"),
    ("dtype", "float16", ValueError, "dtype='float16'"),
    ("n_layers", 1.5, TypeError, "n_layers=1.5"),
    ("rope_scaling", (1.0, 2.0), ValueError, "rope_scaling"),
    ("tie_embeddings", "no", TypeError, "tie_embeddings='no' must be True or "
     "False"),
    ("qkv_bias", 1, TypeError, "qkv_bias=1"),
    ("norm_eps", "1e-6", TypeError, "norm_eps='1e-6' must be a number > 0"),
    ("norm_eps", float("nan"), ValueError, "norm_eps=nan"),
    ("rope_theta", 0, ValueError, "rope_theta=0 must be a number > 0"),
    ("rope_scaling", (0, 0, 0, 0), ValueError, "rope_scaling factor=0"),
    ("rope_scaling", (8.0, 2.0, 2.0, 64), ValueError,
     "rope_scaling high_freq_factor=2.0 must exceed low_freq_factor=2.0"),
    ("rope_scaling", (8.0, 1.0, 4.0, 64.5), TypeError,
     "rope_scaling original_max_position=64.5"),
    ("norm", None, TypeError, "norm=None must be a string"),
])
def test_invalid_fields_are_named(field, value, error, message):
  with pytest.raises(error, match=re.escape(message)):
    blockdec.ModelConfig(**{**BASE, field: value})


def test_numpy_scalars_are_python_numbers():
  cfg = blockdec.ModelConfig(vocab_size=np.int64(32), d_model=np.int32(32),
                             n_layers=1, n_heads=4, norm_eps=np.float32(1e-6),
                             tie_embeddings=np.bool_(False))
  plain = blockdec.ModelConfig(**BASE, norm_eps=float(np.float32(1e-6)),
                               tie_embeddings=False)
  assert cfg == plain and hash(cfg) == hash(plain)
  assert type(cfg.d_model) is int and type(cfg.tie_embeddings) is bool
  assert blockdec.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_config_is_hashable_and_round_trips():
  cfg = blockdec.ModelConfig(**BASE, rope_scaling=(8.0, 1.0, 4.0, 64))
  assert hash(cfg) == hash(blockdec.ModelConfig.from_dict(cfg.to_dict()))
  assert cfg.num_kv_heads == 4 and cfg.dim_per_head == 8 and cfg.ff_dim == 128
  with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
    blockdec.ModelConfig.from_dict({**BASE, "n_layer": 2})
