"""What crosses processes: every message through the one codec, and the IPC package's boundary
(the HTTP workers import ``model_host.ipc``, so it must import nothing else of the model host and
no torch). The scheduler and runners are tested in ``test_host_units.py``."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from model_host.ipc import codec
from model_host.ipc.messages import (
    AbortRequest,
    AddRequest,
    Embed,
    ErrorInfo,
    ErrorKind,
    FinishReason,
    Generate,
    HostMessage,
    SamplingParams,
    TokenFrame,
    TokenLogprob,
    UnloadModels,
    WorkerReset,
)

IPC = Path(__file__).resolve().parent.parent / "model_host" / "ipc"

# Every field away from its default, so a field the codec dropped or mixed up shows.
_SAMPLING = SamplingParams(
    max_new_tokens=17,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=2**63 - 1,
    presence_penalty=0.5,
    frequency_penalty=-0.25,
    repetition_penalty=1.1,
    logprobs=3,
    prompt_logprobs=0,
    grammar='start: "a" | "b"',
    logit_bias=((5, -100.0), (7, 2.5)),
    stop_token_ids=(2, 0),
)

MESSAGES: list[HostMessage] = [
    AddRequest(1, 0, 3, "/models/demo", Generate((1, 2, 3), _SAMPLING)),
    AddRequest(2**40, 7, 0, "/models/é", Generate((0,), SamplingParams(max_new_tokens=0))),
    AddRequest(3, 1, 1, "/models/minilm", Embed(((101, 2000, 102), (101, 102)))),
    AbortRequest(9, 2),
    WorkerReset(3),
    UnloadModels(11, 0),
]

FRAMES: list[TokenFrame] = [
    TokenFrame(1),
    TokenFrame(2, (5,), FinishReason.NONE, cached_tokens=31),
    TokenFrame(3, (6, 7), FinishReason.STOP, logprobs=(TokenLogprob(-0.5, ((6, -0.5), (9, -1.25))),) * 2),
    TokenFrame(4, (), FinishReason.LENGTH, logprobs=()),
    TokenFrame(5, (), FinishReason.ERROR, ErrorInfo(ErrorKind.OVERLOADED, "the server is busy ✓")),
    TokenFrame(6, (), FinishReason.NONE, vector=b"\x00\x00\x80?" * 384, index=12),
    TokenFrame(7, (), FinishReason.STOP, vector=b"", index=0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: HostMessage) -> None:
    decoded = codec.decode_message(codec.encode(message))
    assert decoded == message and type(decoded) is type(message)
    if isinstance(message, AddRequest):
        assert isinstance(decoded, AddRequest) and decoded.task is message.task
        assert type(decoded.payload) is type(message.payload)


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: str(f.request_id))
def test_frames_round_trip(frame: TokenFrame) -> None:
    raw = codec.encode(frame)
    assert codec.decode_frame(raw) == frame
    assert codec.decode_frame(memoryview(raw)) == frame  # as the ring hands them out


def test_a_prompt_frame_keeps_its_nan_first_logprob() -> None:
    frame = TokenFrame(
        8, (11, 12), logprobs=(TokenLogprob(math.nan), TokenLogprob(-2.0, ((12, -2.0),))), prompt=True
    )
    decoded = codec.decode_frame(codec.encode(frame))
    assert decoded.prompt and decoded.token_ids == (11, 12)
    assert decoded.logprobs is not None and math.isnan(decoded.logprobs[0].logprob)
    assert decoded.logprobs[1] == TokenLogprob(-2.0, ((12, -2.0),))
    assert isinstance(decoded.finish_reason, FinishReason) and isinstance(decoded.logprobs[1].top[0][0], int)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # a byte MessagePack never uses
        b"\x93\x01\x02",  # an array cut short
        codec.encode(MESSAGES[0])[:-3],
        msgspec.msgpack.encode({"kind": 99, "request_id": 1}),  # no such message
        msgspec.msgpack.encode({"kind": 2, "request_id": "1", "worker_index": 0}),  # wrong type
        msgspec.msgpack.encode([5, 1, [], 9]),  # a frame with an unknown finish reason
        msgspec.msgpack.encode([5, 1, [], 0, [99, "x"]]),  # an unknown error kind
    ],
)
def test_undecodable_bytes_raise_decode_error(raw: bytes) -> None:
    for decode in (codec.decode_message, codec.decode_frame):
        with pytest.raises(codec.DecodeError):
            decode(raw)


def test_messages_and_frames_do_not_pass_for_each_other() -> None:
    with pytest.raises(codec.DecodeError):
        codec.decode_frame(codec.encode(AbortRequest(1, 0)))
    with pytest.raises(codec.DecodeError):
        codec.decode_message(codec.encode(FRAMES[2]))


# -- the import boundary of model_host.ipc -------------------------------------------------------


def _imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module ``source`` imports, at any depth (inside functions too), as absolute names;
    ``from pkg import name`` counts as ``pkg.name`` as well, since ``name`` may be a module."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _outside_ipc(names: set[str]) -> set[str]:
    return {
        n
        for n in names
        if n.split(".")[0] == "model_host" and not n.startswith("model_host.ipc") and n != "model_host"
    }


def test_the_import_scan_sees_nested_and_relative_imports() -> None:
    source = (
        "import msgspec\n"
        "def late():\n"
        "    from model_host.engine import Engine\n"
        "    from .. import registry\n"
        "    from . import ring\n"
        "class C:\n"
        "    def m(self):\n"
        "        import model_host.batch as b\n"
    )
    names = _imported_modules(source, "model_host.ipc.example", is_package=False)
    assert _outside_ipc(names) == {
        "model_host.engine",
        "model_host.engine.Engine",
        "model_host.registry",
        "model_host.batch",
    }
    assert "model_host.ipc.ring" in names and "msgspec" in names


def test_ipc_imports_nothing_else_of_the_model_host() -> None:
    files = sorted(IPC.rglob("*.py"))
    assert len(files) >= 10  # the scan found the package
    for path in files:
        rel = path.relative_to(IPC.parent.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parent.parts if is_package else rel.parts)
        names = _imported_modules(path.read_text(), module, is_package)
        assert not _outside_ipc(names), f"{path.name} imports {sorted(_outside_ipc(names))}"
        assert not {n for n in names if n.split(".")[0] == "torch"}, f"{path.name} imports torch"


def test_importing_all_of_ipc_loads_no_torch() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import model_host.ipc\n"
        "names = [m.name for m in pkgutil.walk_packages(model_host.ipc.__path__, 'model_host.ipc.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({\n"
        "    'imported': names,\n"
        "    'torch': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')),\n"
        "    'host': sorted(m for m in sys.modules if m.startswith('model_host.')\n"
        "                   and not m.startswith('model_host.ipc')),\n"
        "    'msgspec': 'msgspec' in sys.modules,\n"
        "}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert len(seen["imported"]) == len(list(IPC.rglob("*.py"))) - 1  # every module but __init__
    assert seen["msgspec"]  # the check sees what was imported
    assert seen["torch"] == [] and seen["host"] == []
