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
        self.closing = True
        self.events.append("close")

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
