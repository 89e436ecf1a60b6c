"""The runtime: the only layer that touches file descriptors, namespaces and the event loop."""
