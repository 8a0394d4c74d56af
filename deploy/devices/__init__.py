"""Device profiles: one TOML file per board in this folder, describing what its GPU allows.

The shader compiler checks an encoder against a profile's limits before anything runs
(`DeviceProfile.limits()` feeds edge.encoder.plan); pre-flight reads ram_mb and gles_min.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from edge.encoder.plan import Limits
from splitedge.errors import SplitedgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent
GL_TARGETS = ("gl33", "es31", "es2")


@dataclass(frozen=True)
class DeviceProfile:
    """One board: which GL target it runs, its per-pass limits and its RAM."""

    name: str
    description: str
    gl_target: str  # gl33, es31 or es2
    glsl_version: str
    max_texture_units: int
    max_texture_size: int
    float_render_targets: bool
    ram_mb: int
    max_samples_per_pass: int | None = None  # None: no practical limit
    gles_min: str | None = None

    def __post_init__(self) -> None:
        if self.gl_target not in GL_TARGETS:
            raise ValueError(
                f"profile {self.name}: gl_target {self.gl_target!r} not in {GL_TARGETS}"
            )
        for key in ("max_texture_units", "max_texture_size", "ram_mb", "max_samples_per_pass"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"profile {self.name}: {key} must be a positive integer, got {value!r}"
                )

    def limits(self) -> Limits:
        """The compiler's view of this board."""
        return Limits(
            max_texture_units=self.max_texture_units,
            max_samples_per_pass=self.max_samples_per_pass,
            max_texture_size=self.max_texture_size,
            float_storage=self.float_render_targets,
            source=f"device profile {self.name}",
        )


def profiles() -> list[str]:
    """Names of the profiles in this folder."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name: str) -> DeviceProfile:
    """A profile by name (the TOML file's stem); unknown names list the known ones."""
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise SplitedgeError(f"unknown device profile {name!r}; known: {', '.join(profiles())}")
    raw = tomllib.loads(path.read_text())
    fields = set(DeviceProfile.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise SplitedgeError(
            f"{path}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    try:
        return DeviceProfile(**raw)
    except (TypeError, ValueError) as e:
        raise SplitedgeError(f"{path}: {e}") from e


def check_encoder(profile: DeviceProfile, bundle_dir: Path) -> str:
    """Plan a bundle's encoder for the board's GL target under its limits, without a GL context.

    Returns a one-line summary (passes per frame); raises PlanError naming the layer, the
    limit and the number when the encoder cannot run there.
    """
    from edge.encoder.calibrate import from_ir
    from edge.encoder.plan import build_plan
    from splitedge.ir import EncoderIR, load_weights

    enc_ir = EncoderIR.from_json((bundle_dir / "encoder_ir.json").read_text())
    weights = load_weights(bundle_dir / "encoder_weights.npz")
    plan = build_plan(enc_ir, weights, profile.limits(), from_ir(enc_ir), profile.gl_target)
    most = max(p.samples for p in plan.passes)
    return (
        f"fits {profile.name} ({profile.gl_target}): {len(plan.passes)} passes, "
        f"at most {most} samples per pass"
    )
