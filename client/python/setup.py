"""Generates the gRPC stubs (attnscope.v1) from ../../proto when the package is built, so that
`pip install ./client/python` gives a complete client. The project's CMake build generates the
same stubs into build/python for in-tree use."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc
        out = os.path.join(self.build_lib)
        os.makedirs(os.path.join(out, "attnscope", "v1"), exist_ok=True)
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                          os.path.join(PROTO_ROOT, "attnscope", "v1", "attnscope.proto")])
        if rc != 0:
            raise RuntimeError("protoc failed to generate the attnscope stubs")
        open(os.path.join(out, "attnscope", "v1", "__init__.py"), "a").close()


setup(cmdclass={"build_py": BuildWithStubs})
