"""Same-host output: the client's side of the shared-memory ring (the proto's SharedOutput; layout in
shm/shared_ring.h). A region under /dev/shm, mode 0600, that the server writes attention values
into; the stream then carries only where each piece lies. Every announced piece is checked before
it is read, so a broken or hostile server gets an error, never a read outside the region."""
import mmap
import os
import re
import struct

import numpy as np

from attnscope.v1 import attnscope_pb2 as pb

HEADER_BYTES = 4096
KEY_BYTES = 16
MIN_CAPACITY = 1 << 16
MAGIC = b"ATTNRING"
VERSION = 1
READ_AT = 64
SHM_DIR = "/dev/shm"
_ORPHAN = re.compile(r"^attnscope-(\d{1,9})-")


def available():
    return os.path.isdir(SHM_DIR)


def _remove_orphans():
    """Regions of this user's processes that died without removing theirs."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return
    for entry in entries:
        m = _ORPHAN.match(entry)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(SHM_DIR, entry)
        try:
            st = os.lstat(path)
            if st.st_uid == os.getuid() and (st.st_mode & 0o170000) == 0o100000:
                os.unlink(path)
        except OSError:
            pass


class SharedRing:
    """One ring, used by one stream at a time (streams reuse it one after another)."""

    def __init__(self, capacity=16 << 20):
        if capacity < MIN_CAPACITY:
            raise ValueError(f"a shared ring needs at least {MIN_CAPACITY} bytes")
        _remove_orphans()
        self.capacity = capacity
        self.key = os.urandom(KEY_BYTES)
        self.name = f"/attnscope-{os.getpid()}-{os.urandom(8).hex()}"
        self._path = SHM_DIR + self.name
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            self._map = mmap.mmap(fd, HEADER_BYTES + capacity)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)
        self._map[0:8] = MAGIC
        struct.pack_into("<I", self._map, 8, VERSION)
        struct.pack_into("<Q", self._map, 16, capacity)
        self._map[24:24 + KEY_BYTES] = self.key
        # The read position is published with one aligned 8-byte store (struct.pack_into would
        # zero the field first, and the server could read that 0).
        self._read_word = np.frombuffer(self._map, dtype="<u8", count=1, offset=READ_AT)
        self.released = 0

    def request_field(self):
        return pb.SharedOutput(name=self.name, capacity=self.capacity, key=self.key)

    def take(self, chunk):
        """(values, indices) bytes of an attention chunk announced in the ring; then released."""
        n_values, n_indices = chunk.shared_bytes, chunk.shared_index_bytes
        position = chunk.shared_position
        n = n_values + n_indices
        if (chunk.data or chunk.indices or n_values < 0 or n_indices < 0 or n > self.capacity
                or position < self.released or position > (1 << 62)
                or position + n - self.released > self.capacity
                or position % self.capacity + n > self.capacity):
            raise ValueError(f"malformed stream from the server: a shared piece at {position} of {n} bytes "
                             f"is outside the ring (capacity {self.capacity}, released up to {self.released})")
        offset = HEADER_BYTES + position % self.capacity
        values = self._map[offset:offset + n_values]
        indices = self._map[offset + n_values:offset + n]
        self.released = position + n
        self._read_word[0] = self.released
        return values, indices

    def close(self):
        if self._map is not None:
            self._read_word = None
            self._map.close()
            self._map = None
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
