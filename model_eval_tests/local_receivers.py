"""TEST DOUBLES: a local webhook receiver and a local SMTP receiver that record what they get.

Not part of the product. Each listens on 127.0.0.1 on an ephemeral port, in a background thread,
for the duration of a `with` block:

    with WebhookReceiver(status=200) as hook:
        ...POST to hook.url...
        hook.requests[0].json()

    with SmtpReceiver(credentials=("alerts", "s3cret")) as mail:
        ...smtplib.SMTP("127.0.0.1", mail.port)...
        mail.messages[0].message["Subject"]

`closed_port()` gives a port nobody listens on, for "the channel is down" tests, and
`silent_listener()` one that accepts connections but never answers, for timeout tests.

The SMTP receiver is a deliberately small line-based server (EHLO/HELO, AUTH PLAIN/LOGIN, MAIL,
RCPT, DATA, RSET, NOOP, QUIT): just what smtplib needs, with no dependency on the deprecated
`smtpd` module or on aiosmtpd.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email
import email.policy
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
# Bounds so a confused client (or a bug in the code under test) cannot hang or flood a test.
_SOCKET_TIMEOUT_S = 10.0
_MAX_BODY_BYTES = 1_000_000
_MAX_LINE_BYTES = 10_000
_MAX_COMMANDS = 200


def closed_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago and has no listener now (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (in the kernel backlog) but never says a word:
    a hung server, for timeout tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((HOST, 0))
        listener.listen(4)
        yield listener.getsockname()[1]


class _Background:
    """Runs a socketserver in a daemon thread between __enter__ and __exit__."""

    def __init__(self) -> None:
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _make_server(self) -> socketserver.TCPServer:
        raise NotImplementedError

    @property
    def port(self) -> int:
        assert self._server is not None, "use the receiver as a context manager"
        return self._server.server_address[1]

    def __enter__(self):
        server = self._make_server()
        # Handler threads must not keep the test process alive or block server_close().
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- webhook ----------------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class WebhookReceiver(_Background):
    """Records every POST and answers with `status` (200 "ok" like Slack, or e.g. 500 to play broken)."""

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.requests: list[ReceivedRequest] = []

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path

    def _make_server(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = _SOCKET_TIMEOUT_S

            def do_POST(self) -> None:  # http.server's naming
                length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY_BYTES)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(ReceivedRequest("POST", self.path, dict(self.headers.items()), body))
                payload = b"ok" if 200 <= receiver.status < 300 else b"receiver told to fail"
                self.send_response(receiver.status)
                if 300 <= receiver.status < 400:
                    # A real redirect, so the client's redirect policy is what gets tested.
                    self.send_header("Location", receiver.url("/elsewhere"))
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return ThreadingHTTPServer((HOST, 0), Handler)


# --- SMTP -------------------------------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth_user: str | None  # who logged in (None: no AUTH)
    message: EmailMessage = field(init=False)

    def __post_init__(self) -> None:
        self.message = email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[assignment]

    def body(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        # On the wire lines end in CRLF; tests compare with Python text.
        return part.get_content().replace("\r\n", "\n")


class SmtpReceiver(_Background):
    """Accepts mail and records it. With `credentials=(user, password)`, AUTH is offered and only
    that pair is accepted; without, AUTH is not offered. STARTTLS is never offered."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.credentials = credentials
        self.messages: list[ReceivedMail] = []
        self.failed_logins = 0

    def _make_server(self) -> socketserver.ThreadingTCPServer:
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = _SOCKET_TIMEOUT_S

            def handle(self) -> None:
                _SmtpSession(receiver, self.rfile, self.wfile).run()

        return socketserver.ThreadingTCPServer((HOST, 0), Handler)

    def _record(self, mail: ReceivedMail) -> None:
        with self._lock:
            self.messages.append(mail)


class _SmtpSession:
    """One client connection: a command loop bounded by _MAX_COMMANDS and the socket timeout."""

    def __init__(self, receiver: SmtpReceiver, rfile, wfile) -> None:
        self.receiver = receiver
        self.rfile = rfile
        self.wfile = wfile
        self.user: str | None = None
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def read_line(self) -> str | None:
        raw = self.rfile.readline(_MAX_LINE_BYTES)
        if not raw:
            return None  # the client hung up
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def run(self) -> None:
        self.reply("220 127.0.0.1 model_eval test SMTP receiver")
        try:
            for _ in range(_MAX_COMMANDS):
                line = self.read_line()
                if line is None or not self.command(line):
                    return
        except (OSError, TimeoutError):
            return  # a client that vanished or went quiet just ends the session
        self.reply("421 too many commands, closing")

    def command(self, line: str) -> bool:
        """Handle one command; False ends the session."""
        verb, _, argument = line.partition(" ")
        verb = verb.upper()  # smtplib sends "mail FROM:<...>", "rcpt TO:<...>" in lower case
        if verb == "EHLO":
            extensions = ["8BITMIME"]
            if self.receiver.credentials is not None:
                extensions.append("AUTH PLAIN LOGIN")
            self.reply("250-127.0.0.1 hello")
            for extension in extensions[:-1]:
                self.reply(f"250-{extension}")
            self.reply(f"250 {extensions[-1]}")
        elif verb == "HELO":
            self.reply("250 127.0.0.1 hello")
        elif verb == "AUTH":
            self.auth(argument)
        elif verb == "MAIL":
            if self.receiver.credentials is not None and self.user is None:
                self.reply("530 5.7.0 authentication required")
            else:
                self.mail_from = _address(argument)
                self.rcpt_tos = []
                self.reply("250 OK")
        elif verb == "RCPT":
            if self.mail_from is None:
                self.reply("503 need MAIL first")
            else:
                self.rcpt_tos.append(_address(argument))
                self.reply("250 OK")
        elif verb == "DATA":
            self.data()
        elif verb == "RSET":
            self.mail_from, self.rcpt_tos = None, []
            self.reply("250 OK")
        elif verb == "NOOP":
            self.reply("250 OK")
        elif verb == "QUIT":
            self.reply("221 bye")
            return False
        else:  # STARTTLS included: not offered, so refusing it is correct
            self.reply("502 command not implemented")
        return True

    def data(self) -> None:
        if self.mail_from is None or not self.rcpt_tos:
            self.reply("503 need MAIL and RCPT first")
            return
        self.reply("354 end data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        size = 0
        while size <= _MAX_BODY_BYTES:  # bounded: an endless DATA section is cut off
            raw = self.rfile.readline(_MAX_LINE_BYTES)
            if not raw:
                return
            if raw in (b".\r\n", b".\n"):
                break
            # Undo dot-stuffing: the client doubled every leading dot.
            lines.append(raw[1:] if raw.startswith(b"..") else raw)
            size += len(raw)
        else:
            self.reply("552 message too big")
            return
        self.receiver._record(ReceivedMail(self.mail_from, list(self.rcpt_tos), b"".join(lines), self.user))
        self.mail_from, self.rcpt_tos = None, []
        self.reply("250 OK queued")

    def auth(self, argument: str) -> None:
        if self.receiver.credentials is None:
            self.reply("502 AUTH not offered")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            # "AUTH PLAIN <base64(authzid NUL user NUL password)>", or the response on its own line.
            response = initial or self.challenge("")
            decoded = _b64(response)
            pieces = decoded.split("\0") if decoded is not None else []
            user, password = (pieces[1], pieces[2]) if len(pieces) == 3 else (None, None)
        elif mechanism == "LOGIN":
            user = _b64(initial) if initial else _b64(self.challenge("VXNlcm5hbWU6"))  # "Username:"
            password = _b64(self.challenge("UGFzc3dvcmQ6"))  # "Password:"
        else:
            self.reply("504 mechanism not supported")
            return
        if (user, password) == self.receiver.credentials:
            self.user = user
            self.reply("235 2.7.0 authentication successful")
        else:
            self.receiver.failed_logins += 1
            self.reply("535 5.7.8 authentication credentials invalid")

    def challenge(self, prompt: str) -> str:
        self.reply(f"334 {prompt}")
        return self.read_line() or ""


def _address(argument: str) -> str:
    """'FROM:<a@b> BODY=8BITMIME' -> 'a@b'."""
    _, _, rest = argument.partition(":")
    address = rest.strip().split(" ")[0]
    return address.strip("<>")


def _b64(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
