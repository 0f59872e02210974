"""The sender's end of a migration connection: handshake, framed stream, acknowledgements, verdict.

``ReceiverLink`` takes a connected, authenticated channel (transport.Channel: TCP, TLS or ssh; see
secure.py), sends HELLO and waits for ACCEPT or REFUSE before anything else (so a
target that is too small is refused before any data moves). Then it is a sink for the StreamWriter
(``write`` wraps each buffer in a DATA frame, the payload never copied) while a thread reads the
receiver's messages: ACKs (how far the receiver has parsed, and how far its writes are durable),
then RESULT with the digests, or ERROR. Any failure of the peer — an ERROR, a reset, an early end —
is kept and raised as PeerError from the next call of the main thread, so the engine stops at once
and never reports success on a broken link (ARCHITECTURE.md, invariant 3). A receiver that sends
nothing for the channel's stall timeout (not even a KEEPALIVE) is PeerStalled; while this end has
nothing to send, a Heartbeat sends KEEPALIVE frames so the receiver can tell idle from stalled.

Byte counts: ``sent`` is stream bytes handed to the socket, ``received`` and ``durable`` what the
receiver acknowledged (parsed; flushed and synced). The engine counts what is not yet durable in
its pending estimate; the link rate is measured on ``received``.
"""

from __future__ import annotations

import threading
import time

from blocktrack.errors import PeerError, PeerStalled, StreamError
from blocktrack.transport import Heartbeat
from blocktrack.wire import control as C


class Refused(PeerError):
    """The receiver refused the migration in its handshake (nothing was sent)."""

    def __init__(self, reason: int, message: str):
        self.reason = reason
        super().__init__(f"the receiver refused the migration ({C.REFUSE_NAMES.get(reason, reason)}): {message}")


class ReceiverLink:
    def __init__(self, channel, hello: C.Hello):
        """``channel``: a connected, authenticated transport.Channel (TCP, TLS or ssh); ours to close."""
        self.channel = channel
        self.address = channel.name
        self.hello = hello
        self.nchunks = hello.nchunks
        self.sent = 0
        self._marked = 0        # the count the last MARK carried
        self.received = 0
        self.durable = 0
        self.result: C.Result | None = None
        self.error: BaseException | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._heartbeat = None
        try:
            self._send(C.encode_hello(hello))
            # A resuming receiver reads back the chunks it holds before it answers, sending
            # keep-alives meanwhile: each bounds the wait by the stall timeout, not the whole.
            kind = C.KEEPALIVE
            while kind == C.KEEPALIVE:
                kind, body = self._read_message(C.ACCEPT_HEAD.size + C.bitmap_bytes(self.nchunks))
            if kind == C.REFUSE:
                raise Refused(*C.decode_refuse(body))
            if kind == C.ERROR:
                raise PeerError(f"the receiver failed: {C.decode_text(body)}")
            if kind != C.ACCEPT:
                raise PeerError(f"the receiver answered the handshake with {C.REPLY_NAMES[kind]}")
            try:
                self.accept = C.decode_accept(body, self.nchunks)
            except StreamError as exc:
                raise PeerError(f"bad handshake answer from {self.address}: {exc}") from None
            if self.accept.target_size < hello.size:
                raise PeerError(f"the receiver accepted a target of {self.accept.target_size} bytes for a "
                                f"{hello.size}-byte device")
        except BaseException:
            channel.close()
            raise
        if channel.stall_timeout:
            # Between passes, or while the receiver digests, this end may send nothing for a while.
            self._heartbeat = Heartbeat(channel, C.frame_header(C.FRAME_KEEPALIVE, 0), channel.stall_timeout / 3)
        self._reader = threading.Thread(target=self._read_replies, name="migrate-acks", daemon=True)
        self._reader.start()

    # -- the stream (a sink for StreamWriter) -----------------------------------------------------

    @property
    def name(self) -> str:
        return self.address

    def write(self, buf) -> None:
        self.check()
        view = memoryview(buf).cast("B")
        while view.nbytes:
            piece = view[:C.MAX_DATA_FRAME]
            self._send(C.frame_header(C.FRAME_DATA, piece.nbytes), piece)
            self.sent += piece.nbytes
            view = view[piece.nbytes:]

    def mark(self) -> None:
        """Tell the receiver how many stream bytes were sent (MARK frame), once per count: it checks
        that it received exactly that many."""
        if self.sent != self._marked:
            self.check()
            self._send(C.encode_mark(self.sent))
            self._marked = self.sent

    def end(self) -> None:
        """The stream is complete (MARK, END frames)."""
        self.mark()
        self.check()
        self._send(C.frame_header(C.FRAME_END, 0))

    def wait_result(self, timeout: float | None = None) -> C.Result:
        with self._cond:
            if not self._cond.wait_for(lambda: self.result is not None or self.error is not None, timeout):
                raise PeerError(f"no verification result from {self.address} after {timeout} s")
            if self.result is not None:
                return self.result
        raise self.error

    def wait_durable(self, target: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.durable >= target or self.error is not None, timeout)

    def verdict(self, result: int, message: str) -> None:
        """Tell the receiver what the comparison found (best effort: the sender's result stands)."""
        try:
            self._send(C.encode_verdict(result, message))
        except PeerError:
            pass

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        # FIN after the verdict, then let the reader take whatever the receiver still sends until it
        # closes: closing with unread input would reset the connection and could drop the verdict.
        self.channel.end_output()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(5)
        self.channel.shutdown()
        if reader is not None:
            reader.join(5)
        self.channel.close()

    # -- internals --------------------------------------------------------------------------------

    def _send(self, *buffers) -> None:
        try:
            self.channel.sendall(*buffers)
        except PeerStalled:
            raise
        except PeerError as exc:
            # The reader thread may know why (an ERROR message came first): prefer its story.
            self._reader_settle()
            if self.error is not None:
                raise self.error from None
            raise PeerError(f"{exc}; the receiver went away") from None

    def _reader_settle(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(2)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.channel.recv_into(view[got:])
            if k == 0:
                raise EOFError(got)
            got += k
        return bytes(buf)

    def _read_message(self, max_length: int) -> tuple[int, bytes]:
        try:
            head = self._recv_exact(C.REPLY.size)
            kind, length = C.decode_reply_header(head, max_length)
            body = self._recv_exact(length) if length else b""
        except EOFError:
            raise PeerError(f"{self.address} closed the connection") from None
        except StreamError as exc:
            raise PeerError(f"{self.address}: {exc}") from None
        return kind, body

    def _read_replies(self) -> None:
        limit = C.result_max_length(self.nchunks)
        while True:
            try:
                kind, body = self._read_message(limit)
                if kind == C.KEEPALIVE:
                    continue
                if kind == C.ACK:
                    received, durable = C.decode_ack(body)
                    with self._cond:
                        self.received, self.durable = max(self.received, received), max(self.durable, durable)
                        self._cond.notify_all()
                    continue
                if kind == C.RESULT:
                    result = C.decode_result(body, self.nchunks)
                    with self._cond:
                        self.result = result
                        self._cond.notify_all()
                    continue
                if kind == C.ERROR:
                    raise PeerError(f"the receiver failed: {C.decode_text(body)}")
                raise PeerError(f"unexpected {C.REPLY_NAMES[kind]} message from the receiver")
            except (PeerError, StreamError, OSError) as exc:
                with self._cond:
                    if self.result is None and not self._closing and self.error is None:
                        if isinstance(exc, PeerError) and not str(exc).endswith("closed the connection"):
                            self.error = exc
                        elif isinstance(exc, (PeerError, OSError)):
                            self.error = PeerError(f"the receiver at {self.address} closed the connection "
                                                   "before the migration completed")
                        else:
                            self.error = PeerError(f"{self.address}: {exc}")
                    self._cond.notify_all()
                return


class MeteredSink:
    """The link rate as the receiver sees it: stream bytes it acknowledged per busy second.

    Busy time only runs while the engine is sending (``busy(True)``), so an idle link between passes
    does not dilute the estimate. The window slides over the last ``window`` busy seconds; until
    ``min_bytes`` have been acknowledged there is no estimate (None).
    """

    def __init__(self, link: ReceiverLink, *, window: float = 2.0, min_bytes: int = 2 << 20):
        self.link = link
        self.window = window
        self.min_bytes = min_bytes
        self._busy_total = 0.0
        self._busy_since: float | None = None
        self._samples: list[tuple[float, int]] = [(0.0, link.received)]
        self._last_sample = 0.0

    def busy(self, on: bool) -> None:
        now = time.monotonic()
        if on and self._busy_since is None:
            self._busy_since = now
        elif not on and self._busy_since is not None:
            self._busy_total += now - self._busy_since
            self._busy_since = None
            self.sample(force=True)

    def _busy_now(self) -> float:
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + extra

    def sample(self, force: bool = False) -> None:
        t = self._busy_now()
        if not force and t - self._last_sample < 0.05:
            return
        self._last_sample = t
        self._samples.append((t, self.link.received))
        while len(self._samples) > 2 and self._samples[1][0] < t - self.window:
            self._samples.pop(0)

    def rate(self) -> float | None:
        self.sample(force=True)
        t0, b0 = self._samples[0]
        t1, b1 = self._samples[-1]
        if b1 - b0 >= self.min_bytes and t1 > t0:
            return (b1 - b0) / (t1 - t0)
        first_t, first_b = 0.0, 0
        if self.link.received >= self.min_bytes and t1 > first_t:
            return (self.link.received - first_b) / t1
        return None
