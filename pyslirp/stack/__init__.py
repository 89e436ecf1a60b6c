"""Stack layer: sans-I/O protocol engines.

Nothing here imports asyncio, socket, os or reads a clock. Engines take
frames, host events and ``now`` (float seconds, monotonic, supplied by the
caller) in, and give out frames (through :class:`pyslirp.stack.link.Link`),
host actions (through the :class:`pyslirp.stack.host.HostPort` the runtime
implements) and deadlines (through :class:`pyslirp.stack.timers.Timers`).
Tests drive them with a fake link, a fake host and a fake clock.
"""
