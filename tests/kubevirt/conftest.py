"""KubeVirt hook tests: a client generated from pyslirp/kubevirt/proto/*.proto at test time.

The generated modules (``api_info_pb2``, ``api_v1alpha3_pb2_grpc``, ...) are
what a Go or Python program built from KubeVirt's definitions would use; the
server under test never imports them (it builds its own descriptors), so a
client from these files talking to it is a real check of the wire contract.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "pyslirp" / "kubevirt" / "proto"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROTOS = ("api_info", "api_v1alpha1", "api_v1alpha2", "api_v1alpha3")


@pytest.fixture(scope="session")
def protos(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``protos.api_v1alpha3_pb2``, ``protos.api_v1alpha3_pb2_grpc``, ... and ``protos.dir``."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the test extra)")
    out = tmp_path_factory.mktemp("protos")
    files = [str(PROTO_DIR / f"{name}.proto") for name in PROTOS]
    status = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                          f"--grpc_python_out={out}",
                          f"--descriptor_set_out={out / 'set.bin'}", *files])
    assert status == 0, "protoc failed on pyslirp/kubevirt/proto/*.proto"
    sys.path.insert(0, str(out))
    modules = {"dir": out}
    for name in PROTOS:
        for suffix in ("_pb2", "_pb2_grpc"):
            modules[name + suffix] = importlib.import_module(name + suffix)
    return SimpleNamespace(**modules)


@pytest.fixture
def domain_xml() -> bytes:
    return (FIXTURES / "domain.xml").read_bytes()


@pytest.fixture
def vmi_json() -> bytes:
    return (FIXTURES / "vmi.json").read_bytes()
