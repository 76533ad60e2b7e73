"""The HTTP protocol uvicorn serves the API with: its httptools protocol, with the one response
uvicorn writes itself given the API's error shape, and each response sent in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.schemas import ErrorBody, ErrorResponse, encoder

_NOT_HTTP = encoder.encode(
    ErrorResponse(ErrorBody(code="bad_request", message="The request is not valid HTTP/1.1", details=None))
)


class _OneWrite:
    """A connection's transport whose writes in one turn of the event loop go out as one.

    uvicorn writes a response's status line and headers, then its body: two system calls, two
    TCP segments, and a client woken twice. Both are written in the same turn of the loop (no
    await between them yields), so holding writes until the end of the turn joins them.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():  # closed by the client meanwhile: nobody to send to
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class JsonErrorsProtocol(HttpToolsProtocol):
    """A request the HTTP parser refuses (a Content-Length of -1, two of them, a bad method or
    header) never reaches the app: uvicorn answers it with a plain-text 400 of its own. This
    answers it as every other error is answered, in JSON (`bad_request`), and closes the
    connection, as uvicorn does."""

    def send_400_response(self, msg: str) -> None:
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(_NOT_HTTP),
                b"connection: close\r\n",
                b"\r\n",
                _NOT_HTTP,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWrite(transport, self.loop))  # type: ignore[arg-type]
