"""pyslirp's hand-written descriptors describe exactly what KubeVirt's .proto files do."""

from __future__ import annotations

from types import SimpleNamespace

from google.protobuf import descriptor_pb2

from pyslirp.kubevirt import hookapi


def test_descriptors_equal_protoc_output(protos: SimpleNamespace) -> None:
    compiled = descriptor_pb2.FileDescriptorSet.FromString((protos.dir / "set.bin").read_bytes())
    theirs = {f.name: f for f in compiled.file}
    mine = {f.name: f for f in hookapi.file_descriptors()}
    assert mine.keys() == theirs.keys()
    for name, fd in mine.items():
        # Packages, messages, field names/numbers/types/labels, services, methods, options.
        assert fd == theirs[name], name


def test_messages_round_trip_with_generated_code(protos: SimpleNamespace) -> None:
    ours = hookapi.MESSAGES["kubevirt.hooks.v1alpha3.OnDefineDomainParams"](
        domainXML=b"<domain/>", vmi=b"{}")
    theirs = protos.api_v1alpha3_pb2.OnDefineDomainParams.FromString(ours.SerializeToString())
    assert (theirs.domainXML, theirs.vmi) == (b"<domain/>", b"{}")
    info = protos.api_info_pb2.InfoResult(name="x", versions=["v1alpha3"])
    info.hookPoints.add(name="Shutdown", priority=3)
    back = hookapi.MESSAGES["kubevirt.hooks.info.InfoResult"].FromString(info.SerializeToString())
    assert [(p.name, p.priority) for p in back.hookPoints] == [("Shutdown", 3)]


def test_services_and_methods() -> None:
    assert {s: sorted(m) for s, m in hookapi.SERVICES.items()} == {
        "kubevirt.hooks.info.Info": ["Info"],
        "kubevirt.hooks.v1alpha1.Callbacks": ["OnDefineDomain"],
        "kubevirt.hooks.v1alpha2.Callbacks": ["OnDefineDomain", "PreCloudInitIso"],
        "kubevirt.hooks.v1alpha3.Callbacks": ["OnDefineDomain", "PreCloudInitIso", "Shutdown"],
    }
