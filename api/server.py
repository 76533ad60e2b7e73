"""The HTTP protocol uvicorn serves the API with: its httptools protocol, with the one response
uvicorn writes itself given the API's error shape, and each response sent in one write."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.observability import REFUSED, REQUEST_ID, REQUEST_ID_KEY, observe, request_id
from api.schemas import ErrorBody, ErrorResponse, encoder

HEAD_BYTES = 64 << 10  # a request's line and headers, at most (nginx's default allows 32 KiB)
FRAMING_BYTES = 1 << 20  # a chunked body's chunk sizes and trailer fields, at most
REQUEST_SECONDS = 60.0  # for a request's line and headers; between two reads of its body
LINGER_SECONDS = 5.0  # a closed connection reads, and drops, what its client still sends, until it pauses so long
LINGER_MOST_SECONDS = 30.0  # or for so long in all (nginx's lingering_timeout and lingering_time)


class _OneWrite:
    """A connection's transport that sends a write with the one after it, if that comes in the
    same turn of the event loop.

    uvicorn writes a response's status line and headers, then its body: two system calls, two
    TCP segments, and a client woken twice. Both are written in the same turn (no await between
    them yields), so the headers are held until the body's write, which sends both at once,
    before anything else the turn does. A write with none after it in its turn (a HEAD answer's
    headers, the last part of a body sent in parts) goes at the end of the turn.

    Closed while its client may still be sending (a request refused before its body was read,
    a 413), the connection lingers (as nginx's does): the answer is followed by a FIN, and what
    the client sends is read and dropped until it closes its side, pauses LINGER_SECONDS, or
    LINGER_MOST_SECONDS have gone by; what the app still writes is dropped. Closed at once, with
    the client's data unread, the connection was reset (an RST), and a client's TCP may drop an
    answer it has not yet read when the RST arrives.
    """

    __slots__ = ("_held", "_linger_end", "_lingering", "_loop", "_quiet_until", "_transport", "unread")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, unread: Callable[[], bool]) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self._quiet_until = self._linger_end = 0.0
        self.unread = unread  # whether the client may be sending a request not yet read whole

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lingering is not None:
            return  # answered and half-closed: the app of a request refused meanwhile writes to nobody
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
        if held is not None and not self.is_closing():  # closed (or half-closed) meanwhile: nobody to send to
            self._transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def write_eof(self) -> None:
        self._flush()
        if self._lingering is None:
            self._transport.write_eof()

    def close(self) -> None:
        if self._lingering is not None:
            return  # the client's close, its silence or the server's stop ends it (the app's end does not)
        self._flush()
        if not self._transport.is_closing() and self.unread():
            self._linger()
        else:
            self._transport.close()

    def _linger(self) -> None:
        try:
            self._transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):  # a transport that cannot half-close
            self._transport.close()
            return
        now = self._loop.time()
        self._quiet_until, self._linger_end = now + LINGER_SECONDS, now + LINGER_MOST_SECONDS
        self._lingering = self._loop.call_at(self._quiet_until, self._linger_over)
        self._transport.resume_reading()  # its protocol drops what comes; the client's close ends it

    def _linger_over(self) -> None:
        until = min(self._quiet_until, self._linger_end)
        if self._loop.time() < until:  # the client sent more since: one timer, moved on
            self._lingering = self._loop.call_at(until, self._linger_over)
        else:
            self._transport.close()

    def lingering(self) -> bool:
        return self._lingering is not None

    def dropped(self) -> None:
        """Data came while lingering: the client is still sending."""
        self._quiet_until = self._loop.time() + LINGER_SECONDS

    def is_closing(self) -> bool:
        return self._lingering is not None or self._transport.is_closing()

    def pause_reading(self) -> None:
        if self._lingering is None:  # else it would stop reading what lingering drops
            self._transport.pause_reading()

    def lost(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()

    def stop_lingering(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
            self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the transport's (and, in a copy with no slots set, no recursion)
            raise AttributeError(name)
        return getattr(self._transport, name)


def _path(url: bytes) -> str:
    """A request target's path, decoded, as the app's access line has it: no query, no scheme,
    host or credentials of an absolute-form target."""
    try:
        path = httptools.parse_url(url).path or b""
    except httptools.HttpParserInvalidURLError:
        return ""
    return unquote(path.decode("latin-1"))


class JsonErrorsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with these changes.

    A request the HTTP parser refuses (a Content-Length of -1, two of them, a bad method, header
    or chunk) never reaches the app: uvicorn answers it with a plain-text 400 of its own. This
    answers it as every other error is answered, in JSON (`bad_request`), and closes the
    connection, as uvicorn does; but only once the requests before it on the connection
    (pipelined) are answered. uvicorn answered at once and closed, and their answers were lost,
    though their commands ran: a client sent a booking and a bad request together, got only the
    400, and the loan was booked.

    A request with an `Upgrade` header other than to a WebSocket (`curl --http2` asks for h2c) is
    served as HTTP/1.1, the header ignored (RFC 9110, 7.8). uvicorn's parser stopped at the
    header: the app read an empty body (a valid booking answered "malformed_json"), and every
    later request on the connection went unanswered.

    A chunked body's trailer fields are dropped, not added to the request's headers.

    Limits: a request's line and headers may take about HEAD_BYTES (431 past them), and a chunked
    body's framing and trailers FRAMING_BYTES (431). A connection must send a request's line and
    headers within REQUEST_SECONDS of its first byte (or of the connection's opening, or of the
    last answer), and its body may pause at most REQUEST_SECONDS between reads (408), except while
    a request before it on the connection is being answered."""

    transport: _OneWrite  # type: ignore[assignment]  # uvicorn's, as connection_made wraps it
    _priming = False  # a new parser is being told the framing of the request it resumes
    _in_body = False  # between a request's headers and its end: a "header" now is a trailer field
    _in_head = False  # a request's line and headers have begun and not ended
    _head_bytes = 0  # what arrived while the head was unfinished (but the read it began in)
    _head_begun = False  # a request's head began in the data being parsed
    _framing_bytes = 0  # what arrived during a body that was not body: chunk sizes, trailers
    _body_fed = 0  # body bytes in the data being parsed
    _own: Any = None  # the cycle of the request being parsed, once it has one
    _running: Any = None  # the cycle whose app runs (uvicorn starts them one at a time)
    _refused: bytes | None = None  # the answer to a request refused here, once those before it are answered
    _timer: asyncio.TimerHandle | None = None
    _stopping = False  # the server is shutting down
    _began = 0.0  # the loop's time the request being received began
    _opened = 0.0  # the loop's time the connection was made
    _deadline = 0.0  # the loop's time by which the request being received must be whole; 0.0: none

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the changes above. A loop, not a recursion, over requests with an
        Upgrade header: 600 of them in one read overflowed the stack (a review)."""
        if self.transport.lingering():
            self.transport.dropped()  # closed: what the client still sends is dropped
            return
        rest: bytes | memoryview | None = data
        while rest is not None and self._refused is None:
            rest = self._parse(rest)

    def _parse(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """Feed `data` to the parser; what is left of it when an Upgrade header stopped the parser."""
        self._unset_keepalive_if_required()
        self._head_begun, self._body_fed = False, 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return None
        except httptools.HttpParserUpgrade as stopped:
            if self._should_upgrade():  # a WebSocket, were a WebSocket library installed (none is)
                self.handle_websocket_upgrade()
                return None
            return self._resume_after_upgrade(memoryview(data)[stopped.args[0] :])
        if self._in_head and not self._head_begun:
            # Counted by what arrived while a request's head was unfinished: httptools keeps a header
            # it has not seen the end of, and a 200 MiB one took 320 MB (a review). The data its head
            # began in is not counted (it may hold the end of the request before it, pipelined): at
            # most one read, 256 KiB, more than HEAD_BYTES is taken.
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_BYTES:
                self._refuse(431, "headers_too_large", f"The request line and headers are larger than {HEAD_BYTES} bytes")
        elif self._in_body:
            # httptools keeps a trailer field it has not seen the end of, as it does a header.
            self._framing_bytes += len(data) - self._body_fed
            if self._framing_bytes > FRAMING_BYTES:
                self._refuse(
                    431, "headers_too_large", f"The body's chunk framing and trailers are larger than {FRAMING_BYTES} bytes"
                )
            else:
                self._arm_timer()  # the body came on: REQUEST_SECONDS more for the next part
        return None

    def _resume_after_upgrade(self, rest: memoryview) -> memoryview | None:
        """Make ready to parse `rest` as the body of the request whose Upgrade header stopped the
        parser, then as the requests after it: the parser, stopped for good, is replaced by one
        told the request's framing (its Content-Length or Transfer-Encoding) first, its callbacks
        for the framing's own request line and headers skipped. The request's task has not run."""
        framing = [
            b"%s: %s\r\n" % (name, value) for name, value in self.headers if name in (b"content-length", b"transfer-encoding")
        ]
        self.cycle.body, self.cycle.more_body = bytearray(), True  # the stopped parser ended the message at its headers
        self._in_body, self._framing_bytes = True, 0  # its body is on its way: trailers are not headers
        self._arm_timer()
        self.parser = httptools.HttpRequestParser(self)
        self._priming = True
        try:
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + b"".join(framing) + b"\r\n")
        except httptools.HttpParserError:  # framing the first parser took and this one does not
            self.send_400_response("Invalid HTTP request received.")
            return None
        finally:
            self._priming = False
        return rest

    # Parser callbacks

    def on_message_begin(self) -> None:
        if not self._priming:
            self._in_body, self._in_head, self._head_bytes, self._head_begun, self._own = False, True, 0, True, None
            self._arm_timer()
            self._began = self._deadline - REQUEST_SECONDS  # the loop's time, for the access line of a refusal
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
            self._in_body, self._in_head, self._framing_bytes = True, False, 0
            super().on_headers_complete()
            self._own = self.cycle

    def on_body(self, body: bytes) -> None:
        self._body_fed += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_timer()  # the request is whole: the app's time is not the client's
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    # Refusals: a request the parser refuses, one too large, one too slow to arrive.

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad_request", "The request is not valid HTTP/1.1")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` in JSON and close the connection, once the requests before this one are
        answered. The refused request's own app, if it runs, is waiting for what will not come: it
        sees the client gone. Queued behind others, it never runs."""
        body = encoder.encode(ErrorResponse(ErrorBody(code=code, message=message, details=None)))
        own = self._own
        request_id = self._account(status, own)
        head = [STATUS_LINE.get(status, b"HTTP/1.1 %d \r\n" % status)]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body)]
        head += [b"x-request-id: %s\r\n" % request_id.encode("latin-1"), b"connection: close\r\n\r\n"]
        self._refused = b"".join(head) + body
        self._cancel_timer()
        if own is not None and any(cycle is own for cycle, _ in self.pipeline):
            self.pipeline = deque(queued for queued in self.pipeline if queued[0] is not own)
        if self._behind_others():
            self.flow.pause_reading()  # written in on_response_complete
            return
        self._write_refusal()

    def _account(self, status: int, own: Any) -> str:
        """The refused request's ID, and its access line and metrics (they had none: a 400, 431 or
        408 was not in the log, and a 408 whose app was waiting for the body was logged as a 499).
        A request whose app runs is accounted for by the app (api.observability), told the status."""
        now = self.loop.time()
        if own is not None:
            given = own.scope.get(REQUEST_ID_KEY, "").encode("latin-1") or dict(own.scope["headers"]).get(REQUEST_ID)
            if self._running is own and not own.response_complete:
                own.scope[REFUSED] = status
                return request_id(given)
            # Its app answered already (a bad chunk after a 404), or never ran.
            return observe(own.scope["method"], own.scope["path"], status, given, now - self._began)
        if self._in_head and self.url:  # the request line's method and URL came (the parser's default method, else)
            method = (self.parser.get_method() or b"").decode("latin-1")
            path, headers, began = _path(self.url), self.headers or [], self._began
        else:
            method, path, headers, began = "", "", [], self._began or self._opened
        if len(path) > 200:  # a 431's may be most of 64 KiB
            path = path[:200] + "..."
        return observe(method, path, status, dict(headers).get(REQUEST_ID), now - began)

    def _answering(self) -> bool:
        """Whether requests are still being answered (queued, or their app running)."""
        return bool(self.pipeline) or (self._running is not None and not self._running.response_complete)

    def _behind_others(self) -> bool:
        """Whether the request being parsed waits for the answers to requests before it."""
        return self._answering() and self._running is not self._own

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refused is None or self.transport.is_closing():
            return
        if self._answering():
            self.flow.pause_reading()  # uvicorn resumed it for the next pipelined request
        else:
            self._unset_keepalive_if_required()
            self._write_refusal()

    def _write_refusal(self) -> None:
        assert self._refused is not None
        self.transport.write(self._refused)
        self.transport.close()

    def _arm_timer(self) -> None:
        """Give the client until REQUEST_SECONDS from now. One timer a connection, moved on when it
        fires early: arming and cancelling one for every request cost 4 µs a request."""
        self._deadline = self.loop.time() + REQUEST_SECONDS
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._too_slow)

    def _cancel_timer(self) -> None:
        self._deadline = 0.0  # the timer, when it fires, finds nothing to time

    def _too_slow(self) -> None:
        """A connection that sent no request since it opened, or a request that has not arrived
        whole, REQUEST_SECONDS on: nothing closed them, and each held a connection for good."""
        self._timer = None
        if self._deadline == 0.0 or self._refused is not None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:  # armed again since: until then
            self._timer = self.loop.call_at(self._deadline, self._too_slow)
            return
        if self._behind_others():
            # A request before this one is still being answered: this one waits its turn (uvicorn
            # reads no more of it meanwhile), and the delay is not the client's.
            self._arm_timer()
            return
        if self._in_body and self._own is not None and self._own.response_complete:
            self.transport.close()  # answered without its body (a 404, say): nothing more to say
            return
        self._refuse(408, "request_timeout", f"The request did not arrive whole within {REQUEST_SECONDS:.0f} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport.lost()
        self._deadline = 0.0
        if self._timer is not None:  # else it would keep this protocol for up to REQUEST_SECONDS
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _reading_a_request(self) -> bool:
        """Whether a request has begun and not been read whole, or was refused before it was: a
        close lingers then, unless the server is stopping (it waits for its connections to close)."""
        return not self._stopping and (self._in_head or self._in_body or self._refused is not None)

    def shutdown(self) -> None:
        self._stopping = True
        self.transport.stop_lingering()
        super().shutdown()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWrite(transport, self.loop, self._reading_a_request))  # type: ignore[arg-type]
        self._arm_timer()  # a connection that never sends a request is closed too
        self._opened = self._deadline - REQUEST_SECONDS
