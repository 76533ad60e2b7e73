"""The API's HTTP protocol (api.server) on uvicorn's httptools protocol, fed bytes as a socket
would feed them: a response leaves in one write, status line, headers and body together, and
nothing written is lost, reordered or sent to a client that has gone."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from api.server import JsonErrorsProtocol

GET = b"GET / HTTP/1.1\r\nhost: ledger\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nhost: ledger\r\n\r\n"


class Socket(asyncio.Transport):
    """What the protocol writes, one entry a write, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        if not self.closing:  # as a transport's, a second close does nothing
            self.events.append("close")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def answer(*body: bytes, socket: Socket) -> Any:
    """An app answering with `body` in parts, yielding to the event loop between them, then
    going on in the same turn (as the API's access log and metrics do)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        size = sum(map(len, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        for i, part in enumerate(body):
            if i:
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": part, "more_body": i < len(body) - 1})
        socket.events.append("app went on")

    return app


async def served(body: tuple[bytes, ...], request: bytes, *, client_leaves: bool = False) -> Socket:
    socket = Socket()
    config = Config(app=await answer(*body, socket=socket), lifespan="off", access_log=False)
    config.load()
    protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(socket)
    protocol.data_received(request)
    if client_leaves:
        socket.closing = True  # as a transport whose peer has gone says, before the turn ends
    for _ in range(50):
        await asyncio.sleep(0.001)
    socket.events.append("lost")
    protocol.connection_lost(None)  # which closes the transport
    return socket


def test_a_response_leaves_in_one_write_as_its_body_is_written() -> None:
    socket = asyncio.run(served((b'{"loan_id": 1}',), GET))
    assert len(socket.writes) == 1, socket.writes
    assert socket.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert socket.writes[0].endswith(b"content-length: 14\r\n\r\n" + b'{"loan_id": 1}')
    assert socket.events == ["write", "app went on", "lost", "close"]  # not held until the app's turn ends


def test_parts_of_a_body_sent_in_later_turns_follow_as_they_come_in_order() -> None:
    socket = asyncio.run(served((b"first,", b"second,", b"third"), GET))
    assert len(socket.writes) == 3
    assert socket.writes[0].startswith(b"HTTP/1.1 200 OK") and socket.writes[0].endswith(b"\r\n\r\nfirst,")
    assert socket.writes[1:] == [b"second,", b"third"]


def test_a_head_answer_has_its_headers_written_at_the_end_of_the_turn() -> None:
    socket = asyncio.run(served((b"",), HEAD))
    assert len(socket.writes) == 1 and socket.writes[0].startswith(b"HTTP/1.1 200 OK") and socket.writes[0].endswith(b"\r\n\r\n")
    assert socket.events == ["app went on", "write", "lost", "close"]


def test_an_answer_that_closes_the_connection_is_written_before_the_close() -> None:
    socket = asyncio.run(served((b"never",), b"NOT HTTP AT ALL\r\n\r\n"))
    assert socket.events[:2] == ["write", "close"] and "write" not in socket.events[1:]
    assert socket.writes[0].startswith(b"HTTP/1.1 400 Bad Request") and b'"code":"bad_request"' in socket.writes[0]


def test_nothing_held_is_written_to_a_client_that_left_before_the_turn_ended() -> None:
    assert asyncio.run(served((b"",), HEAD, client_leaves=True)).writes == []


def post(body: bytes, *headers: bytes) -> bytes:
    return (
        b"POST /create-loan HTTP/1.1\r\nhost: ledger\r\n" + b"".join(headers) + b"content-length: %d\r\n\r\n" % len(body) + body
    )


async def served_by_echo(request: bytes, turns: int = 50) -> tuple[Socket, list[bytes]]:
    """An app that takes a few turns of the event loop, then answers with the body it read."""
    socket, bodies = Socket(), []

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        bodies.append(body)
        for _ in range(5):
            await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    config = Config(app=echo, lifespan="off", access_log=False)
    config.load()
    protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(socket)
    protocol.data_received(request)
    for _ in range(turns):
        await asyncio.sleep(0.001)
    return socket, bodies


def test_a_request_the_parser_refuses_is_answered_after_the_requests_before_it_on_the_connection() -> None:
    """A booking and a malformed request sent together: uvicorn answered the second at once and
    closed, so the booking's 201 was lost though the loan was booked (a review)."""
    booking = b'{"customer_id": 301}'
    socket, bodies = asyncio.run(served_by_echo(post(booking) + post(b"{}") + b"FOO / HTTP/1.1\r\n\r\n"))
    assert bodies == [booking, b"{}"]
    answers = b"".join(socket.writes)
    assert answers.count(b"HTTP/1.1 ") == 3, answers
    first, second, third = answers.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and first.endswith(booking)
    assert second.startswith(b"200 OK") and second.endswith(b"{}")
    assert third.startswith(b"400 Bad Request") and b'"code":"bad_request"' in third
    assert socket.events[-1] == "close"


def test_a_request_with_an_upgrade_header_is_served_as_http_1_1_body_and_what_follows_included() -> None:
    """`curl --http2` sends `Upgrade: h2c`: the parser stopped at the headers, the app read an
    empty body ("malformed_json" for a valid booking), and the requests after it went unanswered."""
    booking = b'{"customer_id": 301}'
    h2c = (b"connection: Upgrade, HTTP2-Settings\r\n", b"upgrade: h2c\r\n", b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n")
    chunked = b"POST / HTTP/1.1\r\nhost: ledger\r\nconnection: upgrade\r\nupgrade: foo\r\ntransfer-encoding: chunked\r\n\r\n"
    chunked += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    socket, bodies = asyncio.run(served_by_echo(post(booking, *h2c) + chunked + post(b"after")))
    assert bodies == [booking, b"abcde", b"after"]
    answers = b"".join(socket.writes)
    assert answers.count(b"HTTP/1.1 200 OK") == 3, answers
    assert b"HTTP/1.1 101" not in answers and "close" not in socket.events


def test_a_chunked_body_s_trailer_fields_are_not_taken_for_headers() -> None:
    """uvicorn appended trailer fields to the request's headers: an Idempotency-Key sent only in a
    trailer was taken as the request's key (a review)."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        seen.append(list(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> None:
        config = Config(app=app, lifespan="off", access_log=False)
        config.load()
        protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(Socket())
        protocol.data_received(
            b"POST / HTTP/1.1\r\nhost: ledger\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nidempotency-key: trailer\r\n\r\n"
            + GET
        )
        for _ in range(20):
            await asyncio.sleep(0.001)

    asyncio.run(run())
    assert seen == [[(b"host", b"ledger"), (b"transfer-encoding", b"chunked")], [(b"host", b"ledger")]]


def protocol_on(socket: Socket, app: Any) -> JsonErrorsProtocol:
    """The protocol serving `app`, connected to `socket`."""
    config = Config(app=app, lifespan="off", access_log=False)
    config.load()
    protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(socket)
    return protocol


async def fed(*chunks: bytes, turns: int = 20, app: Any = None, gap: float = 0.001) -> Socket:
    """The protocol, with `app` (default: one that answers 200 at once), fed `chunks` `gap` seconds apart."""
    socket = Socket()
    protocol = protocol_on(socket, app or await answer(b"", socket=socket))
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(gap)
    for _ in range(turns):
        await asyncio.sleep(0.001)
    protocol.connection_lost(None)
    return socket


def test_a_request_head_over_the_limit_is_refused_with_431_before_it_is_whole() -> None:
    """A 200 MiB header was taken whole, and the API process grew by 320 MB (a review)."""
    from api.server import HEAD_BYTES

    part = b"a" * (16 << 10)
    chunks = [b"GET / HTTP/1.1\r\nhost: ledger\r\nx-big: "] + [part] * (HEAD_BYTES // len(part) + 2) + [part, b"\r\n\r\n"]
    socket = asyncio.run(fed(*chunks))
    assert len(socket.writes) == 1 and socket.writes[0].startswith(b"HTTP/1.1 431 ")
    assert b'"code":"headers_too_large"' in socket.writes[0]
    assert socket.events[:2] == ["write", "close"]


def test_a_head_that_follows_a_large_body_in_the_same_read_is_not_counted_with_it() -> None:
    body = b"x" * (300 << 10)
    pipelined = b"POST / HTTP/1.1\r\nhost: ledger\r\ncontent-length: %d\r\n\r\n" % len(body) + body + b"GET / HTTP/1.1\r\nhost: "
    socket = asyncio.run(fed(pipelined, b"ledger\r\n\r\n"))
    assert [w[:15] for w in socket.writes] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]


def test_a_connection_with_no_whole_request_in_time_gets_a_408_and_is_closed(monkeypatch: Any) -> None:
    """An idle new connection, half a request line or half a body held a connection for good."""
    import api.server

    monkeypatch.setattr(api.server, "REQUEST_SECONDS", 0.005)
    for partial in ((), (b"GET / HTTP/1.1\r\nhost: led",)):
        socket = asyncio.run(fed(*partial, turns=30))
        assert socket.writes and socket.writes[0].startswith(b"HTTP/1.1 408 "), (partial, socket.writes)
        assert b'"code":"request_timeout"' in socket.writes[0] and "close" in socket.events
    # Half a body, which the app waits for.
    socket, bodies = asyncio.run(served_by_echo(b"POST / HTTP/1.1\r\nhost: ledger\r\ncontent-length: 10\r\n\r\n{", turns=30))
    assert bodies == [] and socket.writes[0].startswith(b"HTTP/1.1 408 ")
    assert socket.events[:2] == ["write", "close"]  # (this fake transport takes writes after its close; a real one drops them)
    # A whole request is the app's to answer, however long that takes.
    socket = asyncio.run(fed(GET, turns=30))
    assert [w[:15] for w in socket.writes] == [b"HTTP/1.1 200 OK"]


class Connection:
    """The protocol on a fake socket, with an app that reads the body, waits `?wait=` seconds and
    answers with the body; fed by the test, bytes at a time."""

    def __init__(self) -> None:
        self.socket, self.bodies = Socket(), []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body, more = body + message.get("body", b""), message.get("more_body", False)
            self.bodies.append(body)
            query = scope["query_string"].decode()
            await asyncio.sleep(float(query.removeprefix("wait=")) if query.startswith("wait=") else 0)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        config = Config(app=app, lifespan="off", access_log=False)
        config.load()
        self.protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
        self.protocol.connection_made(self.socket)

    async def send(self, data: bytes, then: float = 0.0) -> None:
        if not self.socket.closing:
            self.protocol.data_received(data)
        await asyncio.sleep(then)
        if self.socket.closing and "lost" not in self.socket.events:  # as a real transport reports its close
            self.socket.events.append("lost")
            self.protocol.connection_lost(None)

    def statuses(self) -> list[bytes]:
        return [part[:3] for part in b"".join(self.socket.writes).split(b"HTTP/1.1 ")[1:]]


def test_a_request_refused_in_its_body_is_answered_after_the_request_before_it() -> None:
    """The refusal waited for the answers before it only when the parser refused a request line or
    a header: a bad chunk, a Transfer-Encoding not ending in chunked, or a URL the parser took and
    uvicorn did not, behind a booking, lost the booking's answer (a review)."""
    for bad in (
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        b"GET http://a:99999999/ HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\ntransfer-encoding: gzip\r\n\r\n",
    ):

        async def run(bad: bytes = bad) -> Connection:
            connection = Connection()
            await connection.send(post(b'{"customer_id": 301}').replace(b"/create-loan", b"/create-loan?wait=0.02") + bad, 0.06)
            return connection

        connection = asyncio.run(run())
        assert connection.bodies == [b'{"customer_id": 301}'], bad
        assert connection.statuses() == [b"200", b"400"], (bad, connection.socket.writes)
        assert connection.socket.closing and "close" in connection.socket.events


def test_a_pipelined_request_waiting_for_its_turn_is_not_timed_out(monkeypatch: Any) -> None:
    """While this side does not read (the request before it is being answered), the client is not
    slow: its request got a 408 and the answer before it was lost (a review)."""
    import api.server

    monkeypatch.setattr(api.server, "REQUEST_SECONDS", 0.01)

    async def run() -> Connection:
        connection = Connection()
        slow = b"POST /a?wait=0.08 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\none"
        await connection.send(slow + b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n", 0.04)  # 4 x REQUEST_SECONDS
        await connection.send(b"two", 0.15)
        return connection

    connection = asyncio.run(run())
    assert connection.bodies == [b"one", b"two"] and connection.statuses() == [b"200", b"200"]


def test_a_trailer_field_without_end_is_refused_as_a_header_would_be() -> None:
    """httptools keeps a trailer field it has not seen the end of: an endless one grew the process
    by 100 MB and held the event loop for seconds (a review)."""
    from api.server import FRAMING_BYTES

    async def run() -> Connection:
        connection = Connection()
        await connection.send(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: ")
        for _ in range(FRAMING_BYTES // (64 << 10) + 2):
            await connection.send(b"a" * (64 << 10))
        await asyncio.sleep(0.01)
        return connection

    connection = asyncio.run(run())
    assert connection.statuses() == [b"431"] and b'"code":"headers_too_large"' in connection.socket.writes[0]


def test_six_hundred_pipelined_requests_with_an_upgrade_header_are_all_answered() -> None:
    """Each resumed the parse by calling the parse again: 600 in one read overflowed the stack and
    the connection was aborted with none answered (a review)."""
    request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"

    async def run() -> Connection:
        connection = Connection()
        await connection.send(request * 600)
        for _ in range(200):
            if len(connection.statuses()) == 600:
                break
            await asyncio.sleep(0.01)
        return connection

    assert asyncio.run(run()).statuses() == [b"200"] * 600


class HalfClosingSocket(Socket):
    """A socket that can send its FIN (write_eof) before it closes, as a TCP one can, and that
    refuses writes after it, as uvloop's and asyncio's do."""

    def write_eof(self) -> None:
        self.events.append("eof")

    def write(self, data: Any) -> None:
        if "eof" in self.events:
            raise RuntimeError("Cannot call write() after write_eof()")
        super().write(data)


async def closing(
    *chunks: bytes, client_closes: bool = False, wait: float = 0.0, gap: float = 0.01, then: float = 0.1, stop: bool = False
) -> HalfClosingSocket:
    """The protocol on a half-closing socket, with an app that answers `connection: close`
    without reading the body (after `wait` seconds), fed `chunks` `gap` seconds apart, then left
    for `then` seconds (the server stopping first, with `stop`)."""
    socket = HalfClosingSocket()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(wait)
        await send({"type": "http.response.start", "status": 413, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b""})
        socket.events.append("app done")

    protocol = protocol_on(socket, app)
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(gap)
    if client_closes:  # its FIN: the transport closes itself (the protocol's eof_received says nothing)
        socket.close()
        socket.events.append("lost")
        protocol.connection_lost(None)
    if stop:
        socket.events.append("stop")
        protocol.shutdown()
    await asyncio.sleep(then)
    return socket


def test_a_connection_closed_while_its_client_may_still_send_lingers_then_closes(monkeypatch: Any) -> None:
    """Closed with the client's data unread, a TCP connection is reset, and the client's TCP may
    drop the answer it has not read yet: a client sending a large body read a reset, not the 413."""
    import api.server

    monkeypatch.setattr(api.server, "LINGER_SECONDS", 0.05)
    head = b"POST / HTTP/1.1\r\nhost: ledger\r\ncontent-length: 100000\r\n\r\n"
    # Answered before its body came: the answer, a FIN, what the client still sends dropped, then the close.
    socket = asyncio.run(closing(head + b"x" * 10, b"y" * 1000, b"GET / HTTP/1.1\r\nhost: ledger\r\n\r\n"))
    assert [w[:12] for w in socket.writes] == [b"HTTP/1.1 413"]
    assert socket.events == ["write", "eof", "app done", "close"]
    # A request the parser refuses, with more to come after it, the same way.
    socket = asyncio.run(closing(b"NOT HTTP AT ALL\r\n", b"more of it\r\n"))
    assert [w[:12] for w in socket.writes] == [b"HTTP/1.1 400"] and socket.events == ["write", "eof", "close"]
    # The client closing its side ends the lingering, and its timer with it.
    socket = asyncio.run(closing(head, client_closes=True))
    assert socket.events == ["write", "eof", "app done", "close", "lost"]
    # A request read whole and answered with a close is closed at once: nothing more is coming.
    socket = asyncio.run(closing(b"GET / HTTP/1.1\r\nhost: ledger\r\n\r\n"))
    assert socket.events == ["write", "close", "app done"]


def test_a_lingering_connection_drops_what_the_app_still_writes_and_times_out_on_the_client_s_silence(
    monkeypatch: Any,
) -> None:
    """A bad chunk refused while its request's app ran: the app's answer, written after the FIN,
    raised "Cannot call write() after write_eof()" in the server's log (a review). And lingering
    lasted LINGER_SECONDS in all: a client still sending a large body slowly was reset."""
    import api.server

    monkeypatch.setattr(api.server, "LINGER_SECONDS", 0.05)
    monkeypatch.setattr(api.server, "LINGER_MOST_SECONDS", 0.3)
    bad_chunk = b"GET /x HTTP/1.1\r\nhost: ledger\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
    socket = asyncio.run(closing(bad_chunk, wait=0.02))
    assert [w[:12] for w in socket.writes] == [b"HTTP/1.1 400"]
    assert socket.events == ["write", "eof", "app done", "close"]  # the app's 413 went nowhere, quietly
    # Sending every 30 ms (under LINGER_SECONDS apart) keeps it open past LINGER_SECONDS, up to LINGER_MOST_SECONDS.
    head = b"POST / HTTP/1.1\r\nhost: ledger\r\ncontent-length: 100000\r\n\r\n"
    socket = asyncio.run(closing(head, *[b"x" * 100] * 5, gap=0.03, then=0.0))
    assert socket.events == ["write", "eof", "app done"]  # 150 ms on, three times LINGER_SECONDS
    socket = asyncio.run(closing(head, *[b"x" * 100] * 12, gap=0.03, then=0.05))
    assert socket.events == ["write", "eof", "app done", "close"]  # closed at LINGER_MOST_SECONDS, still sending


def test_a_server_that_stops_does_not_wait_for_lingering_connections(monkeypatch: Any) -> None:
    """uvicorn waits for its connections to close as it stops: one half a head in, or lingering,
    held a restart up for LINGER_SECONDS (a review)."""
    import api.server

    monkeypatch.setattr(api.server, "LINGER_SECONDS", 10.0)
    socket = asyncio.run(closing(b"GET / HTTP/1.1\r\nhost: led", stop=True, then=0.01))
    assert socket.events == ["stop", "close"]
    socket = asyncio.run(closing(b"NOT HTTP AT ALL\r\n", stop=True, then=0.01))
    assert socket.events == ["write", "eof", "stop", "close"]


def test_a_refused_request_has_its_access_line_metrics_and_request_id(monkeypatch: Any, caplog: Any) -> None:
    """A 400, 431 or 408 written by the protocol had no access line and no metric, and its answer
    no X-Request-ID; a 408 while the app waited for the body was logged as a 499 (a review)."""
    import logging

    from prometheus_client import REGISTRY

    import api.server
    from api.observability import RequestObserver

    def counted(method: str, status: str) -> float:
        labels = {"method": method, "route": "unmatched", "status": status}
        return REGISTRY.get_sample_value("ledger_http_requests_total", labels) or 0.0

    before = {key: counted(*key) for key in (("GET", "400"), ("GET", "431"), ("UNPARSED", "408"))}
    with caplog.at_level(logging.INFO, logger="ledger.access"):
        bad_header = asyncio.run(fed(b"GET /view-loan/7 HTTP/1.1\r\nx-request-id: trace-9\r\ncontent-length: -1\r\n\r\n"))
        part = b"a" * (16 << 10)
        too_large = asyncio.run(fed(b"GET /x HTTP/1.1\r\nhost: ledger\r\nx-big: ", *[part] * ((64 << 10) // len(part) + 2)))
        monkeypatch.setattr(api.server, "REQUEST_SECONDS", 0.005)
        idle = asyncio.run(fed(turns=30))
    lines = [(r.method, r.path, r.status, r.request_id) for r in caplog.records if r.name == "ledger.access"]
    assert lines[0] == ("GET", "/view-loan/7", 400, "trace-9") and b"\r\nx-request-id: trace-9\r\n" in bad_header.writes[0]
    assert lines[1][:3] == ("GET", "/x", 431) and b"\r\nx-request-id: %s\r\n" % lines[1][3].encode() in too_large.writes[0]
    assert lines[2][:3] == ("UNPARSED", None, 408) and idle.writes[0].startswith(b"HTTP/1.1 408 ")
    assert len(lines) == 3
    assert {key: counted(*key) - value for key, value in before.items()} == {
        ("GET", "400"): 1.0,
        ("GET", "431"): 1.0,
        ("UNPARSED", "408"): 1.0,
    }

    # The review of the above: a refusal's line held the raw URL (its query's tokens, up to 64 KiB
    # of it), the parser's default method (DELETE) for a request line that never came, a duration
    # of 0 for a connection that waited the whole timeout; and a refusal after the app had
    # answered (a bad chunk after a 200) had no line.
    caplog.clear()
    monkeypatch.setattr(api.server, "REQUEST_SECONDS", 0.01)
    with caplog.at_level(logging.INFO, logger="ledger.access"):
        asyncio.run(fed(b"GET /x" + b"y" * 300 + b"?access_token=SECRET HTTP/1.1\r\nhost: ledger\r\ncontent-length: -1\r\n\r\n"))
        asyncio.run(fed(b"\x00garbage\r\n\r\n"))
        asyncio.run(fed(turns=40))
        asyncio.run(fed(b"POST /x HTTP/1.1\r\nhost: ledger\r\ntransfer-encoding: chunked\r\n\r\n", b"zz\r\n"))
    records = [r for r in caplog.records if r.name == "ledger.access"]
    assert (records[0].method, records[0].path, records[0].status) == ("GET", "/x" + "y" * 198 + "...", 400)
    assert "SECRET" not in caplog.text
    assert (records[1].method, records[1].path, records[1].status) == ("UNPARSED", None, 400)
    assert (records[2].method, records[2].status) == ("UNPARSED", 408) and records[2].duration_ms >= 10
    assert [(r.method, r.path, r.status) for r in records[3:]] == [("POST", "/x", 400)]  # the app's 200 is not observed here

    # A body that stops coming while its app waits for it: the app's access line says 408, once.
    async def reads_the_body(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass

    async def stalled() -> Socket:
        socket = Socket()
        config = Config(app=RequestObserver(reads_the_body), lifespan="off", access_log=False)
        config.load()
        protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(socket)
        protocol.data_received(b"POST /register HTTP/1.1\r\nhost: ledger\r\ncontent-length: 10\r\n\r\n{")
        for _ in range(30):
            await asyncio.sleep(0.001)
        protocol.connection_lost(None)
        await asyncio.sleep(0.01)
        return socket

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ledger.access"):
        socket = asyncio.run(stalled())
    assert socket.writes[0].startswith(b"HTTP/1.1 408 ")
    assert [(r.method, r.path, r.status) for r in caplog.records if r.name == "ledger.access"] == [("POST", "/register", 408)]


def test_a_refusal_s_access_line_names_the_request_as_the_app_s_line_would(caplog: Any) -> None:
    """A review of the refusals' lines: an absolute-form target's credentials were logged, a
    PROPFIND was logged as "OTHER", and a bad chunk after the app's 404 got a line with another ID."""
    import logging

    from api.observability import RequestObserver

    async def not_found(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def observed(*chunks: bytes) -> Any:
        return fed(*chunks, turns=0, app=RequestObserver(not_found), gap=0.01)

    with caplog.at_level(logging.INFO, logger="ledger.access"):
        asyncio.run(observed(b"GET http://user:pw@host/se%63ret?token=x HTTP/1.1\r\nhost: h\r\ncontent-length: -1\r\n\r\n"))
        asyncio.run(observed(b"PROPFIND /dav HTTP/1.1\r\nhost: h\r\ncontent-length: -1\r\n\r\n"))
        chunked = asyncio.run(observed(b"POST /nope HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n", b"zz\r\n"))
    records = [r for r in caplog.records if r.name == "ledger.access"]
    assert [(r.method, r.path, r.status) for r in records] == [
        ("GET", "/secret", 400),
        ("PROPFIND", "/dav", 400),
        ("POST", "/nope", 404),
        ("POST", "/nope", 400),
    ]
    assert "pw" not in caplog.text and "token" not in caplog.text
    assert records[2].request_id == records[3].request_id
    assert b"x-request-id: %s\r\n" % records[3].request_id.encode() in chunked.writes[-1]
