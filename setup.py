"""Only the C part of the build; everything else is in pyproject.toml.

The extensions are optional: without a compiler the package installs and
reads chains in Python and numpy (slower on deep chains, same bytes).
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-cast-function-type"]

setup(
    ext_modules=[
        # The chain read loop (engine/chain.py ChainView._fill).
        Extension("engine._fastread", ["engine/_fastread.c"], extra_compile_args=_FLAGS, optional=True),
        # The chain index sweep (engine/chain.py flatten_arrays).
        Extension("engine._chainindex", ["engine/_chainindex.c"], extra_compile_args=_FLAGS, optional=True),
        # A device's plain reads and writes without the GIL (engine/devio.py).
        Extension("engine._devio", ["engine/_devio.c"], depends=["engine/_devio.h"],
                  extra_compile_args=_FLAGS, optional=True),
        # The mount's request relay: device I/O served by those, the rest by pyfuse3.
        Extension("backupfs._relay", ["backupfs/_relay.c"], depends=["engine/_devio.h"], include_dirs=["engine"],
                  extra_compile_args=_FLAGS, optional=True),
    ]
)
