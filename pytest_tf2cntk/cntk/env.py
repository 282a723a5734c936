"""The CNTK side: where its Python 3.6 environment lives, how to build it, how to start it.

CNTK 2.7 ships wheels for CPython 3.5/3.6 only and links OpenMPI 1.10 sonames, so the worker
runs in its own venv with a private folder of ``libmpi*.so`` compat symlinks on its
``LD_LIBRARY_PATH``. Nothing here imports cntk; everything runs the 3.6 interpreter as a
subprocess.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pytest_tf2cntk.errors import EnvironmentProblem

CNTK_VERSION = "2.7.post2"
ENV_CNTK_PYTHON = "TF2CNTK_CNTK_PYTHON"
ENV_PYTHON36 = "TF2CNTK_PYTHON36"
MPI_COMPAT_DIRNAME = "mpi-compat"
# CNTK 2.7 was linked against OpenMPI 1.10; OpenMPI 4's libraries keep the ABI CNTK uses.
MPI_SONAMES = {"libmpi.so.12": "libmpi.so.40", "libmpi_cxx.so.1": "libmpi_cxx.so.40"}
MPI_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                   "/usr/lib", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu/openmpi/lib")
APT_FIX = "apt-get install -y libopenmpi3"

# Evaluated in the new interpreter to prove the environment works end to end.
PROOF_SNIPPET = (
    "import warnings; warnings.simplefilter('ignore')\n"
    "import numpy as np, cntk as C\n"
    "x = C.input_variable(3)\n"
    "y = (C.relu(x) * 2.0).eval({x: np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)})\n"
    "assert np.allclose(y, [[0.0, 1.0, 4.0]]), y\n"
    "import sys; print(C.__version__, np.__version__, sys.version.split()[0])\n"
)


def project_root() -> Path | None:
    """The source checkout this package runs from, if it is one (editable install)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "pytest-tf2cntk"' in pyproject.read_text("utf-8"):
        return root
    return None


def default_env_dir() -> Path:
    """`.venv-cntk/` in a development checkout, else a per-user cache folder."""
    root = project_root()
    if root is not None:
        return root / ".venv-cntk"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pytest-tf2cntk" / "venv-cntk"


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def resolve_cntk_python(explicit: str | os.PathLike | None = None) -> Path:
    """The CNTK interpreter: the option, then ``$TF2CNTK_CNTK_PYTHON``, then the default env."""
    chosen = explicit or os.environ.get(ENV_CNTK_PYTHON)
    if chosen:
        path = Path(chosen).expanduser().absolute()  # a relative path is the user's, not one on $PATH
        source = "--tf2cntk-cntk-python" if explicit else f"${ENV_CNTK_PYTHON}"
        hint = "point it at the python of a venv with cntk==2.7.post2, or unset it and run `tf2cntk setup`"
        if not path.exists():
            raise EnvironmentProblem(f"The CNTK Python interpreter {path} given by {source} does not exist.",
                                     hint=hint)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise EnvironmentProblem(f"The CNTK Python interpreter {path} given by {source} is not an "
                                     f"executable file{' (it is a directory)' if path.is_dir() else ''}.",
                                     hint=hint)
        return path
    path = env_python(default_env_dir())
    if not path.exists():
        raise EnvironmentProblem(
            f"No CNTK environment at {path.parent.parent}: CNTK 2.7 needs its own Python 3.6 venv.",
            hint="run `tf2cntk setup` (or `make setup` in a checkout)")
    return path


def mpi_compat_dir_for(python: Path) -> Path:
    """The compat folder beside the interpreter's venv; falls back to the default env's."""
    venv = Path(os.path.abspath(python)).parent.parent
    own = venv / MPI_COMPAT_DIRNAME
    return own if own.is_dir() else default_env_dir() / MPI_COMPAT_DIRNAME


def worker_environ(python: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a CNTK subprocess: compat libs first on LD_LIBRARY_PATH, quiet output."""
    env = dict(os.environ if base is None else base)
    compat = str(mpi_compat_dir_for(python))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (compat, env.get("LD_LIBRARY_PATH")) if p)
    env["PYTHONNOUSERSITE"] = "1"
    env.pop("PYTHONPATH", None)  # the host's packages are Python 3.11 ones
    env.pop("PYTHONHOME", None)
    env.setdefault("OMPI_MCA_btl_base_warn_component_unused", "0")
    return env


# ---------------------------------------------------------------------------------------------
# Finding a base CPython 3.6


def python_version(python: str | Path, timeout: float = 20) -> tuple[int, int] | None:
    """(major, minor) of an interpreter, or None when it does not run."""
    try:
        out = subprocess.run([str(python), "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _candidates(explicit: str | None) -> Iterable[tuple[str, str]]:
    """(source, path) pairs in the documented search order."""
    if explicit:
        yield "--python", explicit
    if os.environ.get(ENV_PYTHON36):
        yield f"${ENV_PYTHON36}", os.environ[ENV_PYTHON36]
    on_path = shutil.which("python3.6")
    if on_path:
        yield "PATH", on_path
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    for found in sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.6*", "bin", "python3.6")),
                        reverse=True):
        yield "pyenv", found
    conda_roots = [os.environ.get("CONDA_PREFIX", "")] + [
        str(Path.home() / d) for d in ("miniconda3", "anaconda3", "miniforge3", "mambaforge")]
    for root in filter(None, conda_roots):
        for found in sorted(glob.glob(os.path.join(root, "envs", "*", "bin", "python3.6"))):
            yield "conda", found


def find_python36(explicit: str | None = None) -> Path:
    tried = []
    for source, path in _candidates(explicit):
        version = python_version(path)
        if version == (3, 6):
            return Path(path)
        tried.append(f"{path} ({source}: {'does not run' if version is None else '%d.%d' % version})")
        if source == "--python":
            raise EnvironmentProblem(f"--python {path} is not a working CPython 3.6 "
                                     f"({tried[-1].split(': ', 1)[1]}.",
                                     hint="pass the path of a python3.6 executable")
    looked = "; ".join(tried) if tried else "nothing found"
    raise EnvironmentProblem(
        "No CPython 3.6 found (CNTK 2.7 has wheels for 3.5/3.6 only). Looked at: --python, "
        f"${ENV_PYTHON36}, python3.6 on PATH, pyenv versions, conda envs ({looked}).",
        hint="`pyenv install 3.6.15` or `conda create -n py36 python=3.6`, then "
             "`tf2cntk setup --python /path/to/python3.6`")


# ---------------------------------------------------------------------------------------------
# OpenMPI compat folder


def find_openmpi_libs() -> dict[str, Path] | None:
    """Map each compat soname to the installed OpenMPI 4 library, or None when not installed."""
    found: dict[str, Path] = {}
    for soname, target in MPI_SONAMES.items():
        for d in MPI_SEARCH_DIRS:
            candidate = Path(d) / target
            if candidate.exists():
                found[soname] = candidate
                break
    return found if len(found) == len(MPI_SONAMES) else None


def mpi_status(compat_dir: Path) -> tuple[bool, str]:
    """(ok, description) of a compat folder, for `doctor` and setup."""
    libs = find_openmpi_libs()
    if libs is None:
        return False, f"libopenmpi3 is not installed (need {', '.join(MPI_SONAMES.values())})"
    missing = [s for s in MPI_SONAMES if not (compat_dir / s).exists()]
    if missing:
        return False, f"compat links {', '.join(missing)} missing in {compat_dir}"
    return True, f"{compat_dir} -> {libs['libmpi.so.12'].parent}"


def ensure_mpi_compat(compat_dir: Path, log: Callable[[str], None] = print) -> None:
    libs = find_openmpi_libs()
    if libs is None:
        can_apt = os.geteuid() == 0 and shutil.which("apt-get") is not None
        if not can_apt:
            raise EnvironmentProblem(
                "CNTK needs OpenMPI (libmpi.so.40 and libmpi_cxx.so.40 from Debian/Ubuntu's "
                "libopenmpi3), and it is not installed.",
                hint=f"sudo {APT_FIX}   (then run `tf2cntk setup` again)")
        log("installing libopenmpi3 with apt-get ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "-q", "libopenmpi3"],
                    ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "libopenmpi3"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if cmd[1] == "install" and done.returncode == 0:
                break
        libs = find_openmpi_libs()
        if libs is None:
            raise EnvironmentProblem("apt-get could not install libopenmpi3: "
                                     + (done.stderr.strip().splitlines() or ["no output"])[-1],
                                     hint=f"run `{APT_FIX}` by hand and read its error")
    compat_dir.mkdir(parents=True, exist_ok=True)
    for soname, target in libs.items():
        link = compat_dir / soname
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = compat_dir / (soname + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic, so a concurrent reader never sees no link


# ---------------------------------------------------------------------------------------------
# setup


@dataclass
class SetupResult:
    env_dir: Path
    python: Path
    proof: str
    already_done: bool


def prove(python: Path, timeout: float = 120) -> str:
    """Evaluate a small CNTK function in ``python``; return its version line or raise."""
    try:
        done = subprocess.run([str(python), "-c", PROOF_SNIPPET], env=worker_environ(python),
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentProblem(f"CNTK in {python} did not answer within {timeout:.0f} s.",
                                 hint="run `tf2cntk doctor`") from exc
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1]
    raise environment_problem(python, done.stderr)


def environment_problem(python: Path, stderr: str, summary: str | None = None) -> EnvironmentProblem:
    """Name what is missing in a CNTK interpreter from what it printed, with the fix."""
    if "libmpi" in stderr:
        lib = next((w for w in stderr.replace(":", " ").split() if w.startswith("libmpi")), "libmpi")
        return EnvironmentProblem(
            f"CNTK cannot load {lib} (OpenMPI 1.10 soname) in {python}.",
            hint=f"`{APT_FIX}` then `tf2cntk setup` (it creates the compat links in "
                 f"{mpi_compat_dir_for(python)})")
    if "No module named 'cntk'" in stderr or "No module named cntk" in stderr:
        return EnvironmentProblem(f"cntk is not installed in {python}.",
                                  hint=f"`{python} -m pip install cntk=={CNTK_VERSION}` or "
                                       "`tf2cntk setup`")
    if "No module named 'numpy'" in stderr:
        return EnvironmentProblem(f"numpy is not installed in {python}: it is not a CNTK "
                                  "environment's interpreter.",
                                  hint=f"unset {ENV_CNTK_PYTHON} / --tf2cntk-cntk-python, or run "
                                       "`tf2cntk setup`")
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return EnvironmentProblem(summary.format(last=last[0]) if summary
                              else f"CNTK does not work in {python}: {last[0]}",
                              hint="run `tf2cntk doctor`, or `tf2cntk setup --force` to rebuild "
                                   "the environment")


def installed_cntk_dist(python: Path) -> str | None:
    """'cntk' or 'cntk-gpu' as pip sees it in the env, or None."""
    done = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze",
                           "--disable-pip-version-check"], capture_output=True, text=True,
                          check=False, env=worker_environ(python))
    for line in done.stdout.splitlines():
        name = line.split("==")[0].lower()
        if name in ("cntk", "cntk-gpu"):
            return name
    return None


def setup(env_dir: Path | None = None, base_python: str | None = None, gpu: bool = False,
          force: bool = False, log: Callable[[str], None] = print) -> SetupResult:
    """Create (or confirm) the CNTK environment. Idempotent: a working env returns at once."""
    env_dir = Path(env_dir or default_env_dir()).absolute()
    python = env_python(env_dir)
    compat = env_dir / MPI_COMPAT_DIRNAME
    wanted = "cntk-gpu" if gpu else "cntk"
    if python.exists() and not force:
        ensure_mpi_compat(compat, log)
        try:
            proof = prove(python)
        except EnvironmentProblem:
            proof = ""
        if (proof and matches_lock(env_dir, gpu)
                and (not gpu or installed_cntk_dist(python) == wanted)):
            return SetupResult(env_dir, python, proof, already_done=True)
    base = find_python36(base_python)
    log(f"using CPython 3.6 at {base}")
    if force and env_dir.exists():
        shutil.rmtree(env_dir)
    if not python.exists():
        log(f"creating venv {env_dir} ...")
        done = subprocess.run([str(base), "-m", "venv", str(env_dir)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise EnvironmentProblem(f"`{base} -m venv {env_dir}` failed: {done.stderr.strip()}",
                                     hint="install the venv module for Python 3.6 "
                                          "(e.g. python3.6-venv)")
    ensure_mpi_compat(compat, log)
    install_locked(env_dir, wanted, log)
    proof = prove(python)
    return SetupResult(env_dir, python, proof, already_done=False)


# ---------------------------------------------------------------------------------------------
# Lock files: the exact versions (with sha256 hashes) that setup installs. They ship beside this
# module as package data, so `tf2cntk setup` after installing the wheel needs no checkout;
# `make lock` (locks/refresh.py) recreates them from cntk==CNTK_VERSION and its own ranges.

LOCK_FILES = {"cntk": "lock-cntk.txt", "cntk-gpu": "lock-cntk-gpu.txt"}
# Present in every venv from the base interpreter's ensurepip; the locks leave them alone.
UNLOCKED_DISTS = ("pip", "setuptools", "wheel")


def lock_file(dist: str) -> Path:
    return Path(__file__).with_name(LOCK_FILES[dist])


def canonical_name(name: str) -> str:
    """PEP 503 form: lower case, runs of '-', '_' and '.' as one '-'."""
    return "-".join(filter(None, name.lower().replace("_", "-").replace(".", "-").split("-")))


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file's ``name==version`` lines (hash lines skipped)."""
    pins: dict[str, str] = {}
    for raw in path.read_text("utf-8").splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.split(";", 1)[0].split()[0].partition("==")
        if not sep:
            raise EnvironmentProblem(f"{path}: {raw.strip()!r} is not pinned with ==",
                                     hint="recreate the lock files with `make lock`")
        pins[canonical_name(name)] = version
    return pins


def installed_versions(env_dir: Path) -> dict[str, str]:
    """{canonical name: version} from the env's ``*.dist-info/METADATA``, read from here.

    No interpreter starts, so setup's no-op path stays as fast as it was, and this is the true
    version: pip 18.1 (Python 3.6's) reports cntk as 2.7, the name of its dist-info folder,
    whose METADATA says 2.7.post2.
    """
    found: dict[str, str] = {}
    pattern = os.path.join(str(env_dir), "lib", "python3*", "site-packages", "*.dist-info",
                           "METADATA")
    for meta in glob.glob(pattern):
        name = version = None
        try:
            with open(meta, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        break  # end of the headers
                    key, _, value = line.partition(":")
                    if key == "Name":
                        name = value.strip()
                    elif key == "Version":
                        version = value.strip()
        except OSError:
            continue
        if name and version:
            found[canonical_name(name)] = version
    return found


def lock_differences(env_dir: Path, dist: str, lock: Path | None = None) -> list[str]:
    """What in the env differs from ``dist``'s lock ("numpy 1.19.4 (lock 1.19.5)"); [] if none."""
    installed = installed_versions(env_dir)
    return [f"{name} {installed.get(name, 'missing')} (lock {version})"
            for name, version in sorted(read_lock(lock or lock_file(dist)).items())
            if installed.get(name) != version]


def matches_lock(env_dir: Path, gpu: bool) -> bool:
    """Setup's no-op check. Without --gpu a working cntk-gpu env is kept, held to its own lock."""
    installed = installed_versions(env_dir)
    dist = "cntk-gpu" if gpu or ("cntk-gpu" in installed and "cntk" not in installed) else "cntk"
    return not lock_differences(env_dir, dist)


def install_locked(env_dir: Path, dist: str, log: Callable[[str], None] = print,
                   lock: Path | None = None) -> None:
    """``pip install --require-hashes -r <dist's lock>`` in the env, then check what it left."""
    python = env_python(env_dir)
    lock = lock or lock_file(dist)
    pins = read_lock(lock)
    if pins.get(dist) != CNTK_VERSION:
        raise EnvironmentProblem(f"{lock} pins {dist} {pins.get(dist, 'not at all')}, not "
                                 f"{CNTK_VERSION}: the lock is stale.",
                                 hint="recreate the lock files with `make lock`")
    installed = installed_versions(env_dir)
    other = "cntk" if dist == "cntk-gpu" else "cntk-gpu"
    if other in installed:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", other], check=False,
                       capture_output=True, env=worker_environ(python), cwd=str(env_dir))
    drift = lock_differences(env_dir, dist, lock) if any(n in installed for n in pins) else []
    if drift:
        log(f"{env_dir} differs from {lock.name}: {', '.join(drift)}")
    log(f"installing {dist}=={CNTK_VERSION} and its dependencies at the versions in {lock.name} "
        "(this takes a while the first time) ...")
    # cwd: pip 18.1 puts its working directory on sys.path and would see a checkout's egg-info.
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--require-hashes", "-r", str(lock)], capture_output=True, text=True,
                          check=False, env=worker_environ(python), cwd=str(env_dir))
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise EnvironmentProblem(f"pip could not install {lock}:\n{tail}",
                                 hint=f"check network access to PyPI, then `{python} -m pip "
                                      f"install --require-hashes -r {lock}`")
    left = lock_differences(env_dir, dist, lock)
    if left:
        raise EnvironmentProblem(f"after installing {lock}, {env_dir} still differs from it: "
                                 + ", ".join(left),
                                 hint="`tf2cntk setup --force` rebuilds the environment")
