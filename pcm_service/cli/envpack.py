"""Pack the worker environment into one relocatable archive (``pcm env pack``).

The archive is a standalone Python prefix: the interpreter's own prefix (binary, libpython,
standard library) with the venv's site-packages merged into it, PCM itself copied in (an
editable install points at a source tree the node does not have), and the shared libraries
the interpreter and the extension modules load from the submit host's system bundled in
``lib/`` (a node need not have them; glibc, libstdc++ and libgcc_s are the baseline every
manylinux wheel assumes, so they are not). A moved prefix finds itself from its binary's
location, so only text files that name the old paths (script shebangs, ``.pth`` files) need
fixing: ``pcm-env.json`` lists them, and the bootstrap rewrites them when it unpacks.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

ENV_META = "pcm-env.json"  # inside the archive, at its top
# what every node has (the manylinux baseline): never bundled
BASELINE_LIBS = ("linux-vdso.so", "ld-linux", "libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so",
                 "libutil.so", "libresolv.so", "libgcc_s.so", "libstdc++.so", "libcrypt.so", "libnsl.so")
# of the base prefix, not needed to run a worker
SKIP_STDLIB = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "config-*",
               "lib-dynload/_tkinter*")
PCM_PACKAGES = ("pcm_service", "factory", "worker_image")  # copied in when installed editable


class PackError(RuntimeError):
    pass


@dataclass
class PackPlan:
    """What goes where: archive name → the file (or link) to read."""

    members: dict[str, Path] = field(default_factory=dict)
    relocate: list[str] = field(default_factory=list)  # text files that name an old prefix
    old_prefixes: list[str] = field(default_factory=list)
    python: str = ""  # the interpreter, relative to the prefix

    def add_tree(self, src: Path, dest: str, skip: Callable[[str], bool] = lambda _: False) -> None:
        for root, dirs, files in os.walk(src):
            rel_root = os.path.relpath(root, src)
            dirs[:] = sorted(d for d in dirs if not skip(os.path.normpath(os.path.join(rel_root, d))))
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                rel = os.path.normpath(os.path.join(rel_root, name))
                if not skip(rel):
                    self.members[f"{dest}/{rel}".lstrip("/")] = Path(root) / name


def _site_packages(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def plan_pack(venv: Path, base: Path, exclude: Iterable[str] = ()) -> PackPlan:
    """The archive of ``venv`` (a venv) on the interpreter prefix ``base``; ``exclude`` are
    glob patterns of site-packages' top-level names (``torch*``) left out."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    plan = PackPlan(old_prefixes=sorted({str(venv), str(venv.resolve()), str(base), str(base.resolve())},
                                        key=len, reverse=True))
    plan.python = f"bin/{ver}"
    # the base prefix: interpreter, libpython, stdlib (not its own site-packages nor its tests)
    for name in ("python3", "python", ver):
        if (base / "bin" / name).exists():
            plan.members[f"bin/{name}"] = base / "bin" / name
    if "bin/" + ver not in plan.members:
        raise PackError(f"{base}/bin/{ver}: no interpreter there (is {base} the venv's base prefix?)")
    for lib in sorted((base / "lib").glob("libpython*")):
        plan.members[f"lib/{lib.name}"] = lib
    plan.add_tree(base / "lib" / ver, f"lib/{ver}",
                  skip=lambda rel: any(fnmatch.fnmatch(rel, p) for p in SKIP_STDLIB))
    # the venv: site-packages (merged), scripts, anything else it holds (e.g. opt/cctools)
    patterns = [*exclude, "__editable__*"]  # an editable install names a tree the node lacks

    def skip_site(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel.split(os.sep, 1)[0], p) for p in patterns)

    plan.add_tree(_site_packages(venv), f"lib/{ver}/site-packages", skip=skip_site)
    for pkg in PCM_PACKAGES:  # PCM itself as files, wherever it is installed from
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise PackError(f"{pkg} is not importable here: run `pcm env pack` from the worker's venv")
        src = Path(spec.origin).parent
        plan.add_tree(src, f"lib/{ver}/site-packages/{pkg}", skip=lambda rel: "__pycache__" in rel.split(os.sep))
    for script in sorted((venv / "bin").iterdir()):
        if script.name.startswith("python") or script.name.startswith("activate") or script.name == "Activate.ps1":
            continue
        if script.is_file():
            plan.members[f"bin/{script.name}"] = script
    for other in sorted(venv.iterdir()):
        if other.name not in ("bin", "lib", "lib64", "include", "share", "pyvenv.cfg") and other.is_dir():
            plan.add_tree(other, other.name)
    plan.relocate = [n for n, p in plan.members.items() if _names_prefix(n, p, plan.old_prefixes)]
    return plan


def _names_prefix(name: str, path: Path, prefixes: list[str]) -> bool:
    """A small text file (script, .pth) that names one of the old prefixes."""
    if path.is_symlink() or not (name.endswith(".pth") or "/bin/" in f"/{name}"):
        return False
    try:
        if path.stat().st_size > 1 << 20:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    if data.startswith(b"\x7fELF") or b"\0" in data[:4096]:
        return False
    return any(p.encode() in data for p in prefixes)


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def system_libs(plan: PackPlan) -> dict[str, Path]:
    """The shared libraries the packed ELF files load from outside the archive, except the
    baseline: found with ldd (the host's loader says what it would load)."""
    elves = [p for n, p in plan.members.items() if not p.is_symlink()
             and (n.endswith(".so") or ".so." in n or n == plan.python) and _is_elf(p)]
    inside = {str(p.resolve()) for p in plan.members.values()}

    def deps(p: Path) -> list[tuple[str, str]]:
        out = subprocess.run(["ldd", str(p)], capture_output=True, text=True, check=False).stdout
        found = []
        for line in out.splitlines():
            name, arrow, rest = line.strip().partition(" => ")
            target = rest.split(" (")[0].strip() if arrow else ""
            if target.startswith("/"):
                found.append((name, target))
        return found

    libs: dict[str, Path] = {}
    with ThreadPoolExecutor(8) as pool:
        for found in pool.map(deps, elves):
            for name, target in found:
                real = str(Path(target).resolve())
                if real in inside or name.startswith(BASELINE_LIBS) or name in libs:
                    continue
                libs[name] = Path(target)
    return libs


def pack(out: Path, venv: Optional[Path] = None, base: Optional[Path] = None, exclude: Iterable[str] = (),
         compresslevel: int = 1, progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Write the archive; returns its metadata (also stored inside it as ``pcm-env.json``)."""
    venv = Path(venv or sys.prefix)
    cfg = venv / "pyvenv.cfg"
    if not cfg.exists():
        raise PackError(f"{venv} is not a venv (no pyvenv.cfg): pack the worker's venv")
    if base is None:  # the interpreter the venv was made from
        keys = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in cfg.read_text().splitlines())}
        base = Path(keys.get("home") or Path(sys.base_prefix) / "bin").parent
        version = keys.get("version", "")
        if version and not version.startswith(f"{sys.version_info.major}.{sys.version_info.minor}."):
            raise PackError(f"{venv} is a Python {version} venv: run `pcm env pack` with that venv's own pcm")
    plan = plan_pack(venv, base, exclude)
    for name, lib in system_libs(plan).items():
        plan.members.setdefault(f"lib/{name}", lib.resolve())
    created = time.time()
    meta: dict[str, Any] = {"format": 1, "python": plan.python, "python_version": sysconfig.get_python_version(),
            "platform": sysconfig.get_platform(), "old_prefixes": plan.old_prefixes,
            "relocate": sorted(plan.relocate), "library_path": "lib", "created": created,
            "members": len(plan.members)}
    total = sum((p.stat() if p.is_symlink() and os.path.isabs(os.readlink(p)) else p.lstat()).st_size
                for p in plan.members.values())
    tmp = out.with_name(f".{out.name}.partial")
    done = 0
    with tarfile.open(tmp, "w:gz", compresslevel=compresslevel, format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(meta, indent=1).encode()
        info = tarfile.TarInfo(ENV_META)
        info.size, info.mtime, info.mode = len(data), int(created), 0o644
        tar.addfile(info, io.BytesIO(data))
        for name, path in sorted(plan.members.items()):
            if path.is_symlink() and os.path.isabs(os.readlink(path)):
                path = path.resolve()  # an absolute link would point off the node: pack its target
            ti = tar.gettarinfo(str(path), arcname=name)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            if ti.isreg():
                with path.open("rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)
            done += ti.size
            progress(done, total)
    os.replace(tmp, out)
    return meta


def pack_command(output: Path = typer.Option(Path("pcm-env.tar.gz"), "-o", "--output",
                                              help="Where to write the archive"),
                 venv: Optional[Path] = typer.Option(None, help="The worker venv to pack (default: this one)"),
                 exclude: list[str] = typer.Option([], "--exclude", help="Leave out site-packages entries"
                                                   " matching this glob (repeatable), e.g. 'mypy*'"),
                 level: int = typer.Option(1, min=0, max=9, help="gzip level (1: fast; 0: none)")) -> None:
    """Pack the worker environment (interpreter + packages) into one relocatable archive:
    `pcm serve --worker-env FILE` ships it to glideins started with PCM_ENV=packed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pcm_service.cli.common import console, fail

    t0 = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed:,.0f}/{task.total:,.0f} MiB read"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"packing {output.name}", total=0)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done / 2**20, total=total / 2**20)

        try:
            meta = pack(output, venv=venv, exclude=exclude, compresslevel=level, progress=step)
        except (PackError, OSError) as e:
            fail(f"cannot pack the environment: {e}", code=2)
    console.print(f"{output}: {meta['members']:,} files, Python {meta['python_version']}, "
                  f"{output.stat().st_size / 2**20:,.0f} MiB in {time.monotonic() - t0:.0f}s; "
                  f"serve it with `pcm serve --worker-env {output}`", highlight=False)
