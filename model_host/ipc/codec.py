"""The one codec for everything that crosses processes: MessagePack of the tagged structs in
:mod:`model_host.ipc.messages`. The tag of each struct is what the receiver dispatches on."""

from __future__ import annotations

import msgspec

from model_host.ipc.messages import HostMessage, TokenFrame

_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(HostMessage)  # type: ignore[arg-type]
_frame_decoder = msgspec.msgpack.Decoder(TokenFrame)

DecodeError = msgspec.DecodeError


def encode(message: HostMessage | TokenFrame) -> bytes:
    return _encoder.encode(message)


def decode_message(raw: bytes | memoryview) -> HostMessage:
    """A worker → host message; raises ``DecodeError`` on bytes that are not one."""
    return _message_decoder.decode(raw)  # type: ignore[no-any-return]


def decode_frame(raw: bytes | memoryview) -> TokenFrame:
    """A host → worker frame; raises ``DecodeError`` on bytes that are not one."""
    return _frame_decoder.decode(raw)
