"""attnscope: a notebook client for the attnscope attention service."""
from pkgutil import extend_path

# The generated stubs (attnscope.v1) may live in another directory on sys.path (the build tree).
__path__ = extend_path(__path__, __name__)

from .sample import Sample, SampleError, load  # noqa: E402

# What the gRPC client needs beyond numpy: grpcio, protobuf and the generated stubs (built with the
# project). Without them, loading and viewing stored samples still works, and the client's names
# say what is missing when used; any other ImportError is a bug and is raised as it is.
_CLIENT_NEEDS = ("grpc", "google", "attnscope.v1")

try:
    from .client import AsyncClient, Client, Job, StreamResult  # noqa: E402
    from .errors import ServerError  # noqa: E402
except ImportError as e:
    if not any((e.name or "") == m or (e.name or "").startswith(m + ".") for m in _CLIENT_NEEDS):
        raise
    _client_missing = e

    def __getattr__(name):
        if name in ("AsyncClient", "Client", "Job", "StreamResult", "ServerError"):
            raise ImportError(f"attnscope.{name} needs grpcio, protobuf and the generated stubs "
                              f"(attnscope.v1, in build/python): {_client_missing}") from _client_missing
        raise AttributeError(f"module 'attnscope' has no attribute {name!r}")

__all__ = ["AsyncClient", "Client", "Job", "ServerError", "StreamResult", "Sample", "SampleError", "load"]
