"""Run a LinkProxy in its own process: `python -m deploy.link PROFILE --upstream HOST:PORT`.

Prints `listening HOST:PORT` on the first line of stdout, forwards until SIGINT or
SIGTERM, then prints the byte counters as JSON. A separate process keeps the proxy's
timing free of the measuring process's GIL.

With --control, stdin is a command channel (deploy.link.process.ProxyProcess): each line
`stats` is answered with one JSON line of counters, and end of input stops the proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading

from deploy.link.netns import die_with_parent, enter, raise_priority
from deploy.link.profiles import LinkProfile, get_profile
from deploy.link.proxy import LinkProxy
from splitedge.errors import SplitedgeError


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.link", description=__doc__)
    parser.add_argument("profile", help="profile name from deploy/links.toml (or --links FILE)")
    parser.add_argument(
        "--upstream", type=_host_port, required=True, help="HOST:PORT to forward to"
    )
    parser.add_argument("--links", default=None, help="TOML file of link profiles")
    parser.add_argument("--profile-json", default=None, help="the profile itself, as JSON")
    parser.add_argument("--listen", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--seed", type=int, default=0, help="jitter seed")
    parser.add_argument(
        "--no-rate", action="store_true", help="delay and jitter only (a qdisc shapes the rate)"
    )
    parser.add_argument(
        "--no-delay", action="store_true", help="no delay or jitter either: count bytes only"
    )
    parser.add_argument("--netns", default=None, help="run inside this network namespace")
    parser.add_argument("--control", action="store_true", help="stdin command channel")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the proxy until signalled, print its counters."""
    args = _parser().parse_args(argv)
    try:
        if args.profile_json:
            profile = LinkProfile(**json.loads(args.profile_json))
        else:
            profile = get_profile(args.profile, args.links)
    except (SplitedgeError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_delay:
        profile = dataclasses.replace(profile, delay_ms=0.0, jitter_ms=0.0)
    if args.netns:
        enter(args.netns)  # before any socket exists; threads started later inherit it
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    proxy = LinkProxy(
        profile,
        args.upstream,
        listen_host=args.listen,
        seed=args.seed,
        shape_rate=not (args.no_rate or args.no_delay),
    )
    with proxy:
        print(f"listening {proxy.address}", flush=True)
        if args.control:
            die_with_parent()
            raise_priority()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
            threading.Thread(target=_serve_control, args=(proxy, stop), daemon=True).start()
        while not stop.wait(0.5):
            pass
        print(json.dumps({"profile": profile.name, **proxy.stats()}), flush=True)
    return 0


def _serve_control(proxy: LinkProxy, stop: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(proxy.stats()), flush=True)
    stop.set()  # stdin closed: the parent is done with us (or gone)


if __name__ == "__main__":
    sys.exit(main())
