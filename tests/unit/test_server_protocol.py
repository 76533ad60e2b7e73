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


async def answer(*body: bytes) -> Any:
    """An app answering with `body` in parts, yielding to the event loop between them."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        size = sum(map(len, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
        for i, part in enumerate(body):
            if i:
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": part, "more_body": i < len(body) - 1})

    return app


async def served(app: Any, request: bytes, *, client_leaves: bool = False) -> Socket:
    config = Config(app=app, lifespan="off", access_log=False)
    config.load()
    socket = Socket()
    protocol = JsonErrorsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(socket)
    protocol.data_received(request)
    if client_leaves:
        socket.closing = True  # as a transport whose peer has gone says, before the turn ends
    for _ in range(50):
        await asyncio.sleep(0.001)
    protocol.connection_lost(None)
    return socket


def test_a_response_leaves_in_one_write() -> None:
    async def run() -> Socket:
        return await served(await answer(b'{"loan_id": 1}'), GET)

    socket = asyncio.run(run())
    assert len(socket.writes) == 1, socket.writes
    assert socket.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert socket.writes[0].endswith(b"content-length: 14\r\n\r\n" + b'{"loan_id": 1}')


def test_parts_of_a_body_sent_in_later_turns_follow_as_they_come_in_order() -> None:
    async def run() -> Socket:
        return await served(await answer(b"first,", b"second,", b"third"), GET)

    socket = asyncio.run(run())
    assert len(socket.writes) == 3
    assert socket.writes[0].startswith(b"HTTP/1.1 200 OK") and socket.writes[0].endswith(b"\r\n\r\nfirst,")
    assert socket.writes[1:] == [b"second,", b"third"]


def test_a_head_answer_has_its_headers_written() -> None:
    async def run() -> Socket:
        return await served(await answer(b""), b"HEAD / HTTP/1.1\r\nhost: ledger\r\n\r\n")

    socket = asyncio.run(run())
    assert len(socket.writes) == 1 and socket.writes[0].startswith(b"HTTP/1.1 200 OK") and socket.writes[0].endswith(b"\r\n\r\n")


def test_an_answer_that_closes_the_connection_is_written_before_the_close() -> None:
    async def run() -> Socket:
        return await served(await answer(b"never"), b"NOT HTTP AT ALL\r\n\r\n")

    socket = asyncio.run(run())
    assert socket.events[:2] == ["write", "close"] and "write" not in socket.events[1:]
    assert socket.writes[0].startswith(b"HTTP/1.1 400 Bad Request") and b'"code":"bad_request"' in socket.writes[0]


def test_nothing_is_written_to_a_client_that_left_before_the_turn_ended() -> None:
    async def run() -> Socket:
        return await served(await answer(b"unsent"), GET, client_leaves=True)

    assert asyncio.run(run()).writes == []
