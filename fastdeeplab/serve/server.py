"""Run a real Triton Inference Server on a model repository that ``fastdeeplab deploy`` wrote.

Which server: the ``tritonserver`` on ``PATH`` (NVIDIA's NGC images), else the one bundled in the PyPI wheel
``nvidia-pytriton`` (Triton 2.51, python backend only), fetched once with ``pip download`` and unpacked into the
cache (``$FASTDEEPLAB_CACHE``, else ``$XDG_CACHE_HOME/fastdeeplab``, else ``~/.cache/fastdeeplab``). That wheel
is never installed into the user's environment: it declares ``numpy<2`` and ``tritonclient~=2.50``, which would
downgrade the project's own.

The python backend's stub embeds CPython and needs numpy < 2 and onnxruntime. For the bundled server the launcher
builds, once, a plain venv in the cache with a shared-library Python whose version has a stub in the wheel
(3.8-3.13: the running interpreter when it is built shared, else ``python3.X`` on ``PATH``), and hands it to each
python-backend model as Triton's ``EXECUTION_ENV_PATH``. The repository's files are not changed for that: the
server starts in explicit model-control mode and each model is loaded with its own ``config.pbtxt`` plus that
parameter (Triton's config override on load). A model whose backend the server lacks (``onnxruntime`` and
``tensorrt`` in the bundled server) is skipped with a note; the python-backend model serves the same graph.

>>> with TritonServer("model_repository", http_port=0, grpc_port=0, metrics_port=0) as server:   # doctest: +SKIP
...     print(server.http_url, server.models)
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PYTRITON_VERSION", "STUB_REQUIREMENTS", "ServerInstall", "TritonServer", "cache_dir",
           "find_tritonserver", "free_port", "stub_environment"]

PYTRITON_VERSION = "0.7.0"  # bundles tritonserver 2.51.0 and its python backend
STUB_REQUIREMENTS = ("numpy>=1.24,<2", "onnxruntime>=1.17")
_COMPLETE = ".complete"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def cache_dir() -> Path:
    """Where the unpacked server and the stub's environment live: ``serve/`` in the package's cache folder
    (:func:`fastdeeplab._io.cache_dir`: ``$FASTDEEPLAB_CACHE`` moves it)."""
    from .._io import cache_dir as package_cache_dir

    return package_cache_dir() / "serve"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time builds things in ``directory`` (another ``serve`` waits for it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: list[str], what: str, timeout: float = 900) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines()
                 if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
        raise RuntimeError(f"{what} failed: {lines[-1] if lines else f'exit code {result.returncode}'} "
                           f"(command: {' '.join(command)})")


@dataclass
class ServerInstall:
    """A ``tritonserver`` executable, its backend directory, and (bundled only) the stub's Python versions."""

    executable: Path
    backends: Path
    bundled: bool
    stub_versions: tuple[str, ...] = ()

    @property
    def available_backends(self) -> set[str]:
        return {p.name for p in self.backends.iterdir() if p.is_dir()} if self.backends.is_dir() else set()


def _bundled_root() -> Path:
    return cache_dir() / f"nvidia-pytriton-{PYTRITON_VERSION}"


def _unpack_bundled(progress: Progress) -> Path:
    """Fetch the ``nvidia-pytriton`` wheel with pip and unpack it into the cache (once); return its root."""
    root = _bundled_root()
    if (root / _COMPLETE).is_file():
        return root
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"no tritonserver on PATH, and the bundled one (nvidia-pytriton {PYTRITON_VERSION}) "
                           f"runs only on Linux x86_64, not {platform.system()} {platform.machine()}; use NVIDIA's "
                           "tritonserver container image")
    with _locked(cache_dir()):
        if (root / _COMPLETE).is_file():
            return root
        shutil.rmtree(root, ignore_errors=True)
        wheels = root.parent / f".wheels-{os.getpid()}"
        shutil.rmtree(wheels, ignore_errors=True)
        progress(f"fetching tritonserver (pip download nvidia-pytriton=={PYTRITON_VERSION}, ~55 MB) into {root}")
        try:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
                  "-q", "-d", str(wheels), f"nvidia-pytriton=={PYTRITON_VERSION}"],
                 "downloading the tritonserver wheel (needs Linux x86_64, glibc >= 2.35 and PyPI access)")
            wheel = next(wheels.glob("nvidia_pytriton-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                for info in archive.infolist():
                    if not (info.filename.startswith("pytriton/tritonserver/")
                            or info.filename.startswith("nvidia_pytriton.libs/")):
                        continue
                    target = Path(archive.extract(info, root))
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        target.chmod(mode)
        finally:
            shutil.rmtree(wheels, ignore_errors=True)
        server = root / "pytriton" / "tritonserver"
        (server / "bin" / "tritonserver").chmod(0o755)
        for stub in (server / "python_backend_stubs").glob("*/triton_python_backend_stub"):
            stub.chmod(0o755)
        (root / _COMPLETE).write_text(PYTRITON_VERSION + "\n")
    return root


def find_tritonserver(progress: Progress = _quiet) -> ServerInstall:
    """The ``tritonserver`` on ``PATH`` (with ``<prefix>/backends``), else the bundled one (fetched once)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        exe = Path(on_path).resolve()
        backends = exe.parent.parent / "backends"
        return ServerInstall(exe, backends if backends.is_dir() else Path("/opt/tritonserver/backends"), False)
    server = _unpack_bundled(progress) / "pytriton" / "tritonserver"
    versions = tuple(sorted((p.name for p in (server / "python_backend_stubs").iterdir() if p.is_dir()),
                            key=lambda v: tuple(int(x) for x in v.split("."))))
    return ServerInstall(server / "bin" / "tritonserver", server / "backends", True, versions)


@dataclass
class StubPython:
    """A CPython built as a shared library: the stub of its version links its ``libpython3.X.so.1.0``."""

    version: str
    executable: Path
    library: Path


_PROBE = ("import sys, sysconfig as s, os; v = s.get_config_var; "
          "print(f'{sys.version_info[0]}.{sys.version_info[1]}', v('Py_ENABLE_SHARED') or 0, "
          "os.path.join(v('LIBDIR') or '', v('INSTSONAME') or ''), getattr(sys, '_base_executable', sys.executable), "
          "sep='\\n')")


def _probe_python(executable: str) -> StubPython | None:
    try:
        out = subprocess.run([executable, "-c", _PROBE], capture_output=True, text=True, timeout=60).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) < 4 or out[1].strip() != "1" or not Path(out[2]).is_file():
        return None
    return StubPython(out[0], Path(out[3]), Path(out[2]))


def _stub_python(versions: tuple[str, ...]) -> StubPython:
    candidates = [sys.executable] + [f"python{v}" for v in reversed(versions)] + ["python3"]
    seen = set()
    for name in candidates:
        path = shutil.which(name) if os.sep not in name else name
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        found = _probe_python(path)
        if found is not None and found.version in versions:
            return found
    raise RuntimeError(f"Triton's python backend needs a CPython {versions[0]}-{versions[-1]} built as a shared "
                       "library (libpython3.X.so.1.0), and none was found: this Python is static; install your "
                       "system's python3 (e.g. Debian/Ubuntu `apt install python3 python3-venv`)")


@dataclass
class StubEnvironment:
    """What the bundled server's python backend needs: the stub's Python and the venv it runs models in."""

    python: StubPython
    venv: Path
    library_dir: Path  # holds only a link to libpython3.X.so.1.0, put on the server's LD_LIBRARY_PATH


# Read by the stub's Python at start-up (site imports a .pth file's "import" lines). The stub ignores PYTHON*
# variables, PYTHONDONTWRITEBYTECODE included, and would otherwise write model.py's __pycache__ into the model
# folder: serving leaves the repository as deploy wrote it.
_NO_BYTECODE = ("fastdeeplab_no_bytecode.pth", "import sys; sys.dont_write_bytecode = True\n")


def _no_bytecode(site_packages: Path) -> None:
    """Put :data:`_NO_BYTECODE` into the stub venv's ``site-packages`` (also in venvs built before it existed)."""
    name, text = _NO_BYTECODE
    pth = site_packages / name
    if site_packages.is_dir() and not (pth.is_file() and pth.read_text() == text):
        tmp = pth.with_name(f".{name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, pth)


def stub_environment(install: ServerInstall, progress: Progress = _quiet) -> StubEnvironment:
    """Build (once, in the cache) the stub's venv with :data:`STUB_REQUIREMENTS`; copy the stub of that Python's
    version into ``backends/python``; return where everything is."""
    python = _stub_python(install.stub_versions)
    key = hashlib.sha256(f"{python.executable}|{python.library}|{STUB_REQUIREMENTS}".encode()).hexdigest()[:10]
    venv = cache_dir() / f"stub-env-py{python.version}-{key}"
    library_dir = cache_dir() / f"libpython-{python.version}-{key}"
    with _locked(cache_dir()):
        if not (venv / _COMPLETE).is_file():  # built where it stays: a venv does not survive a rename
            shutil.rmtree(venv, ignore_errors=True)
            progress(f"building the python backend's environment (Python {python.version}, "
                     f"{', '.join(STUB_REQUIREMENTS)}) in {venv}")
            _run([str(python.executable), "-m", "venv", "--without-pip", str(venv)], "creating the stub's venv")
            _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-input",
                  "-q", *STUB_REQUIREMENTS], "installing numpy<2 and onnxruntime into the stub's venv")
            (venv / _COMPLETE).write_text("\n".join(STUB_REQUIREMENTS) + "\n")
        _no_bytecode(venv / "lib" / f"python{python.version}" / "site-packages")
        library_dir.mkdir(parents=True, exist_ok=True)
        link = library_dir / python.library.name
        if not link.is_symlink() or os.readlink(link) != str(python.library):
            link.unlink(missing_ok=True)
            link.symlink_to(python.library)
        stub = install.backends.parent / "python_backend_stubs" / python.version / "triton_python_backend_stub"
        target = install.backends / "python" / stub.name  # this depth: its RPATH is $ORIGIN/../../../../<libs>
        if not target.is_file() or target.stat().st_size != stub.stat().st_size or \
                target.read_bytes() != stub.read_bytes():
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(stub, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, target)
    return StubEnvironment(python, venv, library_dir)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(f"{flag} {port}: {host}:{port} is in use or not allowed ({exc.strerror}); pick another "
                          f"port ({flag} 0 picks a free one)") from None


@dataclass
class RepositoryModel:
    name: str
    backend: str
    config: dict


def read_repository(repository: Path) -> list[RepositoryModel]:
    """Every model folder (with a ``config.pbtxt``) in ``repository``, its config parsed with Triton's schema."""
    try:
        from google.protobuf import json_format
    except ImportError:
        raise ImportError("fastdeeplab serve needs protobuf and tritonclient: pip install 'fastdeeplab[serve]'") from None

    from .._io import read_regular_file
    from ..export.deploy import load_model_config

    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository}: " + ("Not a directory" if repository.exists()
                                                                      else "No such directory"))
    models = []
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_file = folder / "config.pbtxt"
        if not config_file.is_file():
            continue
        text = read_regular_file(config_file, max_bytes=1 << 20, what="config.pbtxt")
        try:
            config = load_model_config(text)
        except ImportError:
            raise ImportError("fastdeeplab serve reads config.pbtxt with Triton's schema from tritonclient: "
                              "pip install 'fastdeeplab[serve]'") from None
        except Exception as exc:  # noqa: BLE001 - protobuf's ParseError and friends
            raise ValueError(f"{config_file}: not a Triton model config: {exc}") from None
        name = config.name or folder.name
        if name != folder.name:
            raise ValueError(f"{config_file}: name {name!r} differs from its folder {folder.name!r}")
        backend = config.backend or {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}.get(
            config.platform, config.platform)
        models.append(RepositoryModel(name, backend, json_format.MessageToDict(config,
                                                                               preserving_proto_field_name=True)))
    if not models:
        raise ValueError(f"model repository {repository} holds no model (no <model>/config.pbtxt); write one with "
                         "`fastdeeplab deploy --out <repository>`")
    return models


def _set_parent_death_signal() -> None:  # runs in the child before exec: the server dies with its launcher
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on ``host``; a context manager (stopped on exit).

    Ports ``0`` are picked free at start. ``start()`` returns once every servable model is loaded (or raises
    with the server's own error); ``stop()`` ends the server and every process it started.
    """

    repository: str | os.PathLike
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    ready_timeout: float = 300.0
    progress: Progress = _quiet
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    models: dict[str, str] = field(default_factory=dict, init=False)
    skipped: dict[str, str] = field(default_factory=dict, init=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _request(self, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data,
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"error": raw.decode(errors="replace")}

    def _log_tail(self, lines: int = 6) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        useful = [line for line in text if "CudaDriverHelper" not in line and ("error" in line.lower()
                                                                               or line.startswith("E"))]
        return " | ".join((useful or text)[-lines:])

    def start(self) -> TritonServer:
        repository = Path(self.repository).resolve()
        models = read_repository(repository)
        for flag in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, flag)
            if not 0 <= port <= 65535:
                raise ValueError(f"--{flag.replace('_', '-')} must be in 0..65535, got {port}")
            if port == 0:
                setattr(self, flag, free_port(self.host))
            else:
                _check_port(self.host, port, f"--{flag.replace('_', '-')}")
        install = find_tritonserver(self.progress)
        available = install.available_backends
        servable = [m for m in models if m.backend in available]
        for m in models:
            if m.backend not in available:
                self.skipped[m.name] = (f"backend {m.backend!r} is not in this tritonserver ({install.backends}); "
                                        "NVIDIA's tritonserver images have it")
        if not servable:
            raise ValueError(f"model repository {repository}: no model this tritonserver can serve ("
                             + "; ".join(f"{n}: {why}" for n, why in self.skipped.items())
                             + "); write a python-backend model with `fastdeeplab deploy --backends python`")
        env = dict(os.environ)  # a tritonserver on PATH runs model.py in its own Python, which may write __pycache__
        stub = None
        if install.bundled and any(m.backend == "python" for m in servable):
            stub = stub_environment(install, self.progress)
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stub.library_dir),
                                                                   env.get("LD_LIBRARY_PATH")]))
        if self.log_path is None:
            logs = cache_dir() / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.log_path = logs / f"tritonserver-{self.http_port}.log"
            for old in sorted(logs.glob("tritonserver-*.log"), key=lambda f: f.stat().st_mtime)[:-20]:
                with contextlib.suppress(OSError):  # keep the 20 newest logs
                    old.unlink()
        command = [str(install.executable), f"--model-repository={repository}", "--model-control-mode=explicit",
                   f"--backend-directory={install.backends}", f"--http-address={self.host}",
                   f"--http-port={self.http_port}", f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                   f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                   "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--strict-readiness=true"]
        if install.bundled:  # a CPU-only server: no pinned or CUDA memory pools
            command += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
        self.progress(f"starting {install.executable} (log: {self.log_path})")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, preexec_fn=_set_parent_death_signal)
        try:
            self._wait_live()
            for model in servable:
                self._load(model, stub)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_live(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting: "
                                   f"{self._log_tail()} (log: {self.log_path})")
            with contextlib.suppress(OSError):
                if self._request("/v2/health/live", timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver was not live after {self.ready_timeout:.0f} s (log: {self.log_path})")

    def _load(self, model: RepositoryModel, stub: StubEnvironment | None) -> None:
        config = json.loads(json.dumps(model.config))
        if model.backend == "python" and stub is not None:
            config.setdefault("parameters", {})["EXECUTION_ENV_PATH"] = {"string_value": str(stub.venv)}
        self.progress(f"loading {model.name} ({model.backend} backend)")
        try:
            status, body = self._request(f"/v2/repository/models/{model.name}/load",
                                         {"parameters": {"config": json.dumps(config)}}, timeout=self.ready_timeout)
        except OSError as exc:
            raise RuntimeError(f"loading {model.name}: no answer from tritonserver ({exc}); "
                               f"{self._log_tail()} (log: {self.log_path})") from None
        if status != 200:
            raise RuntimeError(f"tritonserver could not load {model.name}: {body.get('error', body)} "
                               f"(log: {self.log_path})")
        self.models[model.name] = model.backend

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group (server and python-backend stubs), SIGKILL after ``timeout``
        seconds; returns when no process of the group is left."""
        process, self.process = self.process, None
        if process is None:
            return
        pgid = process.pid
        regions = _shared_memory_of_group(pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            process.wait(10)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.1)
        for region in regions:  # a killed server leaves its python-backend shared memory behind
            with contextlib.suppress(OSError):
                region.unlink()


def _shared_memory_of_group(pgid: int) -> set[Path]:
    """The python backend's shared-memory files mapped by the processes of group ``pgid`` (Linux /proc)."""
    regions = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (proc / "maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1]
                if path.startswith("/dev/shm/triton_python_backend_shm_region_"):
                    regions.add(Path(path.removesuffix(" (deleted)")))
        except (OSError, IndexError, ValueError):
            continue
    return regions


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
