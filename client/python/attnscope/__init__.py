"""attnscope: a notebook client for the attnscope attention service."""
from pkgutil import extend_path

# The generated stubs (attnscope.v1) may live in another directory on sys.path (the build tree).
__path__ = extend_path(__path__, __name__)

from .client import Client, StreamResult  # noqa: E402

__all__ = ["Client", "StreamResult"]
