"""The read buffer of one connection: the socket reads into it, whole Noise records are taken out of it.

80 KiB while a connection is idle or carries small RPCs (one whole record fits), grown to 1 MiB once reads keep
filling it (bulk data flows: fewer, larger socket reads), trimmed back when a whole period passes without a read
filling it (the transport's reaper calls ``trim``). A partial record moves to the front when less than one
record's space is left behind it. The connection decrypts records straight out of ``view[start:end]``.
"""

from __future__ import annotations

from swarm.p2p.config import MAX_NOISE_MESSAGE_BYTES

RECORD_SPACE_BYTES = MAX_NOISE_MESSAGE_BYTES + 2  # one whole length-prefixed record
SMALL_READ_BUFFER_BYTES = 80 * 1024  # idle and small-RPC connections: one whole record fits
LARGE_READ_BUFFER_BYTES = 1 << 20  # while bulk data flows: fewer, larger socket reads
_FULL_READS_TO_GROW = 2  # consecutive reads that fill the small buffer before it grows


class ReadBuffer:
    """The bytes read from the socket and not consumed yet: ``view[start:end]``."""

    def __init__(self) -> None:
        self.buf = bytearray(SMALL_READ_BUFFER_BYTES)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self._offered_bytes = 0  # size of the view ``offer`` handed out last
        self._full_reads = 0  # consecutive reads that filled that view
        self._filled_since_trim = False

    @property
    def size_bytes(self) -> int:
        return len(self.buf)

    @property
    def unread_bytes(self) -> int:
        return self.end - self.start

    @property
    def nearly_full(self) -> bool:
        """Less than one record's space is left: pause reading until the unread bytes are consumed."""
        return self.end - self.start > len(self.buf) - RECORD_SPACE_BYTES

    def offer(self) -> memoryview:
        """The free space for the next socket read (``get_buffer``), at least one record's worth."""
        if len(self.buf) - self.end < RECORD_SPACE_BYTES:  # move the partial record to the front
            unread = self.end - self.start
            self.buf[:unread] = self.buf[self.start : self.end]
            self.start, self.end = 0, unread
        self._offered_bytes = len(self.buf) - self.end
        return self.view[self.end :]

    def filled(self, nbytes: int) -> None:
        """The socket read ``nbytes`` into the offered space (``buffer_updated``)."""
        self.end += nbytes
        self._grow_or_count(nbytes == self._offered_bytes)

    def discard(self) -> None:
        """Drop every unread byte (a refused connection ignores what its peer still sends)."""
        self.start = self.end = 0

    def take_record(self) -> bytes | None:
        """The next whole length-prefixed record (its body), or None if it has not fully arrived."""
        pos, end = self.start, self.end
        if end - pos >= 2:
            size = (self.buf[pos] << 8) | self.buf[pos + 1]
            if end - pos - 2 >= size:
                self.start = pos + 2 + size
                return bytes(self.view[pos + 2 : pos + 2 + size])
        return None

    def _grow_or_count(self, full: bool) -> None:
        """Grow the small read buffer once reads keep filling it (bulk data is flowing)."""
        self._full_reads = self._full_reads + 1 if full else 0
        self._filled_since_trim |= full
        if self._full_reads >= _FULL_READS_TO_GROW and len(self.buf) < LARGE_READ_BUFFER_BYTES:
            self.resize(LARGE_READ_BUFFER_BYTES)

    def trim(self) -> None:
        """Shrink a large read buffer back if no read filled it since the last call (the transport's reaper
        calls this every period, so a connection that went quiet holds only the small buffer)."""
        unread = self.end - self.start
        if not self._filled_since_trim and len(self.buf) > SMALL_READ_BUFFER_BYTES and unread < RECORD_SPACE_BYTES:
            self.resize(SMALL_READ_BUFFER_BYTES)
        self._filled_since_trim = False

    def resize(self, size_bytes: int) -> None:
        """Move the unread bytes into a new buffer of ``size_bytes``."""
        unread = self.end - self.start
        buf = bytearray(size_bytes)
        buf[:unread] = self.view[self.start : self.end]
        self.buf, self.view = buf, memoryview(buf)
        self.start, self.end, self._full_reads = 0, unread, 0
