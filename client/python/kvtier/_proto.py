"""Message classes of the connector protocol, built at import from the embedded descriptor set.

No generated code and no protoc: the classes come from `_descriptor.DESCRIPTOR_SET`, which a Rust
test keeps identical to `proto/kvtier/v1/connector.proto`.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ._descriptor import DESCRIPTOR_SET

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET).file:
    _pool.Add(_file)


def _message(name):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName("kvtier.v1." + name))


def _enum(name):
    return _pool.FindEnumTypeByName("kvtier.v1." + name)


Request = _message("Request")
Response = _message("Response")
NamespaceDescriptor = _message("NamespaceDescriptor")
KvTensor = _message("KvTensor")
KvLayerPlacement = _message("KvLayerPlacement")

ErrorCode = _enum("ErrorCode")
ReserveStatus = _enum("ReserveStatus")
Tier = _enum("Tier")

RESERVED = ReserveStatus.values_by_name["RESERVED"].number
PRESENT = ReserveStatus.values_by_name["PRESENT"].number
NO_SPACE = ReserveStatus.values_by_name["NO_SPACE"].number


def error_name(code):
    """The name of an ErrorCode number (e.g. "MALFORMED")."""
    value = ErrorCode.values_by_number.get(code)
    return value.name if value else str(code)
