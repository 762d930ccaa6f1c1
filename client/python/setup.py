"""Generates the gRPC stubs (attnscope.v1) from ../../proto when the package is built, so that
`pip install ./client/python` gives a complete client. The stubs come from grpcio-tools where the
build has it (pip's isolated build installs it, pyproject.toml), else from the system's protoc and
grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc, which deploy/install-deps.sh
installs), so a build without isolation or network works too. The project's CMake build generates
the same stubs into build/python for in-tree use."""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
PROTO = os.path.join(PROTO_ROOT, "attnscope", "v1", "attnscope.proto")


def generate(out):
    args = [f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO]
    try:
        from grpc_tools import protoc
    except ImportError:
        protoc = None
    if protoc is not None:
        return protoc.main(["protoc", *args])
    compiler, plugin = shutil.which("protoc"), shutil.which("grpc_python_plugin")
    if compiler is None or plugin is None:
        raise RuntimeError("building attnscope needs grpcio-tools (pip install grpcio-tools) or protoc and "
                           "grpc_python_plugin (Debian: apt install protobuf-compiler protobuf-compiler-grpc)")
    return subprocess.call([compiler, f"--plugin=protoc-gen-grpc_python={plugin}", *args])


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        out = os.path.join(self.build_lib)
        os.makedirs(os.path.join(out, "attnscope", "v1"), exist_ok=True)
        if generate(out) != 0:
            raise RuntimeError("protoc failed to generate the attnscope stubs")
        open(os.path.join(out, "attnscope", "v1", "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
