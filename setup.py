"""Generates the gRPC stubs from proto/ while the package is built.

The stubs are build outputs (never committed, never edited): `make proto` runs the same step.
"""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self):
        from shard_server_build import generate_protos  # noqa: PLC0415

        generate_protos()
        super().run()


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "proto"))
    setup(cmdclass={"build_py": BuildPyWithProto})
