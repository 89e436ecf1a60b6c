"""pyslirp: a pure-Python userspace network stack for rootless containers and VMs."""

__version__ = "0.1.0"
