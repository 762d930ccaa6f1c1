"""What a failed call raises: ServerError, the server's answer (its gRPC status code and message)
and the call it answered, instead of gRPC's raw call objects."""
import grpc


class ServerError(grpc.RpcError):
    """The server (or the channel to it) refused or ended a call. `code` is the grpc.StatusCode
    (`status` its name, e.g. "INVALID_ARGUMENT"), `message` the server's words, `method` the RPC,
    `request_id` the id the server gave a stream (None before its header arrived), `input_index`
    which input of a stream_many it was (else None). `code()` and `details()` read as on gRPC's own
    errors, so `except grpc.RpcError` still catches it."""

    def __init__(self, code, message, method=None, request_id=None, input_index=None):
        super().__init__()
        self._code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
        self.message = message or ""
        self.method = method
        self.request_id = request_id or None
        self.input_index = input_index

    def code(self):
        return self._code

    def details(self):
        return self.message

    @property
    def status(self):
        return self._code.name

    def __str__(self):
        where = [w for w in (self.method, self.request_id and f"request {self.request_id}",
                             self.input_index is not None and f"input {self.input_index}") if w]
        return f"{self.status}: {self.message}" + (f" ({', '.join(where)})" if where else "")

    def __repr__(self):
        return f"ServerError({self.status}, {self.message!r}, method={self.method!r}, request_id={self.request_id!r})"

    def __reduce__(self):  # picklable, for multiprocessing and notebooks' stored results
        return (ServerError, (self._code, self.message, self.method, self.request_id, self.input_index))


def server_error(error, method, request_id=None):
    """gRPC's error object (a call of the blocking or the asyncio API) as a ServerError."""
    if isinstance(error, ServerError):
        return error
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return ServerError(code, details, method=method, request_id=request_id)
