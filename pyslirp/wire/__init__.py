"""Wire layer: stateless header views and builders.

Theory of operation
-------------------
Each module here describes one header. A *view* wraps a ``memoryview`` (no
copy), checks its length once in the constructor and raises
:class:`MalformedPacket` if the buffer cannot hold the header; the fixed
fields are read with a single precompiled ``Struct.unpack_from``. A *builder*
writes a header into a caller's buffer with ``Struct.pack_into``.

Nothing in this package knows about flows, time or sockets, and it imports
nothing else of pyslirp. Addresses are kept as 4-byte ``bytes`` (cheap to hash
and compare); conversion to text happens at the edges.
"""

from pyslirp.wire.errors import MalformedPacket

__all__ = ["MalformedPacket"]
