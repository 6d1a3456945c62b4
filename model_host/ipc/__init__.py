"""IPC between HTTP workers and the model host. Imports no torch: workers import this package."""

from model_host.ipc.channels import Channels, HostSide, WorkerSide, create_channels
from model_host.ipc.client import HostClient, RequestStream
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    Embed,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    Generate,
    MessageKind,
    SamplingParams,
    Task,
    TokenFrame,
    Transcribe,
    UnloadModels,
)
from model_host.ipc.ring import FrameTooLarge, RingBuffer

__all__ = [
    "AbortRequest",
    "AddRequest",
    "Channels",
    "Embed",
    "ErrorInfo",
    "ErrorKind",
    "FinishReason",
    "FrameTooLarge",
    "Generate",
    "HostClient",
    "HostSide",
    "MessageKind",
    "RequestStream",
    "RingBuffer",
    "SamplingParams",
    "Task",
    "TokenFrame",
    "Transcribe",
    "UnloadModels",
    "WorkerSide",
    "create_channels",
]
