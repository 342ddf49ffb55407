"""Only the C part of the build; everything else is in pyproject.toml.

The extension is optional: without a compiler the package installs and
reads chains in pure Python (slower on deep chains, same bytes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine._fastread",
            ["engine/_fastread.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            optional=True,
        )
    ]
)
