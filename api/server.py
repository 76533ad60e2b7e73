"""The HTTP protocol uvicorn serves the API with: its httptools protocol, with the one response
uvicorn writes itself given the API's error shape, and each response sent in one write."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
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
    """uvicorn's httptools protocol, with four changes.

    A request the HTTP parser refuses (a Content-Length of -1, two of them, a bad method or
    header) never reaches the app: uvicorn answers it with a plain-text 400 of its own. This
    answers it as every other error is answered, in JSON (`bad_request`), and closes the
    connection, as uvicorn does; but only once the requests before it on the connection
    (pipelined) are answered. uvicorn answered at once and closed, and their answers were lost,
    though their commands ran: a client sent a booking and a bad request together, got only the
    400, and the loan was booked.

    A request with an `Upgrade` header other than to a WebSocket (`curl --http2` asks for h2c) is
    served as HTTP/1.1, the header ignored (RFC 9110, 7.8). uvicorn's parser stopped at the
    header: the app read an empty body (a valid booking answered "malformed_json"), and every
    later request on the connection went unanswered.

    A chunked body's trailer fields are dropped, not added to the request's headers."""

    _refused = False  # the parser refused a request: nothing after it is read
    _priming = False  # a new parser is being told the framing of the request it resumes

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but for an Upgrade request, which is served as HTTP/1.1."""
        if self._refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as stopped:
            if self._should_upgrade():  # a WebSocket, were a WebSocket library installed (none is)
                self.handle_websocket_upgrade()
            else:
                self._parse_after_upgrade(data[stopped.args[0] :])

    def _parse_after_upgrade(self, rest: bytes) -> None:
        """Parse `rest` as the body of the request whose Upgrade header stopped the parser, then
        as the requests after it. The parser, stopped for good, is replaced by one told the
        request's framing (its Content-Length or Transfer-Encoding) first, its callbacks for the
        framing's own request line and headers skipped; the request's task has not run yet."""
        framing = [
            b"%s: %s\r\n" % (name, value) for name, value in self.headers if name in (b"content-length", b"transfer-encoding")
        ]
        self.cycle.body, self.cycle.more_body = bytearray(), True  # the stopped parser ended the message at its headers
        self.parser = httptools.HttpRequestParser(self)
        self._priming = True
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + b"".join(framing) + b"\r\n")
        except httptools.HttpParserError:  # framing the first parser took and this one does not
            self._priming = False
            self.send_400_response("Invalid HTTP request received.")
            return
        finally:
            self._priming = False
        self.data_received(rest)

    _in_body = False  # past the request's headers: what the parser reports as a header is a trailer

    def on_message_begin(self) -> None:
        if not self._priming:
            self._in_body = False
            super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._priming:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # A chunked body's trailer fields are not headers (RFC 9110, 6.5.1): uvicorn appended them
        # to the request's, and an Idempotency-Key sent only in a trailer was taken as the key.
        if not self._priming and not self._in_body:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self._priming:
            super().on_headers_complete()
            self._in_body = True

    def send_400_response(self, msg: str) -> None:
        if self._answering():
            # Answered in on_response_complete, once the requests before it are.
            self._refused = True
            self.flow.pause_reading()
            return
        self._refused = True
        self._write_400()

    def _answering(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._refused or self.transport.is_closing():
            return
        if self._answering():
            self.flow.pause_reading()  # uvicorn resumed it for the next pipelined request
        else:
            self._unset_keepalive_if_required()
            self._write_400()

    def _write_400(self) -> None:
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
