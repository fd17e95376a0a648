from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ChallengeRequest(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: bytes
    def __init__(self, cluster_id: _Optional[bytes] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("cluster_id", "nonce", "csr_der", "proof")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    cluster_id: bytes
    nonce: bytes
    csr_der: bytes
    proof: bytes
    def __init__(self, cluster_id: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., csr_der: _Optional[bytes] = ..., proof: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "certificate_der", "ca_certificate_der")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_DER_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    certificate_der: bytes
    ca_certificate_der: bytes
    def __init__(self, node_id: _Optional[int] = ..., certificate_der: _Optional[bytes] = ..., ca_certificate_der: _Optional[bytes] = ...) -> None: ...
