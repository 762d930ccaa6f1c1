"""attnscope: a notebook client for the attnscope attention service."""
from pkgutil import extend_path

# The generated stubs (attnscope.v1) may live in another directory on sys.path (the build tree).
__path__ = extend_path(__path__, __name__)

from .sample import Sample, SampleError, load  # noqa: E402

try:  # the gRPC client needs the generated stubs (built with the project)
    from .client import AsyncClient, Client, StreamResult  # noqa: E402
except ImportError:  # loading and viewing stored samples works without them
    pass

__all__ = ["AsyncClient", "Client", "StreamResult", "Sample", "SampleError", "load"]
