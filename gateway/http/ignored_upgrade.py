"""A request asking to upgrade (`Upgrade: h2c`, or a WebSocket no door speaks) is answered as the HTTP/1.1 request it
also is, body and all, as RFC 9110 7.8 lets a server do.

httptools tells llhttp that a request with an upgrade has no body, and stops parsing at the end of its head; uvicorn
then gave the app the request with an empty body, dropped the body's bytes, and logged two warnings. `curl --http2`
on an http:// URL sends `Upgrade: h2c` with every request, as HTTP/2 clients may: a FHIR POST or an upload from it
reached the app empty, and a chunked one waited for a body that never came. Here the body is
read on by a new parser, told the body's framing in a head of its own making, whose callbacks that head does not
reach the protocol."""

from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _BodyOnward:
    """The protocol's parser callbacks, except those of the made-up head that tells the new parser how the body is
    framed (it would begin a new request). On a connection that asked to upgrade only: others keep uvicorn's."""

    def __init__(self, protocol: HttpToolsProtocol, made_up_head: bool) -> None:
        self._protocol = protocol
        self._skipping = made_up_head

    def on_message_begin(self) -> None:
        if not self._skipping:
            self._protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._skipping:
            self._protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._skipping:
            self._protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._skipping:
            self._skipping = False
            return
        self._protocol.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._protocol.on_body(body)

    def on_message_complete(self) -> None:
        self._protocol.on_message_complete()


def body_framing(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines that say how a request's body is framed (none when it has no body), as the request gave them:
    llhttp has checked them already (both, or two lengths, are refused before the head is complete)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return b"transfer-encoding: " + value + b"\r\n"
    for name, value in headers:
        if name == b"content-length":
            return b"content-length: " + value + b"\r\n" if value.strip() not in (b"", b"0") else b""
    return b""


class IgnoresUpgrade(HttpToolsProtocol):
    def data_received(self, data: bytes) -> None:
        # uvicorn's, but an upgrade request's body, and what follows it, are parsed on instead of dropped
        self._unset_keepalive_if_required()
        while data:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._should_upgrade():  # a WebSocket, were uvicorn's enabled (serve.py has ws="none")
                    self.handle_websocket_upgrade()
                    return
                data = self._parse_on(data[upgrade.args[0]:])

    def _parse_on(self, rest: bytes) -> bytes:
        """A new parser for what follows an upgrade request's head, and the bytes to give it: as if no upgrade had
        been asked for."""
        framing = body_framing(self.headers)
        parser = httptools.HttpRequestParser(_BodyOnward(self, made_up_head=True) if framing else self)
        parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        self.parser = parser
        if not framing:
            return rest
        # the request was ended as bodiless when its head was read. Its app has not run yet (that head was parsed in
        # this same call): it will see the body.
        self.cycle.more_body = True
        self.cycle.message_event.clear()
        self.body_resumed()
        return b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest

    def body_resumed(self) -> None:
        """The request whose head was just read has a body to come after all (a hook)."""
