"""Builders of real neonize protobuf events, complete as Go sends them (proto2: every required field set).

Each builder returns the event parsed back from its wire bytes, as neonize's `Event.execute` does with what Go
hands over, so a missing required field fails here rather than passing unnoticed.
"""

from __future__ import annotations

from typing import Any, TypeVar

from neonize.proto import Neonize_pb2 as nz
from neonize.proto.waCommon.WACommon_pb2 import MessageKey
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
    ExtendedTextMessage,
    FutureProofMessage,
    ImageMessage,
    Message,
    ReactionMessage,
)
from neonize.proto.waHistorySync.WAWebProtobufsHistorySync_pb2 import (
    Conversation,
    HistorySync,
    HistorySyncMsg,
    PhoneNumberToLIDMapping,
)
from neonize.proto.waWeb.WAWebProtobufsWeb_pb2 import WebMessageInfo

M = TypeVar("M")
TS_MS = 1_760_000_000_123  # 2025-10-09T08:53:20.123Z, as MessageInfo.Timestamp (Unix milliseconds)
TS_S = 1_760_000_000


def wire(message: M) -> M:
    data: bytes = message.SerializeToString()
    parsed: M = type(message).FromString(data)
    return parsed


def jid(value: str = "") -> Any:
    """`user[:device]@server`, or the empty JID Go sends for "none"."""
    if not value:
        return nz.JID(User="", RawAgent=0, Device=0, Integrator=0, Server="", IsEmpty=True)
    user, server = value.rsplit("@", 1)
    device = 0
    if ":" in user:
        user, dev = user.split(":", 1)
        device = int(dev)
    return nz.JID(User=user, RawAgent=0, Device=device, Integrator=0, Server=server, IsEmpty=False)


def source(
    chat: str,
    sender: str,
    *,
    from_me: bool = False,
    group: bool = False,
    sender_alt: str = "",
    recipient_alt: str = "",
) -> Any:
    return nz.MessageSource(
        Chat=jid(chat),
        Sender=jid(sender),
        IsFromMe=from_me,
        IsGroup=group,
        SenderAlt=jid(sender_alt),
        RecipientAlt=jid(recipient_alt),
        BroadcastListOwner=jid(),
    )


def message_event(
    body: Any,
    src: Any,
    *,
    message_id: str = "3EB0AAAAAAAAAAAAAAAAAA",
    push_name: str = "Alice",
    timestamp: int = TS_MS,
    media_type: str = "",
) -> Any:
    info = nz.MessageInfo(
        MessageSource=src,
        ID=message_id,
        ServerID=0,
        Type="media" if media_type else "text",
        Pushname=push_name,
        Timestamp=timestamp,
        Category="",
        Multicast=False,
        MediaType=media_type,
        Edit="",
    )
    return wire(
        nz.Message(
            Info=info,
            Message=body,
            IsEphemeral=False,
            IsViewOnce=False,
            IsViewOnceV2=False,
            IsViewOnceV2Extension=False,
            IsDocumentWithCaption=False,
            IsLottieSticker=False,
            IsEdit=False,
            UnavailableRequestID="",
            RetryCount=0,
            Raw=body,
        )
    )


def text(value: str) -> Any:
    return Message(conversation=value)


def extended_text(value: str) -> Any:
    return Message(extendedTextMessage=ExtendedTextMessage(text=value, matchedText="https://example.com"))


def image(caption: str) -> Any:
    return Message(
        imageMessage=ImageMessage(
            URL="https://mmg.whatsapp.net/x",
            mimetype="image/jpeg",
            caption=caption,
            fileSHA256=b"\x01" * 32,
            fileLength=1234,
            height=640,
            width=480,
            mediaKey=b"\x02" * 32,
            fileEncSHA256=b"\x03" * 32,
            directPath="/v/t62/x",
        )
    )


def ephemeral(inner: Any) -> Any:
    return Message(ephemeralMessage=FutureProofMessage(message=inner))


def reaction() -> Any:
    key = MessageKey(remoteJID="60123456789@s.whatsapp.net", fromMe=True, ID="3EB0BBBB")
    return Message(reactionMessage=ReactionMessage(key=key, text="👍", senderTimestampMS=TS_MS))


def receipt(kind: int, ids: list[str], src: Any, timestamp: int = TS_S) -> Any:
    return wire(nz.Receipt(MessageSource=src, MessageIDs=ids, Timestamp=timestamp, Type=kind))


def connected() -> Any:
    return wire(nz.Connected(status=True))


def disconnected() -> Any:
    return wire(nz.Disconnected(status=True))


def logged_out(reason: int, on_connect: bool = True) -> Any:
    return wire(nz.LoggedOut(OnConnect=on_connect, Reason=reason))


def temporary_ban(code: int, expire_s: int) -> Any:
    return wire(nz.TemporaryBan(Code=code, Expire=expire_s))


def stream_replaced() -> Any:
    return wire(nz.StreamReplaced())


def keepalive_timeout(errors: int) -> Any:
    return wire(nz.KeepAliveTimeout(ErrorCount=errors, LastSuccess=TS_S))


def connect_failure(reason: int, message: str) -> Any:
    raw = nz.Node(Tag="failure", Attrs=[nz.NodeAttrs(name="reason", integer=503)], Nil=True)
    return wire(nz.ConnectFailure(Reason=reason, Message=message, Raw=raw))


def client_outdated() -> Any:
    return wire(nz.ClientOutdated())


def pair_status(device_jid: str, *, ok: bool = True, error: str = "") -> Any:
    status = nz.PairStatus.SUCCESS if ok else nz.PairStatus.ERROR
    event = nz.PairStatus(ID=jid(device_jid), BusinessName="", Platform="android", Status=status)
    if error:
        event.Error = error
    return wire(event)


def web_message(
    chat: str, message_id: str, body: Any, *, from_me: bool = False, participant: str = "", ts: int = TS_S
) -> Any:
    key = MessageKey(remoteJID=chat, fromMe=from_me, ID=message_id)
    if participant:
        key.participant = participant
    return WebMessageInfo(key=key, message=body, messageTimestamp=ts, pushName="" if from_me else "Bob")


def history_sync(
    conversations: dict[str, list[Any]], *, progress: int = 42, lid_to_pn: dict[str, str] | None = None
) -> Any:
    data = HistorySync(syncType=HistorySync.INITIAL_BOOTSTRAP, progress=progress)
    for chat, messages in conversations.items():
        data.conversations.append(
            Conversation(ID=chat, messages=[HistorySyncMsg(message=m, msgOrderID=i) for i, m in enumerate(messages)])
        )
    for lid, pn in (lid_to_pn or {}).items():
        data.phoneNumberToLidMappings.append(PhoneNumberToLIDMapping(lidJID=lid, pnJID=pn))
    return wire(nz.HistorySync(Data=data))
