"""`make lock`: recreate the lock files from the ranges, in fresh temporary venvs.

  locks/host.txt                         the host (.venv): pyproject.toml's [project] dependencies,
                                         extras test + report, build-system requires, and pip
  pytest_tf2cntk/cntk/lock-cntk.txt      the CNTK worker (.venv-cntk): cntk==CNTK_VERSION and what
                                         it pulls in, for CPython 3.6 on Linux x86_64
  pytest_tf2cntk/cntk/lock-cntk-gpu.txt  the same for cntk-gpu (`tf2cntk setup --gpu`)

Each one is resolved by pip (`install --dry-run --report`, so every pin carries the sha256 of the
wheel pip picks), then checked the way make and `tf2cntk setup` will use it: installed with
--require-hashes into a fresh venv of the same interpreter, frozen, and the freeze must equal the
lock; the CNTK one must also evaluate a CNTK function. cntk-gpu is resolved only (about 520 MB,
and proving it needs a GPU). The files are replaced, each atomically, only after every check
passed, so a failed run leaves the old locks in place.

Stdlib only; run it with the host Python the host lock is for (make passes HOST_PYTHON):
    python3.11 locks/refresh.py [--python36 PATH] [--only host|cntk] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pytest_tf2cntk.cntk import env as cntk_env  # noqa: E402  (stdlib only, imports no cntk)

HOST_LOCK = ROOT / "locks" / "host.txt"
HOST_EXTRAS = ("test", "report")
PIP = ["-m", "pip", "--disable-pip-version-check"]
# A CPython 3.6 venv's pip picks the wheel by the tags it knows: pip <= 18 (3.6.15's ensurepip)
# only manylinux1, 19.0 adds manylinux2010, 19.3 manylinux2014. One dry run per era, hashes merged,
# so the lock also installs where an env's pip was upgraded.
CP36_TAG_ERAS = (("manylinux1_x86_64",),
                 ("manylinux2010_x86_64", "manylinux1_x86_64"),
                 ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"))

Pins = dict  # canonical name -> (version, set of sha256)


def say(msg: str) -> None:
    print(f"make lock: {msg}", flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: a checkout on it would show its egg-info in the fresh venvs' freeze.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False,
                          env=env, **kw)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"make lock: `{' '.join(str(c) for c in cmd)}` failed:\n{tail}")
    return done


def host_requirements() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    reqs = list(data["project"]["dependencies"])
    for extra in HOST_EXTRAS:
        reqs += data["project"]["optional-dependencies"][extra]
    reqs += data["build-system"]["requires"]  # make installs the project --no-build-isolation
    reqs.append("pip")
    return list(dict.fromkeys(reqs))


def resolve(pip: list, reqs: list[str], extra: list[str], work: Path, wheels_only: bool) -> Pins:
    """pip's answer for ``reqs`` in an empty environment: {name: (version, {sha256})}."""
    fd, report = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    run(pip + ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", report]
        + extra + reqs, cwd=work)
    pins: Pins = {}
    for item in json.loads(Path(report).read_text("utf-8"))["install"]:
        name = cntk_env.canonical_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        info = item["download_info"]
        archive = info.get("archive_info", {})
        hashes = dict(archive.get("hashes") or {})
        if not hashes and "=" in archive.get("hash", ""):
            algo, _, value = archive["hash"].partition("=")
            hashes[algo] = value
        if "sha256" not in hashes:
            raise SystemExit(f"make lock: pip gave no sha256 for {name} {version} ({info['url']})")
        if wheels_only and not info["url"].split("#")[0].endswith(".whl"):
            raise SystemExit(f"make lock: {name} {version} has no wheel here ({info['url']})")
        if not info["url"].split("#")[0].endswith(".whl"):
            say(f"note: {name} {version} installs from a source archive ({info['url']})")
        pins[name] = (version, {hashes["sha256"]})
    return pins


def render(header: str, pins: Pins) -> str:
    """Header paragraphs as comments (wrapped), then one ``name==version`` line per pin."""
    lines = []
    for para in header.split("\n"):
        lines += [f"# {ln}" for ln in textwrap.wrap(para, 94, break_on_hyphens=False)] or ["#"]
    lines.append("#")
    for name in sorted(pins):
        version, hashes = pins[name]
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{h} \\" for h in sorted(hashes)]
        lines[-1] = lines[-1][:-2]
    return "\n".join(lines) + "\n"


def versions(pins: Pins) -> dict[str, str]:
    return {name: version for name, (version, _) in pins.items()}


def same_or_die(what: str, frozen: dict[str, str], pins: Pins) -> None:
    want = versions(pins)
    if frozen != want:
        extra = sorted(set(frozen.items()) - set(want.items()))
        missing = sorted(set(want.items()) - set(frozen.items()))
        raise SystemExit(f"make lock: {what}: the installed set is not the lock "
                         f"(installed, not locked: {extra}; locked, not installed: {missing})")


# ---------------------------------------------------------------------------------------------


def lock_host(work: Path) -> tuple[str, list]:
    """The host lock's text, and the pip of the venv it was proven in (for the CNTK dry runs)."""
    t0 = time.monotonic()
    venv = work / "host"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    pip = [python] + PIP
    bundled = run(pip + ["--version"]).stdout.split()[1]
    reqs = host_requirements()
    say(f"host: resolving {len(reqs)} ranges with CPython {platform.python_version()} "
        f"(pip {bundled}) ...")
    pins = resolve(pip, reqs, [], work, wheels_only=False)
    pins.pop("pytest-tf2cntk", None)
    major_minor = "%d.%d" % sys.version_info[:2]
    header = (
        "locks/host.txt: the host environment (.venv). `make setup` installs it with "
        "`pip install --require-hashes -r locks/host.txt`, then the project itself with --no-deps. "
        "Made by `make lock` (locks/refresh.py) from pyproject.toml's ranges ([project] "
        f"dependencies, extras {' + '.join(HOST_EXTRAS)}, build-system requires, pip): do not "
        "edit by hand.\n"
        f"lock-python: {major_minor} (CPython {platform.python_version()} on {platform.system()} "
        f"{platform.machine()}; the hashes are those of the wheels it picks)\n"
        f"{len(pins)} packages; checked: installed by pip {bundled} in a fresh venv, frozen, "
        "pip check.")
    text = render(header, pins)
    candidate = work / "host.txt"
    candidate.write_text(text, "utf-8")
    say(f"host: {len(pins)} pins; installing them into a fresh venv with --require-hashes ...")
    run(pip + ["install", "--quiet", "--require-hashes", "-r", candidate], cwd=work)
    listed = json.loads(run(pip + ["list", "--format=json"], cwd=work).stdout)
    same_or_die("host", {cntk_env.canonical_name(d["name"]): d["version"] for d in listed}, pins)
    run(pip + ["check"], cwd=work)
    say(f"host: done in {time.monotonic() - t0:.0f} s")
    return text, pip


def resolve_cp36(pip: list, dist: str, work: Path) -> Pins:
    merged: Pins | None = None
    for era in CP36_TAG_ERAS:
        target = Path(tempfile.mkdtemp(prefix="target-", dir=work))
        extra = ["--target", target, "--python-version", "3.6", "--implementation", "cp",
                 "--abi", "cp36m", "--only-binary=:all:"]
        for tag in era:
            extra += ["--platform", tag]
        pins = resolve(pip, [f"{dist}=={cntk_env.CNTK_VERSION}"], extra, work, wheels_only=True)
        if merged is None:
            merged = pins
        elif versions(pins) != versions(merged):
            raise SystemExit(f"make lock: {dist} resolves differently for {era[0]} "
                             f"({versions(pins)}) than for manylinux1 ({versions(merged)})")
        else:
            for name, (_, hashes) in pins.items():
                merged[name][1].update(hashes)
    assert merged is not None
    if versions(merged).get(dist) != cntk_env.CNTK_VERSION:
        raise SystemExit(f"make lock: {dist} resolved to {versions(merged).get(dist)}")
    return merged


def cntk_header(dist: str, pins: Pins, checked: str) -> str:
    flag = " --gpu" if dist == "cntk-gpu" else ""
    return (f"pytest_tf2cntk/cntk/{cntk_env.LOCK_FILES[dist]}: what `tf2cntk setup{flag}` "
            "installs in the CNTK environment, with `pip install --require-hashes -r` (package "
            "data, so it works without a checkout). Made by `make lock` (locks/refresh.py) from "
            f"{dist}=={cntk_env.CNTK_VERSION} and its own ranges: do not edit by hand.\n"
            "For CPython 3.6 on Linux x86_64; the hashes cover the wheels pip 9 to 21 pick "
            "(manylinux1, 2010, 2014). pip and setuptools stay the base interpreter's.\n"
            f"{len(pins)} packages; {checked}")


def lock_cntk(pip: list, work: Path, python36: str | None) -> dict[str, str]:
    """{lock file name: text} for cntk (proven in a fresh 3.6 venv) and cntk-gpu (resolved)."""
    t0 = time.monotonic()
    texts = {}
    gpu = resolve_cp36(pip, "cntk-gpu", work)
    texts["cntk-gpu"] = render(cntk_header("cntk-gpu", gpu, "resolved only (not installed: about "
                                           "520 MB, and proving it needs a GPU)."), gpu)
    say(f"cntk-gpu: {', '.join(f'{n}=={v}' for n, v in sorted(versions(gpu).items()))}")
    cpu = resolve_cp36(pip, "cntk", work)
    say(f"cntk: {', '.join(f'{n}=={v}' for n, v in sorted(versions(cpu).items()))}")
    base = cntk_env.find_python36(python36)
    env_dir = work / "cntk"
    run([base, "-m", "venv", env_dir])
    py36 = cntk_env.env_python(env_dir)
    pip36 = run([py36, "-m", "pip", "--version"], cwd=work).stdout.split()[1]
    base_version = run([py36, "-c", "import platform; print(platform.python_version())"]).stdout
    checked = (f"checked: installed by pip {pip36} in a fresh venv of CPython "
               f"{base_version.strip()}, frozen, a CNTK function evaluated.")
    candidate = work / cntk_env.LOCK_FILES["cntk"]
    candidate.write_text(render(cntk_header("cntk", cpu, checked), cpu), "utf-8")
    cntk_env.ensure_mpi_compat(env_dir / cntk_env.MPI_COMPAT_DIRNAME, say)
    cntk_env.install_locked(env_dir, "cntk", lambda m: say(f"cntk: {m}"), lock=candidate)
    frozen = {n: v for n, v in cntk_env.installed_versions(env_dir).items()
              if n not in cntk_env.UNLOCKED_DISTS}
    same_or_die("cntk", frozen, cpu)
    say(f"cntk: proof {cntk_env.prove(py36)} (cntk, numpy, python); "
        f"done in {time.monotonic() - t0:.0f} s")
    texts["cntk"] = candidate.read_text("utf-8")
    return texts


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python36", help="base CPython 3.6 (default: as `tf2cntk setup` finds it)")
    ap.add_argument("--only", choices=("host", "cntk"), help="recreate one side only")
    ap.add_argument("--keep", action="store_true", help="keep the temporary venvs (print where)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tf2cntk-lock-"))
    try:
        outputs: dict[Path, str] = {}
        pip = [sys.executable] + PIP
        if args.only != "cntk":
            outputs[HOST_LOCK], pip = lock_host(work)
        if args.only != "host":
            try:
                for dist, text in lock_cntk(pip, work, args.python36).items():
                    outputs[cntk_env.lock_file(dist)] = text
            except cntk_env.EnvironmentProblem as exc:
                raise SystemExit(f"make lock: {exc}") from exc
        for path, text in outputs.items():
            old = path.read_text("utf-8") if path.exists() else None
            replace_atomically(path, text)
            say(f"{'unchanged' if old == text else 'wrote'} {path.relative_to(ROOT)}")
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
