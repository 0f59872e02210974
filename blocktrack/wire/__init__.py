"""QEMU's block-migration wire format: the only package in blocktrack that knows its byte layouts.

``layout`` holds the constants, the Record type and the header codec; ``reader`` decodes a stream
(StreamReader), ``writer`` encodes one (StreamWriter). See each module's docstring for the layout.
"""

from blocktrack.wire.layout import (
    CHUNK_SIZE,
    FLAG_DEVICE_BLOCK,
    FLAG_EOS,
    FLAG_PROGRESS,
    FLAG_ZERO_BLOCK,
    MAX_NAME_LEN,
    SECTOR_SIZE,
    Record,
    Section,
    decode_block_header,
    encode_block_header,
    encode_progress,
)
from blocktrack.wire.reader import StreamReader
from blocktrack.wire.writer import StreamWriter

__all__ = [
    "CHUNK_SIZE",
    "FLAG_DEVICE_BLOCK",
    "FLAG_EOS",
    "FLAG_PROGRESS",
    "FLAG_ZERO_BLOCK",
    "MAX_NAME_LEN",
    "SECTOR_SIZE",
    "Record",
    "Section",
    "StreamReader",
    "StreamWriter",
    "decode_block_header",
    "encode_block_header",
    "encode_progress",
]
