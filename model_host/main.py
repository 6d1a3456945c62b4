"""Entry point of the model-host process, importable without torch.

The main process hands :func:`run_host` to Sanic's worker manager; torch is imported only inside the
spawned host process, so neither the main process nor the HTTP workers ever load it.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from model_host.ipc.channels import HostSide
from model_host.ipc.settings import HostSettings


def run_host(side: HostSide, settings: HostSettings) -> None:
    # A stop that arrives while torch is still being imported or a model loaded has nothing to
    # save: leave quietly (host_main installs the graceful handler once the host exists). SIGINT
    # is the terminal's Ctrl-C, sent to every process of the group: the main process drains the
    # server and then stops the host itself (with SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    from model_host.process import host_main

    host_main(side, settings)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)
