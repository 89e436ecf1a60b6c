"""The buffer types every layer passes payload in (no copy implied)."""

Buffer = bytes | bytearray | memoryview
