"""README.md's code is tested: its Python snippets run, its commands exist.

Every ```python block runs, top to bottom in one namespace (later snippets
use the `cfg`, `params` and `prompts` of earlier ones, as a reader would), in
a subprocess with 8 fake CPU devices so the sharding snippet has its mesh.
Every `make` and `blockdec` line of the ```bash blocks is checked without
running it: make targets with `make -n`, blockdec lines for a known command,
defined flags, a loadable `--config file:preset` and existing config fields.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(language: str) -> list[tuple[int, str]]:
  """(first line number, code) of every fenced block of `language`."""
  text = README.read_text()
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in re.finditer(rf"^```{language}\n(.*?)^```", text,
                               re.MULTILINE | re.DOTALL)]


# Runs the blocks in one namespace; prints "ok <line>" after each.
_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__readme__"}
for line, code in json.load(sys.stdin):
  try:
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
  except Exception:
    traceback.print_exc()
    print(f"failed README.md:{line}", flush=True)
    sys.exit(1)
  print(f"ok {line}", flush=True)
"""


def test_readme_has_snippets_and_commands():
  assert len(_blocks("python")) >= 3, "README.md lost its Python snippets."
  first = README.read_text().split("```bash\n", 1)[1].split("```")[0]
  assert first.startswith("make demo") and "make test" in first, first


def test_python_snippets_run(tmp_path):
  import json
  blocks = _blocks("python")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")  # conftest's compile flags
                      + " --xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  # cwd: a scratch folder, so snippets that write files write them there.
  proc = subprocess.run([sys.executable, "-c", _RUNNER],
                        input=json.dumps(blocks), cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
  for line, _ in blocks:
    assert f"ok {line}" in proc.stdout, proc.stdout


def _command_lines() -> list[str]:
  lines = []
  for _, code in _blocks("bash"):
    code = code.replace("\\\n", " ")
    for line in code.splitlines():
      line = line.split(" #", 1)[0].strip()
      if line:
        lines.append(line)
  return lines


@pytest.mark.parametrize("line", [l for l in _command_lines()
                                  if l.startswith("make ")])
def test_make_targets_exist(line):
  proc = subprocess.run(["make", "-n", *shlex.split(line)[1:]], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, f"`{line}`: {proc.stderr}"


def _config_field_exists(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


@pytest.mark.parametrize("line", [l for l in _command_lines()
                                  if l.startswith("blockdec ")])
def test_blockdec_commands_parse(line):
  from absl import flags

  from blockdec import cli
  from blockdec.training import pipeline
  args = shlex.split(line)
  assert args[1] in cli.COMMANDS, f"`{line}`: unknown command {args[1]!r}."
  config = None
  pairs = [a[2:].split("=", 1) if "=" in a else [a[2:], None]
           for a in args[2:] if a.startswith("--")]
  values = iter(args[2:])
  for arg in values:  # "--config path" form: the value is the next word.
    if arg == "--config":
      config = pipeline.load_config(next(values))
  for name, value in pairs:
    if name == "config" and value is not None:
      config = pipeline.load_config(value)
  for name, _ in pairs:
    if name.startswith("config."):
      assert config is not None and _config_field_exists(config, name[7:]), (
          f"`{line}`: --{name} is not a field of the config.")
    else:
      assert name in flags.FLAGS, f"`{line}`: --{name} is not a blockdec flag."
