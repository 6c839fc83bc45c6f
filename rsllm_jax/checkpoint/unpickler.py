"""The base of every restricted unpickler here: allocations bounded by the file's size.

CPython's C unpickler trusts sizes a file declares: a memo index of 2^27 in an 8-byte pickle
makes it allocate a 2 GiB memo array, and a BYTEARRAY8 header allocates the length it names
before reading it. Python's own unpickler keeps its memo in a dict; `BoundedUnpickler` uses it,
with BYTEARRAY8 checked against the bytes left in the file. It is slower (about 1 s per 2 MB
pickle), which reading a few data files or a checkpoint affords.
"""

import io
import pickle
import struct


class BoundedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
    """`pickle._Unpickler` over `data` (bytes); subclasses restrict `find_class`."""

    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self._size = len(data)

    def load_bytearray8(self):
        (size, ) = struct.unpack("<Q", self.read(8))
        if size > self._size:
            raise pickle.UnpicklingError(f"a bytearray of {size} bytes in a pickle of "
                                         f"{self._size}")
        data = bytearray(size)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
