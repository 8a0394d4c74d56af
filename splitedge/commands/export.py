"""`splitedge export`: a user's trained SB3 model -> a proven policy bundle."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from splitedge.commands._env_options import env_kwargs
from splitedge.errors import SplitedgeError
from splitedge.output import emit, table

EPILOG = """examples:
  splitedge export --model runs/cartpole-ppo/model.zip --out bundles/cartpole
  splitedge export --model my_run/model.zip --env my_envs.dot:DotTrack --out bundles/dot
  splitedge export --model my_run/model.zip --frames obs.npy --out bundles/dot --profile pi-4b
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained SB3 image policy to a policy bundle",
        description="Read an SB3 model (PPO, A2C, SAC, TD3 or DDPG with an image policy: "
        "MiniConvExtractor, SB3's NatureCNN, or your own extractor whose CNN is an "
        "nn.Sequential of Conv2d/ReLU/MaxPool2d/AvgPool2d/Flatten), cut it after the conv "
        "stack (the device part) and build a bundle: encoder IR + weights, encoder/head/full "
        "ONNX, manifest with the sha256 of every file. Observations of your env (or a frames "
        "file) calibrate the feature scale, and the bundle must act like the model's "
        "predict(deterministic=True) on 200 of them before anything is written. A model "
        "trained with `splitedge train --delay-profile/--chunk` is exported with its "
        "latency hiding (policy.realtime, read from result.json beside the model): a head "
        "that also reads the actions in flight, or answers H actions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="SB3 model.zip to export")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument(
        "--env",
        default=None,
        help="the env the model was trained on: a gymnasium id, one of our tasks, or "
        "package.module:ClassName (importable from here); default: the task in result.json "
        "beside the model",
    )
    p.add_argument(
        "--env-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments for the env, as JSON (e.g. '{\"size\": 48}'); default: none",
    )
    p.add_argument(
        "--frames",
        type=Path,
        default=None,
        help="observations as .npy, uint8 (N, C, H, W) or (N, H, W, C), N >= 200: used "
        "instead of an env",
    )
    p.add_argument(
        "--features",
        choices=("auto", "uint8", "float32"),
        default="auto",
        help="how features cross the wire: uint8 with a calibrated scale, float32, or auto "
        "(uint8 when it keeps every action, else float32) (default: %(default)s)",
    )
    p.add_argument(
        "--algo",
        choices=("ppo", "a2c", "sac", "td3", "ddpg"),
        default=None,
        help="the algorithm that saved the model (default: read from the model)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="device profile (deploy/devices) whose limits the encoder must fit; refuses "
        "before writing if it does not (default: no check)",
    )
    p.add_argument(
        "--name", default=None, help="bundle name (default: the output directory's name)"
    )
    p.add_argument("--version", default="1.0.0", help="bundle version (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        raise SplitedgeError(
            f"model {args.model} not found; train one with `splitedge train --out DIR` or SB3"
        )
    if args.frames is not None and not args.frames.is_file():
        raise SplitedgeError(f"--frames {args.frames} not found")
    kwargs = env_kwargs(args.env_kwargs)  # None: the ones its run trained with, if any
    profile = None
    if args.profile:
        from deploy.devices import load_profile

        profile = load_profile(args.profile)
    try:
        from models.export import export_policy
    except ImportError as e:
        raise SplitedgeError(
            f"export needs the train extra ({e}); run `pip install -e .[train]`"
        ) from e
    notes: list[str] = []
    t0 = time.perf_counter()
    manifest = export_policy(
        args.model,
        args.out,
        args.name or args.out.name,
        args.version,
        env=args.env,
        env_kwargs=kwargs,
        frames=args.frames,
        features=args.features,
        algo=args.algo,
        report=notes,
        check=_profile_check(profile),
    )
    policy = manifest["policy"]
    out = policy["encoder"]["output"]
    wire, agree = policy["wire"], policy["agreement"]
    rows = [
        {"file": k, "bytes": (args.out / k).stat().st_size, "sha256": v[:16]}
        for k, v in manifest["files"].items()
    ]
    summary = [
        f"{policy['algorithm']} with {policy['features_extractor']}, observations "
        f"{'x'.join(map(str, policy['observation']['shape']))} from {policy['calibration']['source']}",
        f"per decision: split sends {wire['split_bytes']} B ({out['shape'][0]} {out['dtype']} "
        f"features), raw offload {wire['raw_bytes']} B ({wire['raw_over_split']}x)",
        "agreement with predict(deterministic=True): " + _agreement_line(agree),
        *notes,
        f"exported in {time.perf_counter() - t0:.1f} s",
    ]
    text = table(rows, title=f"bundle {manifest['name']} {manifest['version']} -> {args.out}")
    emit(manifest, args.json, text + "\n" + "\n".join(summary))
    return 0


def _profile_check(profile: Any) -> Any:
    if profile is None:
        return None
    from deploy.devices import check_encoder

    return lambda bundle_dir: check_encoder(profile, bundle_dir)


def _agreement_line(agree: dict[str, Any]) -> str:
    parts = []
    for key, label in (("ort", "ort"), ("es2_reference", "es2 (8-bit reference)")):
        c = agree[key]
        diff = f", max |diff| {c['max_abs_diff']:.2g}" if "max_abs_diff" in c else ""
        parts.append(f"{label} {100 * c['agree']:.1f}% of {c['observations']}{diff}")
    return "; ".join(parts)
