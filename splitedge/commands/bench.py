"""`splitedge bench ...`: side-by-side benchmarks. `bench encoder`: encoder backends vs torch;
`bench server` (bench_server.py): the policy server vs a naive SB3 server."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import add_env_options, env_kwargs
from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

ENCODER_BACKENDS = "ort,gl33,es31,es2,torch"
GL_TARGETS = ("gl33", "es31", "es2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="side-by-side benchmarks: encoder backends, and the policy server"
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for add in SUBCOMMANDS:
        add(bsub)


def _register_encoder(bsub: argparse._SubParsersAction) -> None:
    e = bsub.add_parser(
        "encoder",
        help="ms per frame and frames/s of every encoder backend and torch",
        description="Time each encoder backend and torch on the CPU side by side in one run "
        "(interleaved rounds, median), at each batch size; the GL path's fixed per-frame cost "
        "on a 1-layer net; and, on observations of the bundle's env (--env, else the one it "
        "records), how often each backend gives torch's features and the head's action. "
        "--episodes adds closed-loop returns.",
    )
    e.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    e.add_argument(
        "--backends",
        "--backend",
        dest="backends",
        default=ENCODER_BACKENDS,
        help="comma-separated from auto, ort, gl33, es31, es2, torch (default: %(default)s)",
    )
    e.add_argument(
        "--batch", default="1,8", help="comma-separated batch sizes (default: %(default)s)"
    )
    e.add_argument(
        "--seconds",
        type=float,
        default=1.5,
        help="timing budget per backend and batch size (default: %(default)s)",
    )
    e.add_argument(
        "--profile",
        default=None,
        help="apply a device profile's limits (deploy/devices) to the GL backends",
    )
    e.add_argument(
        "--agreement",
        type=int,
        default=200,
        help="env observations for the feature/action agreement check (default: %(default)s)",
    )
    e.add_argument(
        "--episodes",
        type=int,
        default=0,
        help="closed-loop episodes per backend for mean return (default: %(default)s)",
    )
    add_env_options(e)
    e.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    e.set_defaults(func=run_encoder)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_register_encoder,)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise SplitedgeError(f"{what} must be comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise SplitedgeError(f"{what} must be integers >= 1, got {text!r}")
    return values


def _torch_encoder(bundle: Any) -> tuple[Callable[[Any], Any], str]:
    """torch reference: MiniConv with the bundle's weights, uint8 in, features out in the
    bundle's dtype (uint8 quantised, or float32 as they are), as encoder.onnx."""
    try:
        import torch

        from models.encoders import MiniConv
    except ImportError as e:
        raise SplitedgeError(
            f"the torch row needs the train extra ({e}); drop torch from --backends"
        ) from e
    from splitedge.ir import EncoderIR, load_weights

    torch.set_num_threads(1)  # like the ort backend: one core, as on a device sharing its few
    enc = bundle.policy["encoder"]
    ir = EncoderIR.from_json(bundle.file(enc["ir"]).read_text())
    model = MiniConv.from_weights(ir, load_weights(bundle.file(enc["weights"])))
    quantised = str(enc["output"]["dtype"]) == "uint8"

    def encode(obs: Any) -> Any:
        with torch.inference_mode():
            x = torch.from_numpy(obs).to(torch.float32) * ir.input_scale
            features = model.net(x).flatten(1)  # (B, F) float32
            return (model.quant.to_uint8(features) if quantised else features).numpy()

    return (
        encode,
        f"torch {torch.__version__} eager on the CPU, {torch.get_num_threads()} thread(s)",
    )


def run_encoder(args: argparse.Namespace) -> int:
    from edge.encoder import bench
    from edge.encoder.calibrate import env_frames
    from edge.encoder.ort import cpu_session
    from edge.envs import make_policy_env, policy_env_spec
    from splitedge.bundle import load_bundle

    batches = _ints(args.batch, "--batch")
    bundle = load_bundle(args.bundle)
    policy, kwargs = bundle.policy, env_kwargs(args.env_kwargs)
    env_name = policy_env_spec(policy, args.env, kwargs)[0]
    env = make_policy_env(policy, args.env, kwargs, seed=0)  # a wrong env: refused before timing
    limits = None
    if args.profile:
        from deploy.devices import load_profile

        limits = load_profile(args.profile).limits()
    encoders, reasons, closers = _start_backends(bundle, args.backends, limits)
    frames = env_frames(env, max(64, 4 * max(batches)), seed=0)
    try:
        speed = bench.speed_rows(encoders, frames, batches, args.seconds)
        targets = [n for n in encoders if n in GL_TARGETS]
        overhead = bench.gl_overhead_rows(bundle_ir(bundle), targets, frames, args.seconds, limits)
        fidelity = []
        if args.agreement > 0:
            head = cpu_session(bundle.file(policy["head"]["onnx"]))
            reference = "torch" if "torch" in encoders else next(iter(encoders))
            obs = env_frames(env, args.agreement, seed=1)
            fidelity = bench.fidelity_rows(encoders, reference, head, obs, env, args.episodes)
    finally:
        env.close()
        for enc in closers:
            enc.close()
    result: dict[str, Any] = {
        "bundle": f"{bundle.name} {bundle.version}",
        "env": env_name,
        "profile": args.profile,
        "backends": reasons,
        "speed": speed,
        "gl_fixed_overhead": overhead,
        "fidelity": fidelity,
    }
    by = {(r["backend"], r["batch"]): r["frames_per_s"] for r in speed}
    if ("ort", 1) in by and ("torch", 1) in by:
        result["ort_vs_torch_fps_batch1"] = by[("ort", 1)] / by[("torch", 1)]
    emit(result, args.json, _text(result, args.agreement))
    return 0


def _start_backends(
    bundle: Any, names: str, limits: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Any]]:
    """(encode callables, a reason row per backend, encoders to close); unavailable ones say why."""
    from edge.encoder import make_encoder

    encoders: dict[str, Callable[[Any], Any]] = {}
    reasons, closers = [], []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        try:
            if name == "torch":
                encoders[name], why = _torch_encoder(bundle)
            else:
                opts = {"limits": limits} if name in GL_TARGETS and limits else {}
                enc, why = make_encoder(bundle, name, **opts)
                encoders[name] = enc.encode
                closers.append(enc)
        except SplitedgeError as e:
            why = f"unavailable: {e}"
        reasons.append({"backend": name, "how": why})
    if not encoders:
        raise SplitedgeError("no encoder backend could be started (see above); try --backends ort")
    return encoders, reasons, closers


def _text(result: dict[str, Any], agreement: int) -> str:
    parts = [
        table(result["backends"], title=f"bench encoder: {result['bundle']}"),
        table(result["speed"], title="speed (median of interleaved rounds)"),
    ]
    if result["gl_fixed_overhead"]:
        parts.append(
            table(
                result["gl_fixed_overhead"],
                title="GL fixed per-frame cost: upload + 1 pass + readback, batch 1",
            )
        )
    if result["fidelity"]:
        parts.append(
            table(
                result["fidelity"],
                title=f"fidelity on {agreement} observations of {result['env']}",
            )
        )
    if "ort_vs_torch_fps_batch1" in result:
        parts.append(f"ort / torch frames/s at batch 1: {result['ort_vs_torch_fps_batch1']:.2f}x")
    return "\n\n".join(parts)


def bundle_ir(bundle: Any) -> Any:
    """The encoder IR of a policy bundle."""
    from splitedge.ir import EncoderIR

    return EncoderIR.from_json(bundle.file(bundle.policy["encoder"]["ir"]).read_text())
