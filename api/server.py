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
    """A connection's transport that sends a write with the one after it, if that comes in the
    same turn of the event loop.

    uvicorn writes a response's status line and headers, then its body: two system calls, two
    TCP segments, and a client woken twice. Both are written in the same turn (no await between
    them yields), so the headers are held until the body's write, which sends both at once,
    before anything else the turn does. A write with none after it in its turn (a HEAD answer's
    headers, the last part of a body sent in parts) goes at the end of the turn.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held, self._held = self._held, None
        if held is None:
            self._held = bytes(data)  # a copy of a buffer the caller may reuse
            self._loop.call_soon(self._flush)
        else:
            self._transport.writelines((held, data))  # one writev

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():  # closed by the client meanwhile: nobody to send to
            self._transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the transport's (and, in a copy with no slots set, no recursion)
            raise AttributeError(name)
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
