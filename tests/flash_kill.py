"""Run `splitedge flash` and SIGKILL it (with its ssh children) at one point after the switch.

    python -m tests.flash_kill POINT MARK_FILE flash --host ...

POINT: after-switch (before the health gate starts), mid-gate (one second into the device's
health check), before-commit (the gate passed, the confirmation not yet sent), or mark-gate
(no kill: MARK_FILE appears when the device's health check starts, for a network cut).
The flasher runs unchanged; only the moment of its death is chosen. MARK_FILE records it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from deploy.flash import flasher, gate


def main() -> int:
    point, mark = sys.argv[1], Path(sys.argv[2])

    def die() -> None:
        mark.write_text(point)
        os.killpg(0, signal.SIGKILL)  # the flasher and its ssh: a host that just went away

    if point == "after-switch":
        flasher.confirm = lambda *a, **k: die()  # type: ignore[assignment]
    elif point in ("mid-gate", "mark-gate"):
        health = gate.device_health

        def device_health(*a: Any, **k: Any) -> dict[str, Any]:
            if point == "mid-gate":
                threading.Timer(1.0, die).start()
            else:
                mark.write_text(point)
            return health(*a, **k)

        gate.device_health = device_health  # type: ignore[assignment]
    elif point == "before-commit":
        op = gate.Transport.op

        def op_or_die(self: Any, name: str, *a: Any, **k: Any) -> dict[str, Any]:
            if name == "commit":
                die()
            return op(self, name, *a, **k)

        gate.Transport.op = op_or_die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown point {point}")
    from splitedge.cli import main as cli

    return cli(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
