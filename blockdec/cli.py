r"""The `blockdec` command: train, decode, eval.

  blockdec train --config configs/base_lm.py:cpu --config.steps=100
  blockdec train --config configs/heads_frozen.py:cpu --cache_dir=cache
  blockdec decode --checkpoint cache/heads_frozen_cpu-... --prompt "def main(" \
      --max_new_tokens=64
  blockdec decode --checkpoint cache/heads_frozen_cpu-... --prompt "def main(" \
      --temperature=0.6 --top_p=0.95 --seed=0
  blockdec eval --checkpoint cache/heads_frozen_cpu-... --num_prompts=16
  python -m blockdec.cli train --config configs/base_lm.py:tiny

`train` trains the config (or reuses a finished run of the same config from
the cache; a head config trains or reuses its base LM first) and prints the
run folder. `decode` continues one prompt greedily and blockwise (with
`--temperature` > 0: samples it by speculative sampling with the heads,
lossless: distributed as the model's own samples). `eval`
reports held-out loss, per-head agreement and block efficiency on held-out
prompts. The logic lives in blockdec.training; this file only parses flags.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "decode", "eval")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/base_lm.py:cpu.",
    lock_config=True)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", "cache", "Folder of cached runs (train) and distillation data.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint folder (decode, eval).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (decode).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_BLOCK = flags.DEFINE_integer(
    "block_size", 0, "Blockwise block size k; 0 = all the model's heads.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "decode: sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "decode: top-k filter; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "decode: top-p filter; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "decode: sampling seed.")
_CORPUS = flags.DEFINE_string(
    "corpus", "stdlib", "Corpus whose held-out split eval uses.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Held-out prompts (eval).")
_JSON = flags.DEFINE_boolean("json", False, "eval: print the result as JSON.")


def _train():
  from blockdec.training import pipeline
  if _CONFIG.value is None:
    raise app.UsageError("train needs --config, e.g. "
                         "--config=configs/base_lm.py:cpu")
  run = pipeline.train_or_load(_CONFIG.value, _CACHE_DIR.value)
  valid = run.summary.get("valid", {})
  print(f"run folder: {run.workdir}")
  print(f"held-out loss: {valid.get('loss', float('nan')):.4f} nats/token, "
        f"{valid.get('nats_per_byte', float('nan')):.4f} nats/byte")
  if "head_agreement" in run.summary:
    print("head agreement with greedy: " + " ".join(
        f"{a:.2f}" for a in run.summary["head_agreement"]))
  if "draft_agreement" in run.summary:
    d = run.summary["draft_agreement"]
    print(f"draft agreement with the base's greedy: {d['agreement']:.3f}; "
          "tokens per base call at block size " + ", ".join(
              f"{k}: {v:.2f}" for k, v in d["tokens_per_call"].items()))


def _load():
  import blockdec
  if not _CHECKPOINT.value:
    raise app.UsageError("--checkpoint is required.")
  return blockdec.load_checkpoint(_CHECKPOINT.value)


def _decode():
  from blockdec.training import evaluation
  if _PROMPT.value is None:
    raise app.UsageError("decode needs --prompt.")
  cfg, params, tokenizer = _load()
  prompt = _PROMPT.value.encode().decode("unicode_escape")  # Allow "\n".
  if _TEMPERATURE.value > 0:
    _sample(cfg, params, tokenizer, prompt)
    return
  r = evaluation.compare_decoding(params, cfg, tokenizer, [prompt],
                                  max_new_tokens=_MAX_NEW.value,
                                  block_size=_BLOCK.value or None, repeats=1)
  print(prompt + r["blockwise"][0])
  print(f"\n[block efficiency {r['block_efficiency']:.2f}, speedup "
        f"{r['speedup']:.2f}x, identical to greedy: {r['identical']}]")


def _sample(cfg, params, tokenizer, prompt):
  import jax
  import blockdec
  from blockdec.training import train
  sampling = blockdec.Sampling(temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value or None,
                               top_p=_TOP_P.value if _TOP_P.value < 1 else None)
  room = max(cfg.max_seq_len - _MAX_NEW.value, 1)
  prompts, lengths = train.pad_prompts([tokenizer.encode(prompt)[-room:]])
  out = blockdec.decode(params, cfg, prompts, lengths, _MAX_NEW.value,
                        method=blockdec.Blockwise(_BLOCK.value or None),
                        sampling=sampling, key=jax.random.key(_SEED.value))
  n = int(out.lengths[0])
  print(prompt + tokenizer.decode(out.tokens[0, :n]))
  print(f"\n[speculative sampling, {sampling}: "
        f"{float(out.block_efficiency):.2f} tokens per call]")


def _eval():
  from blockdec.training import data, diagnostics, evaluation, train
  cfg, params, tokenizer = _load()
  splits = data.split_corpus(data.load_corpus(_CORPUS.value))
  loss = evaluation.heldout_loss(params, cfg, tokenizer, splits["valid"])
  texts = data.heldout_prompts(splits["test"] or splits["valid"],
                               _NUM_PROMPTS.value, min_bytes=128, max_bytes=192)
  r = evaluation.compare_decoding(params, cfg, tokenizer, texts,
                                  max_new_tokens=_MAX_NEW.value,
                                  block_size=_BLOCK.value or None)
  room = max(cfg.max_seq_len - _MAX_NEW.value, 1)
  prompts, lengths = train.pad_prompts([tokenizer.encode(t)[-room:]
                                        for t in texts])
  agree = diagnostics.head_agreement(params, cfg, prompts, lengths,
                                     _MAX_NEW.value).tolist()
  result = {"heldout": loss, "head_agreement": agree,
            **{k: v for k, v in r.items() if k not in ("greedy", "blockwise")}}
  if _JSON.value:
    print(json.dumps(result, indent=2))
    return
  print(f"held-out loss {loss['loss']:.4f} nats/token "
        f"({loss['nats_per_byte']:.4f} nats/byte)")
  print("head agreement with greedy: " + " ".join(f"{a:.2f}" for a in agree))
  print(f"block efficiency {r['block_efficiency']:.2f} (non-degenerate rows "
        f"{r['block_efficiency_non_degenerate']:.2f}; degenerate "
        f"{r['degenerate_share']:.0%}), speedup {r['speedup']:.2f}x, "
        f"identical to greedy: {r['identical']}")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: blockdec {{{','.join(COMMANDS)}}} [--flags]; "
                         f"got {argv[1:]}.")
  {"train": _train, "decode": _decode, "eval": _eval}[argv[1]]()


def run():
  """Console-script entry point (pyproject: blockdec = "blockdec.cli:run")."""
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
