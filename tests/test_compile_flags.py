"""tests/compile_flags.py: the test processes' XLA flags."""

import os

from tests import compile_flags


def test_flags_are_added_once_and_a_users_level_wins(monkeypatch):
  monkeypatch.setattr(compile_flags, "_jaxlib_minor", lambda: (0, 10))
  flags = compile_flags.with_fast_compile(
      "--xla_force_host_platform_device_count=8")
  assert flags.split() == ["--xla_force_host_platform_device_count=8",
                           *compile_flags.FAST_COMPILE_FLAGS.split(),
                           compile_flags.EMITTER_FLAG]
  assert compile_flags.with_fast_compile(flags) == flags
  own = "--xla_backend_optimization_level=2"
  assert compile_flags.with_fast_compile(own) == own


def test_emitter_flag_only_on_the_jaxlib_it_was_measured_on(monkeypatch):
  # XLA aborts on an unknown flag: a jaxlib outside the list gets none.
  for minor, expected in (((0, 10), True), ((0, 13), False), (None, False)):
    monkeypatch.setattr(compile_flags, "_jaxlib_minor", lambda m=minor: m)
    assert (compile_flags.EMITTER_FLAG
            in compile_flags.with_fast_compile("")) == expected, minor


def test_this_process_runs_under_the_flags():
  # conftest's flags, or an optimisation level the user set: either way
  # with_fast_compile has nothing left to add.
  flags = os.environ.get("XLA_FLAGS", "")
  assert compile_flags.with_fast_compile(flags) == flags, flags
