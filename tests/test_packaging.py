"""Every package folder is listed in pyproject.toml and importable."""

import importlib
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
  cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(cfg["packages"])
  found = set()
  for top, name in (("blockdec", "blockdec"), ("kernels", "blockdec.kernels")):
    for init in (ROOT / top).rglob("__init__.py"):
      rel = init.parent.relative_to(ROOT / top).parts
      found.add(".".join((name,) + rel))
  assert found <= listed, f"add to pyproject.toml packages: {sorted(found - listed)}"
  for name in listed:
    importlib.import_module(name)
