"""KubeVirt's hook gRPC API (Info and Callbacks v1alpha1..3) as protobuf descriptors.

Theory of operation
-------------------
virt-launcher talks to hook sidecars over gRPC on Unix sockets in
``/var/run/kubevirt-hooks``: ``kubevirt.hooks.info.Info/Info`` first, then
the ``kubevirt.hooks.<version>.Callbacks`` methods of the newest version the
sidecar lists. The wire contract is the package, service, method, message and
field names and numbers in KubeVirt's ``pkg/hooks/**/api_*.proto``; the
``proto/`` directory next to this module holds those definitions.

Rather than shipping protoc-generated ``_pb2`` modules (which pin the
protobuf runtime to the generator's version) or needing grpcio-tools at run
time, the same definitions are written below as ``FileDescriptorProto``
tables and turned into message classes in a private descriptor pool (so a
program that also loads KubeVirt's generated modules sees no clash). The
tests compile ``proto/*.proto`` with protoc and check that both describe the
same thing, field for field, and drive the server with a client generated
from those files.

:data:`SERVICES` maps each full service name to its methods as
``(request class, response class)``; ``pyslirp.kubevirt.sidecar`` registers
handlers for them with ``grpc.method_handlers_generic_handler``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

#: Hook point names virt-launcher knows (pkg/hooks/info).
ON_DEFINE_DOMAIN = "OnDefineDomain"
PRE_CLOUD_INIT_ISO = "PreCloudInitIso"
SHUTDOWN = "Shutdown"
VERSIONS = ("v1alpha1", "v1alpha2", "v1alpha3")

_F = descriptor_pb2.FieldDescriptorProto
_BYTES, _STRING, _INT32, _MESSAGE = _F.TYPE_BYTES, _F.TYPE_STRING, _F.TYPE_INT32, _F.TYPE_MESSAGE
_ONE, _MANY = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# (message, [(field, number, type, label, message type name or "")])
_Fields = list[tuple[str, int, int, int, str]]
_ON_DEFINE: list[tuple[str, _Fields]] = [
    ("OnDefineDomainParams", [("domainXML", 1, _BYTES, _ONE, ""), ("vmi", 2, _BYTES, _ONE, "")]),
    ("OnDefineDomainResult", [("domainXML", 1, _BYTES, _ONE, "")]),
]
_CLOUD_INIT: list[tuple[str, _Fields]] = [
    ("PreCloudInitIsoParams", [("cloudInitNoCloudSource", 1, _BYTES, _ONE, ""),
                               ("vmi", 2, _BYTES, _ONE, ""),
                               ("cloudInitData", 3, _BYTES, _ONE, "")]),
    ("PreCloudInitIsoResult", [("cloudInitNoCloudSource", 1, _BYTES, _ONE, ""),
                               ("cloudInitData", 3, _BYTES, _ONE, "")]),
]
_SHUTDOWN: list[tuple[str, _Fields]] = [("ShutdownParams", []), ("ShutdownResult", [])]

# file name, package, messages, service name, [(method, request, response, deprecated)]
_Methods = list[tuple[str, str, str, bool]]
_FILES: list[tuple[str, str, list[tuple[str, _Fields]], str, _Methods]] = [
    ("api_info.proto", "kubevirt.hooks.info", [
        ("InfoParams", []),
        ("InfoResult", [("name", 1, _STRING, _ONE, ""),
                        ("hookPoints", 3, _MESSAGE, _MANY, ".kubevirt.hooks.info.HookPoint"),
                        ("versions", 4, _STRING, _MANY, "")]),
        ("HookPoint", [("name", 1, _STRING, _ONE, ""), ("priority", 2, _INT32, _ONE, "")]),
    ], "Info", [("Info", "InfoParams", "InfoResult", False)]),
    ("api_v1alpha1.proto", "kubevirt.hooks.v1alpha1", _ON_DEFINE, "Callbacks", [
        ("OnDefineDomain", "OnDefineDomainParams", "OnDefineDomainResult", True),
    ]),
    ("api_v1alpha2.proto", "kubevirt.hooks.v1alpha2", _ON_DEFINE + _CLOUD_INIT, "Callbacks", [
        ("OnDefineDomain", "OnDefineDomainParams", "OnDefineDomainResult", True),
        ("PreCloudInitIso", "PreCloudInitIsoParams", "PreCloudInitIsoResult", True),
    ]),
    ("api_v1alpha3.proto", "kubevirt.hooks.v1alpha3", _ON_DEFINE + _CLOUD_INIT + _SHUTDOWN,
     "Callbacks", [
         ("OnDefineDomain", "OnDefineDomainParams", "OnDefineDomainResult", False),
         ("PreCloudInitIso", "PreCloudInitIsoParams", "PreCloudInitIsoResult", False),
         ("Shutdown", "ShutdownParams", "ShutdownResult", False),
     ]),
]


def file_descriptors() -> list[descriptor_pb2.FileDescriptorProto]:
    """The four API files as protoc would describe them (without source comments)."""
    files = []
    for name, package, messages, service, methods in _FILES:
        fd = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
        for message, fields in messages:
            m = fd.message_type.add(name=message)
            for fname, number, ftype, label, type_name in fields:
                f = m.field.add(name=fname, number=number, type=ftype, label=label,
                                json_name=fname)
                if type_name:
                    f.type_name = type_name
        s = fd.service.add(name=service)
        for method, request, response, deprecated in methods:
            meth = s.method.add(name=method, input_type=f".{package}.{request}",
                                output_type=f".{package}.{response}")
            if deprecated:
                meth.options.deprecated = True
        files.append(fd)
    return files


def _message_class(descriptor: Any) -> Any:
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:
        return get(descriptor)
    return message_factory.MessageFactory().GetPrototype(descriptor)  # protobuf < 4.22


def _build() -> tuple[dict[str, Any], dict[str, dict[str, tuple[Any, Any]]]]:
    pool = descriptor_pool.DescriptorPool()
    messages: dict[str, Any] = {}
    services: dict[str, dict[str, tuple[Any, Any]]] = {}
    for fd in file_descriptors():
        pool.Add(fd)
        for message in fd.message_type:
            full = f"{fd.package}.{message.name}"
            messages[full] = _message_class(pool.FindMessageTypeByName(full))
        for service in fd.service:
            services[f"{fd.package}.{service.name}"] = {
                m.name: (messages[m.input_type[1:]], messages[m.output_type[1:]])
                for m in service.method
            }
    return messages, services


#: Message classes by full name, e.g. ``MESSAGES["kubevirt.hooks.info.InfoResult"]``.
#: Service methods by full service name: ``{"Info": (InfoParams, InfoResult)}``.
MESSAGES, SERVICES = _build()
