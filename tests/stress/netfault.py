"""A TCP proxy in front of PostgreSQL that can lose the answer to one commit.

This is the fault of a server that crashes, or a network that breaks, just after a commit: the
transaction is durable but the client never hears so. The proxy passes every byte through, and
once armed it drops the connection instead of forwarding the next answer `COMMIT` to a
transaction that inserted rows (the event store's append)."""

from __future__ import annotations

import contextlib
import socket
import threading

COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # the CommandComplete message for a COMMIT
INSERT_DONE = b"INSERT 0 "  # the start of an INSERT's CommandComplete tag


class CommitAnswerCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.cuts = 0
        self._armed = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        host, _, rest = database_url.rpartition("@")
        return f"{host}@127.0.0.1:{self.port}/{rest.split('/', 1)[1]}"

    def arm(self, times: int = 1) -> None:
        with self._lock:
            self._armed += times

    def disarm(self) -> None:
        with self._lock:
            self._armed = 0

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self._armed == 0:
                return False
            self._armed -= 1
            self.cuts += 1
            return True

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        inserted = False
        tail = b""
        try:
            while chunk := source.recv(65536):
                if answers:
                    seen = tail + chunk
                    inserted = inserted or INSERT_DONE in seen
                    if COMMIT_DONE in seen:
                        if inserted and self._take_cut():
                            return  # the commit is durable; its answer is lost with the connection
                        inserted, seen = False, b""
                    tail = seen[-16:]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()
