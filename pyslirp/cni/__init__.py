"""The ``slirp`` CNI plugin: pyslirp networking for CNI runtimes, without external binaries.

Two processes share the work:

* :mod:`pyslirp.cni.plugin` is the executable the runtime runs once per verb
  (``cni/slirp``, or the file ``pyslirp cni install DIR`` writes). It imports
  only ``json``, ``os``, ``socket`` and ``sys`` so that it starts in a few
  milliseconds, validates the request, and talks to
* :mod:`pyslirp.cni.daemon`, one engine process per runtime directory that
  serves every attached container's TAP device from one event loop, started on
  demand and gone when the last attachment is deleted.

This module stays empty on purpose: the plugin imports the package on every
invocation, so nothing here may cost import time.
"""
