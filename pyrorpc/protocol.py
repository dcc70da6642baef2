"""Pyro5's wire protocol as pure functions: the 40-byte header, annotations, frames (no I/O here).

The header (``!4sHBBHHII16sHH``, 40 bytes): ``PYRO``, protocol version 502, message type, serializer id,
flags, sequence number, data size, annotations size, correlation id, reserved, magic ``0x4dc5``. After
the header come the annotation chunks (4 ASCII letters, a 4-byte length, the bytes) and then the data.
``compat.py`` pins these constants against Pyro5's own.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

__all__ = [
    "FLAGS_BATCH", "FLAGS_COMPRESSED", "FLAGS_CORR_ID", "FLAGS_EXCEPTION", "FLAGS_ITEMSTREAMRESULT",
    "FLAGS_KEEPSERIALIZED", "FLAGS_ONEWAY", "HEADER", "HEADER_SIZE", "Header", "MAGIC", "MSG_ACCEPTED", "MSG_CANCEL",
    "MSG_CONNECT", "MSG_CONNECTFAIL", "MSG_CONNECTOK", "MSG_CREDIT", "MSG_INVOKE", "MSG_ITEMS", "MSG_NOTICE",
    "MSG_PING", "MSG_RESULT", "PROTOCOL_VERSION", "ProtocolViolation", "SERPENT_ID", "decompress", "pack",
    "pack_annotations", "parse_annotations", "parse_header",
]

MSG_CONNECT = 1
MSG_CONNECTOK = 2
MSG_CONNECTFAIL = 3
MSG_INVOKE = 4
MSG_RESULT = 5
MSG_PING = 6
# pyrorpc's own message types, only ever sent to a peer that asked for them in its handshake (stock Pyro5
# peers never see them): the server's "I am draining, send nothing more on this connection"
MSG_NOTICE = 0x50
MSG_ITEMS = 0x51  # a stream's items (server to client)
MSG_CREDIT = 0x52  # the consumer took items: the server may send this many more (client to server)
MSG_CANCEL = 0x53  # give a request up (client to server)
MSG_ACCEPTED = 0x54  # a request that asked for it (PRAK) is queued to run (server to client)
FLAGS_EXCEPTION = 1 << 0
FLAGS_COMPRESSED = 1 << 1
FLAGS_ONEWAY = 1 << 2
FLAGS_BATCH = 1 << 3
FLAGS_ITEMSTREAMRESULT = 1 << 4
FLAGS_KEEPSERIALIZED = 1 << 5
FLAGS_CORR_ID = 1 << 6
PROTOCOL_VERSION = 502
MAGIC = 0x4DC5
SERPENT_ID = 1
HEADER = struct.Struct("!4sHBBHHII16sHH")
HEADER_SIZE = HEADER.size  # 40
_NO_CORRELATION = b"\0" * 16
_ANN = struct.Struct("!4sI")
_KNOWN_TYPES = frozenset((MSG_CONNECT, MSG_CONNECTOK, MSG_CONNECTFAIL, MSG_INVOKE, MSG_RESULT, MSG_PING,
                          MSG_NOTICE, MSG_ITEMS, MSG_CREDIT, MSG_CANCEL, MSG_ACCEPTED))


class ProtocolViolation(Exception):
    """The peer sent something that is not Pyro5's protocol (the connection cannot be trusted after it)."""


class Header(NamedTuple):
    msg_type: int
    serializer_id: int
    flags: int
    seq: int
    data_size: int
    ann_size: int
    corr_id: bytes

    @property
    def total(self) -> int:
        """Bytes of the whole frame, header included."""
        return HEADER_SIZE + self.ann_size + self.data_size


def parse_header(raw: bytes | bytearray | memoryview, max_size: int, offset: int = 0) -> Header:
    """Check and parse a 40-byte header (at ``offset`` in ``raw``); refuses a frame over ``max_size`` before
    its payload is read.

    Raises:
        ProtocolViolation: not a Pyro5 header, wrong version or magic, unknown type, or too large.
    """
    tag, version, msg_type, ser_id, flags, seq, data_size, ann_size, corr, _res, magic = HEADER.unpack_from(raw, offset)
    if tag != b"PYRO" or magic != MAGIC:
        raise ProtocolViolation("not a Pyro5 message")
    if version != PROTOCOL_VERSION:
        raise ProtocolViolation(f"protocol version {version} is not {PROTOCOL_VERSION}")
    if msg_type not in _KNOWN_TYPES:
        raise ProtocolViolation(f"unknown message type {msg_type}")
    if data_size + ann_size > max_size:
        raise ProtocolViolation(f"message of {data_size + ann_size:,} bytes exceeds the limit of {max_size:,} "
                                "(max_message_size)")
    return Header(msg_type, ser_id, flags, seq, data_size, ann_size, corr)


def pack(msg_type: int, flags: int, seq: int, data: bytes, annotations: bytes = b"",
         serializer_id: int = SERPENT_ID, corr_id: bytes = _NO_CORRELATION) -> bytes:
    """One whole frame: header + annotation bytes (from ``pack_annotations``) + data."""
    return HEADER.pack(b"PYRO", PROTOCOL_VERSION, msg_type, serializer_id, flags, seq, len(data),
                       len(annotations), corr_id, 0, MAGIC) + annotations + data


def pack_annotations(annotations: dict[str, bytes]) -> bytes:
    parts = []
    for key, value in annotations.items():
        k = key.encode("ascii")
        if len(k) != 4:
            raise ValueError("annotation keys are 4 ASCII characters")
        parts.append(_ANN.pack(k, len(value)))
        parts.append(bytes(value))
    return b"".join(parts)


def parse_annotations(raw: bytes | memoryview) -> dict[str, bytes]:
    """Annotation chunks into a dict.

    Raises:
        ProtocolViolation: a chunk runs past the end.
    """
    out: dict[str, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolViolation("truncated annotation chunk")
        key, length = _ANN.unpack_from(raw, pos)
        pos += 8
        if pos + length > end:
            raise ProtocolViolation("annotation chunk runs past the message")
        out[key.decode("ascii", "replace")] = bytes(raw[pos:pos + length])
        pos += length
    return out


def decompress(data: bytes, max_size: int) -> bytes:
    """zlib-decompress a compressed payload, refusing one that would grow past ``max_size``.

    Raises:
        ProtocolViolation: corrupt data or a decompression bomb.
    """
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise ProtocolViolation(f"corrupt compressed payload: {exc}") from None
    if len(out) > max_size or d.unconsumed_tail:
        raise ProtocolViolation(f"compressed payload expands past the limit of {max_size:,} bytes")
    return out
