"""IPC between HTTP workers and the model host. Imports no torch: workers import this package."""

from model_host.ipc.channels import Channels, HostSide, WorkerSide, create_channels
from model_host.ipc.client import HostClient, RequestStream
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    MessageKind,
    SamplingParams,
    TokenFrame,
    UnloadModels,
)
from model_host.ipc.ring import FrameTooLarge, RingBuffer

__all__ = [
    "AbortRequest",
    "AddRequest",
    "Channels",
    "ErrorInfo",
    "ErrorKind",
    "FinishReason",
    "FrameTooLarge",
    "HostClient",
    "HostSide",
    "MessageKind",
    "RequestStream",
    "RingBuffer",
    "SamplingParams",
    "TokenFrame",
    "UnloadModels",
    "WorkerSide",
    "create_channels",
]
