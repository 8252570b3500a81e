"""The migration protocol between minivmm processes: ``run --migrate
tcp:ADDR:PORT@WHEN`` (the source) and ``receive --listen ADDR:PORT`` (the destination).

Framed messages over TCP: ``kind`` u8, ``length`` u32 little-endian, the payload, and
after the handshake a 32-byte tag. Each kind has a bound, checked before its payload
is read; a message of a kind the conversation does not expect there ends it.

The handshake proves, both ways, knowledge of a shared secret before any VM state
crosses (a challenge-response over fresh nonces, as in RFC 2104's HMAC-SHA256):

1. destination -> HELLO: ``MAGIC``, the protocol version (u16) and a 32-byte nonce Nd.
2. source -> AUTH: its nonce Ns and HMAC(secret, "source" | Nd | Ns).
3. destination -> WELCOME: HMAC(secret, "destination" | Ns | Nd), or DENIED and close.

From there every message carries HMAC(K, sequence | direction | kind | payload), K =
HMAC(secret, "session" | Nd | Ns): a message replayed, reordered, altered or sent by
anyone without the secret ends the conversation. Then:

4. source -> OFFER (JSON: the VM's metadata and CPUID view); destination -> ACCEPT or
   REFUSE (a reason), after the compatibility check of its own host and EVC mode.
5. source -> PAGES (space u32, count u16, then page number u32 and 4096 bytes each),
   round after round while the VM runs on the source; a space is a Linux process's
   memory (its pid), or 0, the whole RAM of any other guest.
6. source -> STATE (the snapshot's JSON sections, each u32 length and JSON, in the
   order of ``SECTIONS``, then the console); destination ->
   READY once it holds a VM it can run (validated as a snapshot file is), or REFUSE.
7. source -> GO: from here the VM is the destination's; destination -> STARTED.
A source that does not get to send GO keeps the VM; a destination that does not get
GO discards what it received.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import time

from ..errors import MinivmmError

MAGIC = b"MINIVMM-MIGRATE\x00"
VERSION = 1
HEADER = struct.Struct("<BI")
TAG = 32
NONCE = 32
PAGE = 4096
PAGE_BATCH = 256                  # pages per PAGES message: 1 MiB
MIN_SECRET, MAX_SECRET = 16, 4096
HANDSHAKE_SECONDS = 10            # to authenticate, from the connection
IDLE_SECONDS = 60                 # between two messages once authenticated

HELLO, AUTH, WELCOME, DENIED, OFFER, ACCEPT, REFUSE, PAGES, STATE, READY, GO, STARTED = range(1, 13)
NAMES = {HELLO: "HELLO", AUTH: "AUTH", WELCOME: "WELCOME", DENIED: "DENIED", OFFER: "OFFER", ACCEPT: "ACCEPT",
         REFUSE: "REFUSE", PAGES: "PAGES", STATE: "STATE", READY: "READY", GO: "GO", STARTED: "STARTED"}
# Each kind's largest payload: OFFER holds the snapshot's meta and cpuid sections at
# their bounds, STATE meta, regs, cpuid and process, plus the console (snapshot.py).
MAX_PAYLOAD = {HELLO: len(MAGIC) + 2 + NONCE, AUTH: NONCE + TAG, WELCOME: TAG, DENIED: 256,
               OFFER: 10 << 20, ACCEPT: 0, REFUSE: 4096, PAGES: 6 + PAGE_BATCH * (4 + PAGE),
               STATE: 96 << 20, READY: 0, GO: 0, STARTED: 0}


class ProtocolError(MinivmmError):
    """The peer broke the protocol, or the connection broke: the conversation ends."""


def read_secret(path: str) -> bytes:
    """The shared secret in ``path``: its bytes, a trailing newline left out."""
    from ..files import read_bytes
    secret = read_bytes(path, "secret file", MAX_SECRET).rstrip(b"\r\n")
    if len(secret) < MIN_SECRET:
        raise MinivmmError(f"secret file {path} holds {len(secret)} bytes: a secret has at least {MIN_SECRET}")
    return secret


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


class Channel:
    """One side of a conversation over a connected socket (anything with ``recv_into``
    and ``sendall``), with the other side's address for errors."""

    def __init__(self, sock, peer: str, is_source: bool):
        self.sock, self.peer, self.is_source = sock, peer, is_source
        self.key: bytes | None = None
        self.sent = self.received = 0
        self.patience = HANDSHAKE_SECONDS   # for each message, however it trickles in
        self.deadline = 0.0

    # -- bytes ---------------------------------------------------------------------------

    def _exactly(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            left = self.deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                self.sock.settimeout(left)
                n = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise ProtocolError(f"{self.peer} sent no whole message within {self.patience} s") from None
            except OSError as e:
                raise ProtocolError(f"the connection with {self.peer} broke ({e.strerror or e})") from None
            if not n:
                raise ProtocolError(f"{self.peer} closed the connection")
            got += n
        return bytes(buffer)

    def send(self, kind: int, payload: bytes = b"") -> None:
        assert len(payload) <= MAX_PAYLOAD[kind], (NAMES[kind], len(payload))
        tag = b""
        if self.key is not None and kind != DENIED:   # DENIED: the source's proof failed, there is no key
            tag = _mac(self.key, struct.pack("<QB", self.sent, self.is_source), bytes([kind]), payload)
            self.sent += 1
        try:
            self.sock.settimeout(self.patience)
            self.sock.sendall(HEADER.pack(kind, len(payload)) + payload + tag)
        except OSError as e:
            raise ProtocolError(f"the connection with {self.peer} broke ({e.strerror or e})") from None

    def receive(self, *expected: int) -> tuple[int, bytes]:
        """The next message, of one of the ``expected`` kinds (REFUSE and DENIED always
        are: they end the conversation with the peer's reason)."""
        self.deadline = time.monotonic() + self.patience
        kind, length = HEADER.unpack(self._exactly(HEADER.size))
        if kind not in MAX_PAYLOAD:
            raise ProtocolError(f"{self.peer} sent a message of unknown kind {kind}")
        if kind not in expected + (REFUSE, DENIED):
            raise ProtocolError(f"{self.peer} sent {NAMES[kind]} where the protocol has "
                                f"{' or '.join(NAMES[k] for k in expected)}")
        if length > MAX_PAYLOAD[kind]:
            raise ProtocolError(f"{self.peer} sent a {NAMES[kind]} of {length} bytes, more than its bound "
                                f"{MAX_PAYLOAD[kind]}")
        payload = self._exactly(length)
        if self.key is not None and kind != DENIED:
            tag = self._exactly(TAG)
            want = _mac(self.key, struct.pack("<QB", self.received, not self.is_source), bytes([kind]), payload)
            if not hmac.compare_digest(tag, want):
                raise ProtocolError(f"a message from {self.peer} fails its authentication (altered, replayed "
                                    f"or not from the holder of the secret)")
            self.received += 1
        if kind in (REFUSE, DENIED):
            said = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in payload.decode("utf-8", "replace"))
            who = self.peer if self.key is not None else f"{self.peer} (not authenticated)"
            raise Refused(f"{who} refused: {said[:300]}")
        return kind, payload

    # -- the handshake -------------------------------------------------------------------

    def greet(self, secret: bytes, nonce: bytes | None = None) -> None:
        """The destination's side: HELLO, check AUTH, WELCOME (or DENIED)."""
        mine = nonce or os.urandom(NONCE)
        self.send(HELLO, MAGIC + struct.pack("<H", VERSION) + mine)
        _, payload = self.receive(AUTH)
        if len(payload) != NONCE + TAG:
            raise ProtocolError(f"{self.peer} sent an AUTH of {len(payload)} bytes, not {NONCE + TAG}")
        theirs, proof = payload[:NONCE], payload[NONCE:]
        if not hmac.compare_digest(proof, _mac(secret, b"source", mine, theirs)):
            self.send(DENIED, b"wrong secret")
            raise ProtocolError(f"{self.peer} does not know the secret: refused before anything crossed")
        self.key = _mac(secret, b"session", mine, theirs)
        self.send(WELCOME, _mac(secret, b"destination", theirs, mine))
        self.patience = IDLE_SECONDS

    def authenticate(self, secret: bytes) -> None:
        """The source's side: check HELLO, AUTH, check WELCOME."""
        _, payload = self.receive(HELLO)
        if len(payload) != len(MAGIC) + 2 + NONCE or not payload.startswith(MAGIC):
            raise ProtocolError(f"{self.peer} is not a minivmm receiver")
        version, = struct.unpack_from("<H", payload, len(MAGIC))
        if version != VERSION:
            raise ProtocolError(f"{self.peer} speaks protocol version {version}, this minivmm {VERSION}")
        theirs, mine = payload[-NONCE:], os.urandom(NONCE)
        self.send(AUTH, mine + _mac(secret, b"source", theirs, mine))
        self.key = _mac(secret, b"session", theirs, mine)
        try:
            _, proof = self.receive(WELCOME)
        except Refused:
            raise ProtocolError(f"{self.peer} refused the secret: the two sides hold different secrets") from None
        except ProtocolError:
            raise ProtocolError(f"{self.peer} did not prove it holds the secret") from None
        if not hmac.compare_digest(proof, _mac(secret, b"destination", mine, theirs)):
            raise ProtocolError(f"{self.peer} does not know the secret")
        self.patience = IDLE_SECONDS


class Refused(ProtocolError):
    """The peer said no, with its reason."""


# ---- payloads -------------------------------------------------------------------------

def pack_json(value) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def pack_pages(space: int, pages: list[int], read_page) -> bytes:
    """PAGES: ``read_page(number) -> 4096 bytes`` for each page number."""
    return struct.pack("<IH", space, len(pages)) + b"".join(struct.pack("<I", p) + read_page(p) for p in pages)


def unpack_pages(payload: bytes, pages_in_space: int):
    """(space, [(page number, bytes)]) of a PAGES message, every page in range."""
    if len(payload) < 6:
        raise ProtocolError("a PAGES message shorter than its header")
    space, count = struct.unpack_from("<IH", payload)
    if count > PAGE_BATCH or len(payload) != 6 + count * (4 + PAGE):
        raise ProtocolError(f"a PAGES message of {len(payload)} bytes does not hold the {count} pages it says")
    out = []
    for i in range(count):
        at = 6 + i * (4 + PAGE)
        number, = struct.unpack_from("<I", payload, at)
        if number >= pages_in_space:
            raise ProtocolError(f"page {number} is beyond the VM's {pages_in_space} pages")
        out.append((number, payload[at + 4:at + 4 + PAGE]))
    return space, out


SECTIONS = ("meta", "regs", "cpuid", "process")   # a snapshot's JSON sections ("null" for no process)


def pack_state(sections: dict, console: bytes) -> bytes:
    out = []
    for name in SECTIONS:
        body = pack_json(sections.get(name))
        out += [struct.pack("<I", len(body)), body]
    return b"".join(out) + console


def unpack_state(payload: bytes) -> tuple[dict[str, bytes], bytes]:
    """({section: its JSON}, the console) of a STATE message."""
    at, sections = 0, {}
    for name in SECTIONS:
        if at + 4 > len(payload):
            raise ProtocolError(f"a STATE message ends before its {name} section")
        size, = struct.unpack_from("<I", payload, at)
        if size > len(payload) - at - 4:
            raise ProtocolError(f"a STATE message's {name} section says {size} bytes, "
                                f"{len(payload) - at - 4} remain")
        sections[name] = payload[at + 4:at + 4 + size]
        at += 4 + size
    return sections, payload[at:]


def parse_address(text: str, what: str, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT (an IPv4 address or a name; port 1 to 65535, or 0 with ``any_port``:
    a free one)."""
    host, sep, port = text.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536 or not port.isascii():
        raise MinivmmError(f"{what} {text!r}: not ADDRESS:PORT (e.g. 127.0.0.1:4444)")
    return host, int(port)
