"""`splitedge bench ...`: side-by-side benchmarks. `bench encoder`: encoder backends vs torch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

ENCODER_BACKENDS = "ort,gl33,es31,es2,torch"
GL_TARGETS = ("gl33", "es31", "es2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks (encoder backends)")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for add in SUBCOMMANDS:
        add(bsub)


def _register_encoder(bsub: argparse._SubParsersAction) -> None:
    e = bsub.add_parser(
        "encoder",
        help="ms per frame and frames/s of every encoder backend and torch",
        description="Time each encoder backend and torch on the CPU side by side in one run "
        "(interleaved rounds, median), at each batch size; the GL path's fixed per-frame cost "
        "on a 1-layer net; and, on real task frames, how often each backend gives torch's "
        "features and the head's action. --episodes adds closed-loop returns.",
    )
    e.add_argument("--bundle", type=Path, required=True, help="policy bundle directory or .tar")
    e.add_argument(
        "--backends",
        default=ENCODER_BACKENDS,
        help="comma-separated from ort, gl33, es31, es2, torch (default: %(default)s)",
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
        help="task observations for the feature/action agreement check (default: %(default)s)",
    )
    e.add_argument(
        "--episodes",
        type=int,
        default=0,
        help="closed-loop episodes per backend for mean return (default: %(default)s)",
    )
    e.add_argument("--json", action="store_true")
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
    """torch reference: MiniConv with the bundle's weights, uint8 in, uint8 out (as encoder.onnx)."""
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

    def encode(obs: Any) -> Any:
        with torch.inference_mode():
            x = torch.from_numpy(obs).to(torch.float32) * ir.input_scale
            return model.quant.to_uint8(model.net(x).flatten(1)).numpy()

    return (
        encode,
        f"torch {torch.__version__} eager on the CPU, {torch.get_num_threads()} thread(s)",
    )


def run_encoder(args: argparse.Namespace) -> int:
    import numpy as np

    from edge.encoder import bench, make_encoder
    from edge.encoder.calibrate import task_frames
    from edge.encoder.gl import GLEncoder
    from edge.encoder.ort import cpu_session
    from splitedge.bundle import load_bundle

    batches = _ints(args.batch, "--batch")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    bundle = load_bundle(args.bundle)
    policy = bundle.policy
    limits = None
    if args.profile:
        from deploy.devices import load_profile

        limits = load_profile(args.profile).limits()
    encoders: dict[str, Callable[[Any], Any]] = {}
    reasons: list[dict[str, Any]] = []
    closers = []
    for name in names:
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
        raise SplitedgeError(
            "no backend could be started; see the reasons above or pick --backends ort"
        )
    frames = task_frames(policy.get("task", "unknown"), max(64, 4 * max(batches)), seed=0)

    speed: list[dict[str, Any]] = []
    for batch in batches:
        times = bench.time_side_by_side(encoders, frames, batch, args.seconds)
        base = times.get("torch")
        for name, t in times.items():
            speed.append(
                {
                    "backend": name,
                    "batch": batch,
                    "ms_per_frame": t * 1e3,
                    "frames_per_s": 1.0 / t,
                    "x_torch_fps": (base / t) if base else None,
                }
            )

    overhead = []
    probe_ir, probe_w = bench.one_layer_ir(bundle_ir(bundle))
    probes = {}
    for target in (n for n in names if n in GL_TARGETS and n in encoders):
        probes[target] = GLEncoder(probe_ir, probe_w, target, limits, act_quant=[])
    if probes:
        times = bench.time_side_by_side(
            {k: v.encode for k, v in probes.items()}, frames, 1, args.seconds
        )
        overhead = [
            {"backend": k, "net": "1 pass (1x1 conv)", "ms_per_frame": t * 1e3}
            for k, t in times.items()
        ]
        for p in probes.values():
            p.close()

    head = cpu_session(bundle.file(policy["head"]["onnx"]))
    fidelity = []
    if args.agreement > 0:
        obs = task_frames(policy.get("task", "unknown"), args.agreement, seed=1)
        ref_name = "torch" if "torch" in encoders else next(iter(encoders))
        ref_feat = encoders[ref_name](obs)
        ref_act = bench.head_actions(head, ref_feat)
        for name, encode in encoders.items():
            feat = encode(obs)
            row: dict[str, Any] = {
                "backend": name,
                "vs": ref_name,
                "features_identical_%": 100.0 * float(np.mean(feat == ref_feat)),
                "max_feature_diff": int(np.abs(feat.astype(int) - ref_feat).max()),
                "actions_identical_%": 100.0
                * float(np.mean(bench.head_actions(head, feat) == ref_act)),
            }
            if args.episodes > 0:
                returns = bench.episode_returns(
                    encode, head, policy.get("task", "unknown"), args.episodes
                )
                row["mean_return"] = float(np.mean(returns))
            fidelity.append(row)
    for enc in closers:
        enc.close()

    result: dict[str, Any] = {
        "bundle": f"{bundle.name} {bundle.version}",
        "profile": args.profile,
        "backends": reasons,
        "speed": speed,
        "gl_fixed_overhead": overhead,
        "fidelity": fidelity,
    }
    by = {(r["backend"], r["batch"]): r for r in speed}
    if ("ort", 1) in by and ("torch", 1) in by:
        result["ort_vs_torch_fps_batch1"] = (
            by[("ort", 1)]["frames_per_s"] / by[("torch", 1)]["frames_per_s"]
        )
    text = "\n\n".join(
        filter(
            None,
            [
                table(reasons, title=f"bench encoder: {result['bundle']}"),
                table(speed, title="speed (median of interleaved rounds)"),
                table(
                    overhead, title="GL fixed per-frame cost: upload + 1 pass + readback, batch 1"
                )
                if overhead
                else "",
                table(fidelity, title=f"fidelity on {args.agreement} task observations")
                if fidelity
                else "",
                (
                    f"ort / torch frames/s at batch 1: {result['ort_vs_torch_fps_batch1']:.2f}x"
                    if "ort_vs_torch_fps_batch1" in result
                    else ""
                ),
            ],
        )
    )
    emit(result, args.json, text)
    return 0


def bundle_ir(bundle: Any) -> Any:
    """The encoder IR of a policy bundle."""
    from splitedge.ir import EncoderIR

    return EncoderIR.from_json(bundle.file(bundle.policy["encoder"]["ir"]).read_text())
