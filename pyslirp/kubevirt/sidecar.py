"""``pyslirp kubevirt-sidecar``: KubeVirt's hook gRPC server (work in progress)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("pyslirp: kubevirt-sidecar is not available yet", file=sys.stderr)
    return 1
