"""KubeVirt integration: the slirp network binding's hook sidecar (``pyslirp kubevirt-sidecar``)."""
