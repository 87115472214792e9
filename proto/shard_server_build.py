"""Stub generation shared by setup.py and `make proto`.

protoc is pointed at proto/ under the virtual import path `shard_server/pb`, so the generated
modules live in `shard_server.pb.generate.v1` and import each other by that absolute name: no
sys.path hacks at run time. The wire package stays `generate.v1`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "shard_server/pb/generate/v1/generate.proto"


def generate_protos() -> None:
    from grpc_tools import protoc  # noqa: PLC0415

    out = ROOT / "shard_server" / "pb" / "generate" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-Ishard_server/pb={ROOT / 'proto'}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            PROTO,
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO}")
    for pkg in (out.parent.parent, out.parent, out):
        (pkg / "__init__.py").touch()


if __name__ == "__main__":
    generate_protos()
