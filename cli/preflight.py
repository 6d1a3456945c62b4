"""Checks made before any process starts, so a misconfiguration is one line and exit 1, not a traceback
from deep inside a worker or a model host that crash-loops."""

from __future__ import annotations

import errno
import json
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_SAFETENSORS_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ConfigError(Exception):
    """A setting the server cannot start with; its message is the one line the user sees."""


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Like the server's own socket: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use (another server?)") from exc
            if exc.errno == errno.EACCES:
                raise ConfigError(f"no permission to listen on port {port} of {host}") from exc
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _check_safetensors(path: Path) -> None:
    """The header of a safetensors file, and that the file is as long as the header says."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConfigError(f"{path} is not a safetensors file (truncated)")
            (size,) = struct.unpack("<Q", raw)
            if size > _SAFETENSORS_MAX_HEADER_BYTES:
                raise ConfigError(f"{path} is not a safetensors file (bad header)")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file (bad header)")
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
        default=0,
    )
    if path.stat().st_size < 8 + size + end:
        raise ConfigError(f"{path} is truncated: its tensors end past the end of the file")


def check_model_folder(folder: Path, *, weights: bool = True) -> None:
    """What the server needs from a model folder: a config, a fast tokenizer and sound weights."""
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json: not a transformers model folder")
    _read_json(folder / "config.json")
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{folder} has no tokenizer.json (hfserve needs a fast tokenizer)")
    try:
        Tokenizer.from_file(str(tok))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
        raise ConfigError(f"{tok} is not a readable tokenizer") from exc
    if not weights:
        return
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        missing = sorted(n for n in names if not (folder / str(n)).is_file())
        if missing:
            raise ConfigError(f"{folder} lacks weight shards named by its index: {', '.join(missing[:3])}")
    if not shards and not any(folder.glob("*.bin")):
        raise ConfigError(f"{folder} has no weights (*.safetensors)")
    for shard in shards:
        _check_safetensors(shard)


def check_device(device: str) -> None:
    """The device names torch knows, and, for an accelerator, that this build of torch can use it.
    That needs torch, which the main process never imports: a short child process asks."""
    if not _DEVICE.match(device):
        raise ConfigError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if device in ("auto", "cpu"):
        return
    kind, _, index = device.partition(":")
    probe = (
        "import torch,sys\n"
        f"kind, index = {kind!r}, {int(index or 0)}\n"
        "if kind == 'mps':\n"
        "    ok = torch.backends.mps.is_available()\n"
        "else:\n"
        "    ok = torch.cuda.is_available() and index < torch.cuda.device_count()\n"
        "print(torch.__version__, torch.cuda.device_count() if kind == 'cuda' else '')\n"
        "sys.exit(0 if ok else 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode == 3:
        version, _, count = proc.stdout.strip().partition(" ")
        if kind == "mps":
            raise ConfigError(f"--device mps: this build of torch ({version}) has no MPS support here")
        if count and count != "0":
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s)")
        raise ConfigError(
            f"--device {device}: this build of torch ({version}) cannot use CUDA here "
            "(a CPU build, or no GPU or driver)"
        )
    if proc.returncode != 0:
        raise ConfigError(f"--device {device}: torch could not be imported to check it")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device: str, device_map: str, tp_size: int, idle_unload_s: float = 0.0) -> None:
    """``--device-map`` and ``--tp``: each possible here, and not both. A device map needs
    accelerate; tensor parallelism needs ``tp_size`` CUDA devices (or ``--device cpu``, where the
    ranks talk over gloo: slow, but it runs the same path anywhere)."""
    if device_map and device_map not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {device_map!r}: use {', '.join(DEVICE_MAPS)}")
    if device_map and tp_size > 1:
        raise ConfigError("--device-map and --tp are two ways to spread a model: choose one")
    if device_map:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ConfigError("--device-map needs accelerate: pip install 'hfserve[multi-device]'")
        if device != "auto":
            raise ConfigError(f"--device-map places the model itself: leave --device at auto, not {device}")
    if tp_size <= 1:
        return
    if idle_unload_s:  # a clock deciding an unload would differ between the ranks
        raise ConfigError("--idle-unload-s cannot be used with --tp: the ranks must unload together")
    if device == "cpu":
        return
    if device != "auto" and device != "cuda":
        raise ConfigError(f"--tp {tp_size} uses GPUs 0 to {tp_size - 1}: leave --device at auto (or cpu)")
    probe = "import torch\nprint(torch.cuda.device_count() if torch.cuda.is_available() else 0)\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    try:
        count = int(proc.stdout.strip())
    except ValueError as exc:
        raise ConfigError(f"--tp {tp_size}: torch could not be imported to count the GPUs") from exc
    if count < tp_size:
        raise ConfigError(
            f"--tp {tp_size}: tensor parallelism needs {tp_size} CUDA devices, this machine has {count}"
        )
