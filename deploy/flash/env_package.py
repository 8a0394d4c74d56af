"""`flash --env-package PATH`: the user's env code, as wheels that travel with a release.

PATH is a wheel, a project folder (pyproject.toml, setup.py or setup.cfg; built here with
`pip wheel --no-deps`), or the folder on PYTHONPATH (or the .py file) that holds the env's
module: then only the top-level module the env's entry point names (`dot_env` for
`dot_env:DotTrack`) is carried, in a wheel built here. The device installs them with
`--no-deps` into the release's own packages/ folder, which the service puts on sys.path:
the env's code is versioned with the release (a rollback brings the old code back), and
the shared runtime venv is never touched. Dependencies beyond the edge runtime (numpy,
gymnasium, ...) are more --env-package wheels.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from deploy.flash.runtime import _pip, cache_dir
from splitedge.errors import SplitedgeError

PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
PACKAGES_DIR = "packages"
SKIP = {
    "__pycache__",
    ".git",
    "build",
    "dist",
    ".venv",
    ".tox",
}  # not source: left out of digests  # in the release folder, on the service's sys.path


def env_wheels(paths: list[Path], env: str | None) -> list[Path]:
    """The wheels to carry for these --env-package paths; `env` is the env id or entry point the
    release's source runs (it names the module to carry from a plain folder)."""
    wheels = [_wheel(Path(p), env) for p in paths]
    names = [w.name.split("-")[0].lower() for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SplitedgeError(f"--env-package gives {', '.join(twice)} more than once")
    return wheels


def _wheel(path: Path, env: str | None) -> Path:
    if path.is_file() and path.suffix == ".whl":
        return path
    if path.is_dir() and any((path / f).is_file() for f in PROJECT_FILES):
        return _build(path, path.name)
    if path.is_file() and path.suffix == ".py":
        return _module_wheel(path, path.stem)
    if path.is_dir():
        module = _env_module(env, path)
        found = path / f"{module}.py" if (path / f"{module}.py").is_file() else path / module
        if not (found.suffix == ".py" or (found / "__init__.py").is_file()):
            raise SplitedgeError(
                f"--env-package {path}: no {module}.py or {module}/__init__.py there for env "
                f"{env!r}; name the folder that holds the module, a wheel, or a project folder"
            )
        return _module_wheel(found, module)
    raise SplitedgeError(
        f"--env-package {path}: not found; give a wheel (.whl), a project folder "
        "(pyproject.toml or setup.py), or the folder that holds your env's module"
    )


def _env_module(env: str | None, path: Path) -> str:
    if not env or ":" not in env:
        raise SplitedgeError(
            f"--env-package {path} is a plain folder, so the env must be an entry point "
            f"(package.module:ClassName) naming the module to carry, not {env!r}; or give a "
            "wheel or a project folder"
        )
    return env.partition(":")[0].split(".")[0]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).parts if root.is_dir() else ()
        if p.suffix == ".pyc" or any(part in SKIP or part.endswith(".egg-info") for part in rel):
            continue
        h.update(p.relative_to(root.parent).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _module_wheel(found: Path, module: str) -> Path:
    """A wheel holding one top-level module or package, named userenv-<module>."""
    digest = _digest(found)
    out = cache_dir() / "env-wheels" / digest[:16]
    hit = sorted(out.glob("*.whl"))
    if hit:
        return hit[0]
    with tempfile.TemporaryDirectory(prefix="splitedge-envpkg-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        layout = f'py-modules = ["{module}"]'
        if found.is_dir():
            shutil.copytree(found, src / module, ignore=shutil.ignore_patterns("__pycache__"))
            layout = f'packages.find = {{ include = ["{module}", "{module}.*"] }}'
        else:
            shutil.copy2(found, src / f"{module}.py")
        name = "userenv-" + re.sub(r"[^A-Za-z0-9]+", "-", module).strip("-").lower()
        (src / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "0+{digest[:12]}"\n'
            f"[tool.setuptools]\n{layout}\n"
        )
        return _into_cache(src, out, f"build a wheel of {found}")


def _build(project: Path, label: str) -> Path:
    """The user's own project folder, built into a wheel here (no dependencies)."""
    out = cache_dir() / "env-wheels" / _digest(project)[:16]
    hit = sorted(out.glob("*.whl"))
    if hit:
        return hit[0]
    return _into_cache(
        project,
        out,
        f"build {label} into a wheel (does its build backend need installing here? "
        "or build the wheel yourself and pass the .whl)",
    )


def _into_cache(src: Path, out: Path, what: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="splitedge-envwheel-") as tmp:
        build = Path(tmp) / "dist"
        args = ["wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(build)]
        _pip([*args, str(src)], what)
        out.mkdir(parents=True, exist_ok=True)
        for whl in build.glob("*.whl"):
            shutil.copy2(whl, out / whl.name)
    return sorted(out.glob("*.whl"))[0]


def sha256(path: Path) -> str:
    """sha256 of a file, as the device checks it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
