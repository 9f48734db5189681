r"""The `blockdec` command: train, decode, eval.

  blockdec train --config configs/base_lm.py:cpu --config.steps=100
  blockdec train --config configs/heads_frozen.py:cpu --cache_dir=cache
  blockdec decode --checkpoint cache/heads_frozen_cpu-... --prompt "def main(" \
      --max_new_tokens=64
  blockdec decode --checkpoint cache/heads_frozen_cpu-... --prompt "def main(" \
      --temperature=0.6 --top_p=0.95 --seed=0
  blockdec decode --checkpoint cache/heads_hydra_demo_distill-... \
      --prompt "def main(" --tree_nodes=24
  blockdec decode --checkpoint cache/base_lm_demo-... --prompt "def main(" \
      --method=draft_model --draft_checkpoint=cache/draft_model_demo-...
  blockdec eval --checkpoint cache/heads_frozen_cpu-... --num_prompts=16
  python -m blockdec.cli train --config configs/base_lm.py:tiny
  blockdec --help

`train` trains the config (or reuses a finished run of the same config from
the cache; a head config trains or reuses its base LM first) and prints the
run folder. `decode` continues one prompt greedily and blockwise (with
`--temperature` > 0: samples it by speculative sampling with the heads,
lossless: distributed as the model's own samples); `--method` drafts with
a draft model (`--draft_checkpoint`), the model's EAGLE drafter, prompt
lookup, lookahead decoding or block diffusion instead of the heads. `eval`
reports held-out loss, per-head agreement and block efficiency on held-out
prompts. The logic lives in blockdec.training; this file only parses flags.

The prompt is used as given, as UTF-8 text; `--prompt_escapes` reads
backslash escapes in it (`\n`, `\t`, `\xNN`, `\u2603`). An error ends the
command with one line on stderr and exit status 1 (2 for bad flags);
`--verbose` shows the traceback instead.
"""

from __future__ import annotations

import json
import pathlib
import sys
import traceback

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
_PROMPT = flags.DEFINE_string(
    "prompt", None, "Prompt text (decode), used as given (UTF-8).")
_PROMPT_ESCAPES = flags.DEFINE_boolean(
    "prompt_escapes", False, "decode: read backslash escapes in --prompt "
    "(\\n, \\t, \\xNN, \\u2603).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.",
                                lower_bound=1)
_BLOCK = flags.DEFINE_integer(
    "block_size", 0, "Blockwise block size k; 0 = all the model's heads.",
    lower_bound=0)
_METHOD = flags.DEFINE_enum(
    "method", "blockwise",
    ["blockwise", "draft_model", "eagle", "prompt_lookup", "lookahead",
     "block_diffusion"],
    "decode: how tokens are drafted (the output is greedy's either way, "
    "except unverified block diffusion): the model's heads, a draft model "
    "(--draft_checkpoint), the model's EAGLE drafter (a configs/eagle.py "
    "run), n-gram lookup in the text (drafts verified only after a 3-token "
    "match, as many as the adaptive rule expects to survive), lookahead "
    "decoding, or "
    "block diffusion (a configs/block_diffusion.py model; --threshold, "
    "--self_speculative).")
_TREE_NODES = flags.DEFINE_integer(
    "tree_nodes", 0, "decode --method=blockwise: verify a token tree of this "
    "many nodes that the heads grow every call (EAGLE-2-style "
    "blockdec.DynamicTree) instead of one chain; 0 = a chain.",
    lower_bound=0)
_THRESHOLD = flags.DEFINE_float(
    "threshold", 0.9, "decode --method=block_diffusion: confidence at which "
    "a masked position is decided.", lower_bound=0.0, upper_bound=1.0)
_SELF_SPECULATIVE = flags.DEFINE_boolean(
    "self_speculative", False, "decode --method=block_diffusion: verify the "
    "diffusion draft in autoregressive mode (output = greedy's).")
_NEXT_BLOCK_GUESSES = flags.DEFINE_integer(
    "next_block_guesses", 0, "decode --method=block_diffusion "
    "--self_speculative: the verification call also denoises the next block "
    "for this many guessed next tokens per accepted length (fused drafting; "
    "fewer calls, same output); 0 = off.", lower_bound=0)
_DIFFUSION_ORDER = flags.DEFINE_enum(
    "diffusion_order", "confidence", ["confidence", "left_to_right"],
    "decode --method=block_diffusion: which masked positions a denoising "
    "call decides: any at or above --threshold (confidence), or only those "
    "that extend the decided prefix (left_to_right).")
_SUB_BLOCK_SIZE = flags.DEFINE_integer(
    "sub_block_size", 0, "decode --method=block_diffusion: the sub-block "
    "cache's granularity (decided sub-blocks at the start of the block "
    "attend causally and are cached, not recomputed); 0 = off.",
    lower_bound=0)
_DRAFT_CHECKPOINT = flags.DEFINE_string(
    "draft_checkpoint", None, "decode --method=draft_model: the draft "
    "model's checkpoint folder (e.g. a configs/draft_model.py run).")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "decode: sampling temperature; 0 = greedy.",
    lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "decode: top-k filter; 0 = off.",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "decode: top-p filter in (0, 1]; "
                            "1 = off.", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "decode: sampling seed.")
_CORPUS = flags.DEFINE_string(
    "corpus", "stdlib", "Corpus whose held-out split eval uses.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16,
                                    "Held-out prompts (eval).", lower_bound=1)
_JSON = flags.DEFINE_boolean("json", False, "eval: print the result as JSON.")
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "On an error, print the traceback, not one line.")

# The flags each command reads (for --help).
COMMAND_FLAGS = {
    "train": ("config", "cache_dir"),
    "decode": ("checkpoint", "prompt", "prompt_escapes", "max_new_tokens",
               "method", "draft_checkpoint", "block_size", "tree_nodes",
               "threshold", "self_speculative", "next_block_guesses",
               "temperature", "top_k", "top_p", "seed"),
    "eval": ("checkpoint", "corpus", "num_prompts", "max_new_tokens",
             "block_size", "json"),
}
COMMAND_HELP = {
    "train": "train a config, or reuse a finished run of it from the cache",
    "decode": "continue one prompt greedily and blockwise, or sample it",
    "eval": "held-out loss, head agreement and block efficiency",
}


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
  prompt = prompt_text(_PROMPT.value, _PROMPT_ESCAPES.value)
  cfg, params, tokenizer = _load()
  if _TEMPERATURE.value > 0:
    _sample(cfg, params, tokenizer, prompt)
    return
  method = _method(cfg)
  r = evaluation.compare_decoding(
      params, cfg, tokenizer, [prompt], max_new_tokens=_MAX_NEW.value,
      block_size=_BLOCK.value or None, repeats=1,
      method=None if _METHOD.value == "blockwise" and not _TREE_NODES.value
      else method)
  print(prompt + r["blockwise"][0])
  print(f"\n[block efficiency {r['block_efficiency']:.2f}, speedup "
        f"{r['speedup']:.2f}x, identical to greedy: {r['identical']}]")


def _method(cfg):
  """The --method spec (block size from --block_size, 0: its default)."""
  import blockdec
  k = _BLOCK.value or None
  name = _METHOD.value
  if _TREE_NODES.value and name != "blockwise":
    raise app.UsageError(f"--tree_nodes={_TREE_NODES.value} grows trees from "
                         f"the heads: it needs --method=blockwise, not "
                         f"--method={name}.")
  if name == "draft_model":
    if _DRAFT_CHECKPOINT.value is None:
      raise app.UsageError("--method=draft_model needs --draft_checkpoint.")
    draft_cfg, draft_params, _ = blockdec.load_checkpoint(
        _DRAFT_CHECKPOINT.value)
    return blockdec.DraftModel(draft_cfg, draft_params, block_size=k or 4)
  if name == "eagle":
    return blockdec.Eagle(block_size=k or 6)
  if name == "prompt_lookup":
    # Shorter matches rarely pay for a wider call on a CPU
    # (experiments/results/prompt_lookup_policy.md).
    if k == 1:
      return blockdec.PromptLookup(block_size=1)
    return blockdec.PromptLookup(block_size=k or 11, min_match=3,
                                 adaptive=blockdec.AdaptiveBlockSize())
  if name == "lookahead":
    if k is not None:
      raise app.UsageError("--method=lookahead takes no --block_size "
                           "(its drafts are ngram - 1 tokens).")
    return blockdec.Lookahead()
  if name == "block_diffusion":
    return blockdec.BlockDiffusion(
        block_size=k or 8, threshold=_THRESHOLD.value,
        acceptance=blockdec.Exact() if _SELF_SPECULATIVE.value else None,
        next_block_guesses=_NEXT_BLOCK_GUESSES.value,
        order=_DIFFUSION_ORDER.value,
        sub_block_size=_SUB_BLOCK_SIZE.value or None)
  if _TREE_NODES.value:
    return blockdec.Blockwise(k or cfg.num_prediction_heads,
                              tree=blockdec.DynamicTree(nodes=_TREE_NODES.value))
  return blockdec.Blockwise(k)


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
                        method=_method(cfg), sampling=sampling,
                        key=jax.random.key(_SEED.value))
  n = int(out.lengths[0])
  print(prompt + tokenizer.decode(out.tokens[0, :n]))
  print(f"\n[speculative sampling ({_METHOD.value}), {sampling}: "
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


def prompt_text(prompt: str, escapes: bool) -> str:
  """The prompt as given, or with its backslash escapes read (`escapes`).

  Characters outside Latin-1 become `\\uXXXX` escapes first, so that the
  escape decoder, which reads bytes as Latin-1, gives them back unchanged:
  "héllo ☃\\n" -> "héllo ☃" + newline.
  """
  if not escapes:
    return prompt
  try:
    return prompt.encode("latin-1", "backslashreplace").decode(
        "unicode_escape")
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompt={prompt!r} has a bad escape sequence "
                     f"({e.reason}); with --prompt_escapes write a backslash "
                     "as \\\\.") from None


def usage() -> str:
  """`blockdec --help`: the commands and the flags each one reads."""
  lines = [f"usage: blockdec {{{','.join(COMMANDS)}}} [--flags]", "",
           "commands:"]
  for command in COMMANDS:
    lines.append(f"  {command:<8}{COMMAND_HELP[command]}")
    for name in COMMAND_FLAGS[command]:
      flag = flags.FLAGS[name]
      default = "" if flag.default is None else f" (default: {flag.default})"
      lines.append(f"      --{name}: {flag.help}{default}")
  lines += ["", "every command:",
            f"      --verbose: {flags.FLAGS['verbose'].help}", "",
            "Example:", "  blockdec train --config configs/base_lm.py:cpu "
            "--config.steps=100"]
  return "\n".join(lines)


def _fail(message: str, status: int = 1, traceback_hint: bool = True):
  """Ends the command with one line on stderr."""
  message = " ".join(str(message).split())  # One line.
  if traceback_hint:
    message += " (--verbose shows the traceback)"
  print(message, file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv):
  """absl's parse, with flag and config-file errors as one line."""
  if any(a in ("--help", "-h", "--helpshort", "help") for a in argv[1:]):
    print(usage())
    sys.exit(0)
  verbose = any(a in ("--verbose", "--verbose=true") for a in argv[1:])
  spec = _config_spec(argv)
  if spec is not None and not pathlib.Path(spec.split(":")[0]).is_file():
    _fail(f"blockdec: bad flags: --config={spec}: config file "
          f"{spec.split(':')[0]} not found.", status=2, traceback_hint=False)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if verbose:
      raise
    _fail(f"blockdec: bad flags: {_config_error(e, argv) or e}", status=2)


def _config_spec(argv) -> str | None:
  """The value of --config in `argv` ("--config=x" or "--config x")."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_error(e, argv) -> str | None:
  """A clear message for an unknown field in a --config.<field> override."""
  for arg in argv[1:]:
    if arg.startswith("--config.") and isinstance(
        e, (AttributeError, KeyError, flags.Error)):
      field = arg[len("--config."):].split("=", 1)[0]
      if f"'{field.split('.')[-1]}'" in str(e):
        return f"{arg}: the config has no field {field!r}."
  return None


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  if len(argv) != 2 or argv[1] not in COMMANDS:
    _fail(f"usage: blockdec {{{','.join(COMMANDS)}}} [--flags]; got "
          f"{argv[1:]}; see blockdec --help.", status=2, traceback_hint=False)
  try:
    {"train": _train, "decode": _decode, "eval": _eval}[argv[1]]()
  except app.UsageError as e:
    _fail(f"blockdec {argv[1]}: {e}; see blockdec --help.", status=2,
          traceback_hint=False)
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value:
      traceback.print_exc()
      sys.exit(1)
    _fail(f"blockdec {argv[1]}: {type(e).__name__}: {e}")


def run():
  """Console-script entry point (pyproject: blockdec = "blockdec.cli:run")."""
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
