import re

import pytest

import blockdec

BASE = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4)


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 0, "vocab_size=0 must be a positive integer"),
    ("d_model", 30, "d_model=30 must be divisible by n_heads=4"),
    ("n_kv_heads", 3, "n_kv_heads=3 must divide n_heads=4"),
    ("num_prediction_heads", 0, "num_prediction_heads=0"),
    ("norm", "batchnorm", "norm='batchnorm' is not supported"),
    ("attention_backend", "cuda", "attention_backend='cuda'"),
    ("dtype", "float16", "dtype='float16'"),
    ("n_layers", 1.5, "n_layers=1.5"),
    ("rope_scaling", (1.0, 2.0), "rope_scaling"),
])
def test_invalid_fields_are_named(field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    blockdec.ModelConfig(**{**BASE, field: value})


def test_config_is_hashable_and_round_trips():
  cfg = blockdec.ModelConfig(**BASE, rope_scaling=(8.0, 1.0, 4.0, 64))
  assert hash(cfg) == hash(blockdec.ModelConfig.from_dict(cfg.to_dict()))
  assert cfg.num_kv_heads == 4 and cfg.dim_per_head == 8 and cfg.ff_dim == 128
  with pytest.raises(ValueError, match="Unknown ModelConfig fields"):
    blockdec.ModelConfig.from_dict({**BASE, "n_layer": 2})
