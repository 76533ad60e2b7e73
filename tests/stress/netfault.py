"""A TCP proxy in front of PostgreSQL that can lose the answer to a commit.

This is the fault of a server that crashes, or a network that breaks, just after a commit: the
transaction is durable but the client never hears so. The proxy passes every byte through and
reads the server's messages as they pass. Once armed, it drops the connection instead of
forwarding the answer `COMMIT` to a transaction that inserted rows, or the answer to a statement
that committed on its own having appended events (the event store's insert function, whose rows
are `appended_notification_id`s: the proxy holds back its CommandComplete until the server says it
committed, then drops the connection; the client has its rows but never the statement's end). `appends` counts the cuts of the event store's appends: an
INSERT returning `notification_id`, or that function (the other cuts are the read model's pages). A cut can also start an outage: every open connection breaks and new ones
are refused until `restore()`, as when PostgreSQL goes down just after a commit."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class CommitAnswerCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self.appends = 0
        self._armed = 0
        self._outage = False  # the next cut starts an outage
        self._appends_only = False  # cut only the event store's appends, not the read model's pages
        self._skip = 0  # commits to let through before the first cut
        self.down = False
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        credentials, _, rest = database_url.rpartition("@")
        return f"{credentials}@127.0.0.1:{self.port}/{rest.split('/', 1)[1]}"

    def arm(self, times: int = 1, *, outage: bool = False, appends_only: bool = False, skip: int = 0) -> None:
        """Lose the answers to the next `times` commits of transactions that inserted rows; with
        `outage`, the cut also breaks every connection and refuses new ones until `restore()`;
        with `appends_only`, only the event store's appends count; `skip` of them pass first."""
        with self._lock:
            self._armed += times
            self._outage = outage
            self._appends_only = appends_only
            self._skip = skip

    def restore(self) -> None:
        self.down = False

    def disarm(self) -> None:
        with self._lock:
            self._armed = 0

    def close(self) -> None:
        """Stop accepting and break every connection still open."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            ends, self._open = list(self._open), set()
        for end in ends:
            _close(end)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)  # PostgreSQL is down: the client sees the connection refused
                continue
            with self._lock:
                refused = self.down  # an outage began while this one connected
                if not refused:
                    self._open.update((client, server))
            if refused:
                _close(client)
                _close(server)
                continue
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    def _take_cut(self, append: bool) -> bool:
        with self._lock:
            if self._armed == 0 or (self._appends_only and not append):
                return False
            if self._skip > 0:
                self._skip -= 1
                return False
            self._armed -= 1
            self.cuts += 1
            self.appends += append
            if self._outage:
                self.down, self._outage = True, False
                ends, self._open = list(self._open), set()
            else:
                ends = []
        for end in ends:
            _close(end)
        return True

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while chunk := client.recv(65536):
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            self._drop(client, server)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        """Forward the server's messages whole, noting what the current transaction did."""
        buffer = b""
        negotiating = True  # before authentication, a lone b"N" refuses SSL or GSS encryption
        inserted = appended = returns_positions = appends_alone = False
        scanned = 0  # the buffer's messages before this were read (and those before `held` forwarded)
        held: int | None = None  # where the answer of an append that commits on its own starts
        try:
            while chunk := server.recv(65536):
                buffer += chunk
                forward = scanned
                while True:
                    if negotiating and buffer[forward : forward + 1] == b"N":
                        forward += 1
                        continue
                    if len(buffer) - forward < 5:
                        break
                    kind = buffer[forward : forward + 1]
                    (length,) = struct.unpack("!i", buffer[forward + 1 : forward + 5])
                    end = forward + 1 + length
                    if len(buffer) < end:
                        break
                    body = buffer[forward + 5 : end]
                    if kind == b"R":
                        negotiating = False
                    elif kind == b"T":  # RowDescription
                        returns_positions = b"notification_id\x00" in body
                        appends_alone = b"appended_notification_id\x00" in body  # the insert function
                    elif kind == b"C":  # CommandComplete
                        tag = body.rstrip(b"\x00")
                        if tag.startswith(b"INSERT"):
                            inserted, appended = True, appended or returns_positions
                        elif tag.startswith(b"SELECT") and appends_alone:
                            inserted = appended = True
                            held = forward if held is None else held
                        elif tag == b"COMMIT" and inserted and self._take_cut(appended):
                            client.sendall(buffer[: forward if held is None else held])
                            return  # the commit is durable; its answer is lost with the connection
                        returns_positions = appends_alone = False
                    elif kind == b"E":  # an error ends the statement: what it described is over
                        returns_positions = appends_alone = False
                    elif kind == b"Z":  # ReadyForQuery
                        returns_positions = appends_alone = False
                        if body == b"I" and held is not None and self._take_cut(True):
                            client.sendall(buffer[:held])
                            return  # the statement committed on its own; its answer is lost
                        held = None  # in a transaction, its COMMIT is the answer to cut
                        if body == b"I":  # outside a transaction
                            inserted = appended = False
                    forward = end
                upto = forward if held is None else held
                client.sendall(buffer[:upto])
                buffer, scanned = buffer[upto:], forward - upto
                held = None if held is None else 0
        except OSError:
            pass
        finally:
            self._drop(server, client)

    def _drop(self, *ends: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(ends)
        for end in ends:
            _close(end)


def _close(end: socket.socket) -> None:
    with contextlib.suppress(OSError):
        end.shutdown(socket.SHUT_RDWR)
    end.close()
