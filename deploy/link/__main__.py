"""Run a LinkProxy in its own process: `python -m deploy.link PROFILE --upstream HOST:PORT`.

Prints `listening HOST:PORT` on the first line of stdout, forwards until SIGINT or
SIGTERM, then prints the byte counters as JSON. A separate process keeps the proxy's
timing free of the measuring process's GIL.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from deploy.link.profiles import get_profile
from deploy.link.proxy import LinkProxy
from splitedge.errors import SplitedgeError


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the proxy until signalled, print its counters."""
    parser = argparse.ArgumentParser(prog="python -m deploy.link", description=__doc__)
    parser.add_argument("profile", help="profile name from deploy/links.toml (or --links FILE)")
    parser.add_argument(
        "--upstream", type=_host_port, required=True, help="HOST:PORT to forward to"
    )
    parser.add_argument("--links", default=None, help="TOML file of link profiles")
    parser.add_argument("--listen", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--seed", type=int, default=0, help="jitter seed")
    args = parser.parse_args(argv)
    try:
        profile = get_profile(args.profile, args.links)
    except SplitedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LinkProxy(profile, args.upstream, listen_host=args.listen, seed=args.seed) as proxy:
        print(f"listening {proxy.address}", flush=True)
        while not stop.wait(0.5):
            pass
        print(json.dumps({"profile": profile.name, **proxy.stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
