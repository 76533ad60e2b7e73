"""The HTTP protocol uvicorn serves the API with: its httptools protocol, with the one response
uvicorn writes itself given the API's error shape."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.schemas import ErrorBody, ErrorResponse, encoder

_NOT_HTTP = encoder.encode(
    ErrorResponse(ErrorBody(code="bad_request", message="The request is not valid HTTP/1.1", details=None))
)


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
