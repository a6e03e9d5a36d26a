"""fastattn: fused attention kernels for PyTorch.

Builds the pure-Python package (Triton kernels are compiled at run time) and, when nvcc is found, the CUDA C++
extension fastattn._C from csrc/ (pybind11, no torch headers: it builds against any torch).

Environment:
    FASTATTN_BUILD_CUDA   unset: build fastattn._C if nvcc is found; 0: never; 1: required (error without nvcc).
                          With nvcc found, a failed compile is an error (CI's compile check), never skipped.
    FASTATTN_CUDA_ARCHS   ";"-separated compute capabilities, default "80;90" (e.g. "80;86;90a"): one
                          -gencode arch=compute_XX,code=sm_XX each.
    CUDA_HOME, NVCC, CXX  where the toolkit, nvcc and the host compiler are (defaults: found on PATH).
    FASTATTN_BUILD_EMULATOR  0: skip fastattn._C_emu, the same kernels compiled by the host compiler for the
                          CPU emulator (csrc/emulate/; built with fastattn._C by default, it needs the CUDA
                          toolkit's headers, not a GPU). asan: also fastattn._C_emu_asan, the emulator under
                          AddressSanitizer and UBSan (`make emu-memcheck`).
    MAX_JOBS              parallel compile jobs (default: the number of CPUs).
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.develop import develop

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90"


class OfflineDevelop(develop):
    """`pip install -e .` without a pyproject.toml runs `setup.py develop` on pip < 25; setuptools >= 80 turns
    that into a nested `pip install -e . --use-pep517` *with* build isolation, which needs an index and fails
    on an offline GPU machine. Run the nested install without isolation, with the build tools already here."""

    def run(self):
        if int(setuptools.__version__.split(".")[0]) < 80:
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--use-pep517", "--no-deps", "-e", "."]
        for flag, value in (("--prefix", getattr(self, "prefix", None)), ("--target", self.install_dir)):
            if value:
                cmd += [flag, value]
        if getattr(self, "user", False):
            cmd.append("--user")
        subprocess.check_call(cmd)


# ------------------------------------------------------------------------------------------- CUDA extension
def _log(msg: str) -> None:
    print(f"fastattn: {msg}", flush=True)


def _find_nvcc():
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root (include/cuda_runtime.h); nvcc may be a wrapper script outside it."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(os.path.realpath(nvcc)).parent.parent]
    try:  # nvcc -### names its own install dir (TOP=...), also for a wrapper script
        out = subprocess.run([nvcc, "-###", "--version"], capture_output=True, text=True, timeout=60)
        candidates += re.findall(r"^#\$ TOP=(\S+)", out.stdout + out.stderr, flags=re.M)
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise RuntimeError(f"fastattn: found {nvcc} but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


def cuda_archs() -> list[str]:
    """FASTATTN_CUDA_ARCHS as ["80", "90", "90a", ...] ("8.0" and "sm_80" accepted)."""
    raw = os.environ.get("FASTATTN_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = []
    for a in re.split(r"[;,\s]+", raw):
        a = a.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not a:
            continue
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise SystemExit(f"fastattn: FASTATTN_CUDA_ARCHS={raw!r}: {a!r} is not a compute capability like 80 or 90a")
        if a not in archs:
            archs.append(a)
    return archs


class CudaExtension(Extension):
    """fastattn._C: .cu files compiled by nvcc and bindings.cpp by the host compiler, in parallel, linked
    against the static CUDA runtime (the .so needs no libcudart on the loader path). With emulate=True,
    fastattn._C_emu: the same sources compiled by the host compiler for the CPU emulator (csrc/emulate/); with
    sanitize=True too, fastattn._C_emu_asan: that under AddressSanitizer and UBSan."""

    def __init__(self, name, sources, emulate=False, sanitize=False):
        super().__init__(name, sources=sources)
        self.emulate = emulate
        self.sanitize = sanitize


class BuildExt(build_ext):
    """Compiles the sources of every CudaExtension in one pool of MAX_JOBS jobs (longest first), then links each."""

    def build_extensions(self):
        ours = [e for e in self.extensions if isinstance(e, CudaExtension)]
        for ext in self.extensions:
            if ext not in ours:
                self.build_extension(ext)
        if not ours:
            return
        t0 = time.time()
        nvcc = _find_nvcc()
        home = _cuda_home(nvcc)
        archs = cuda_archs()
        jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
        plans = [(ext, self._commands(ext, nvcc, home, archs, jobs)) for ext in ours]
        for ext, _ in plans:
            what = ("the CPU emulator (host compiler" + (", ASan + UBSan)" if ext.sanitize else ")")) if ext.emulate else f"sm_{', sm_'.join(archs)} with {nvcc}"
            _log(f"building {ext.name} for {what} ({len(ext.sources)} files)")

        def compile_one(item):
            src, obj, cmd, fresh = item
            if fresh and not self.force:
                return src, None, 0.0
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return src, f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}", time.time() - t
            if r.stderr.strip():
                print(r.stderr, file=sys.stderr, end="")
            return src, None, time.time() - t

        items = sorted((c for _, cmds in plans for c in cmds), key=lambda c: -c[0].stat().st_size)
        failures, compiled = [], set()
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for item, (src, err, secs) in zip(items, pool.map(compile_one, items)):
                rel = src.relative_to(ROOT)
                if err:
                    failures.append(err)
                    _log(f"FAILED {rel} ({item[1].parent.name})")
                elif secs:
                    compiled.add(item[1])
                    _log(f"compiled {rel} for {item[1].parent.name} ({secs:.0f}s)")
        if failures:
            raise RuntimeError("fastattn: building the CUDA extension failed (set FASTATTN_BUILD_CUDA=0 to build "
                               "without it):\n" + "\n".join(failures))
        for ext, cmds in plans:
            self._link(ext, cmds, home, fresh=not any(c[1] in compiled for c in cmds), t0=t0)

    def _commands(self, ext, nvcc, home, archs, jobs):
        """(source, object, command, up to date) for each source of ext."""
        import pybind11

        objdir = Path(self.build_temp) / ext.name.split(".")[-1]
        objdir.mkdir(parents=True, exist_ok=True)
        includes = ["-I", str(CSRC), "-I", str(home / "include")]
        python = ["-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
        cxx = shutil.which(os.environ.get("CXX", "c++")) or "g++"
        headers_mtime = max((h.stat().st_mtime for h in CSRC.rglob("*") if h.suffix in (".h", ".cuh")), default=0)
        commands = []
        for src in (ROOT / s for s in ext.sources):
            obj = objdir / (str(src.relative_to(CSRC)).replace(os.sep, "_") + ".o")
            if ext.emulate:  # every source as C++; kernels compiled at -O2, strict aliasing on (it finds UB)
                cmd = [cxx, "-x", "c++", "-c", str(src), "-o", str(obj), "-O2", "-std=c++20", "-fPIC",
                       "-fvisibility=hidden", "-DFASTATTN_EMULATE", f"-DFASTATTN_MODULE={ext.name.split('.')[-1]}",
                       f'-DFASTATTN_VERSION="{VERSION}"', *includes, *python, *_sanitize_flags(ext)]
            elif src.suffix == ".cu":
                cmd = [nvcc, "-c", str(src), "-o", str(obj), "-O3", "-std=c++17", "-lineinfo",
                       "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                       "--threads", str(min(len(archs), jobs)), *includes,
                       *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)]
            else:
                cmd = [cxx, "-c", str(src), "-o", str(obj), "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden",
                       *includes, *python, f'-DFASTATTN_CUDA_ARCHS="{";".join(archs)}"',
                       f'-DFASTATTN_VERSION="{VERSION}"']
            fresh = obj.exists() and obj.stat().st_mtime > max(src.stat().st_mtime, headers_mtime,
                                                                Path(__file__).stat().st_mtime)
            commands.append((src, obj, cmd, fresh))
        return commands

    def _link(self, ext, commands, home, fresh, t0):
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        if fresh and out.exists() and out.stat().st_mtime > max(c[1].stat().st_mtime for c in commands):
            _log(f"{out.name} is up to date")
            return
        cxx = shutil.which(os.environ.get("CXX", "c++")) or "g++"
        libdir = next((d for d in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
                       if (d / "libcudart_static.a").exists() or (d / "libcudart.so").exists()), home / "lib64")
        if ext.emulate:  # no CUDA runtime: csrc/emulate/runtime.cpp stands in for the calls the host code makes
            cudart = []
        elif (libdir / "libcudart_static.a").exists():
            cudart = ["-L", str(libdir), "-lcudart_static", "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL"]
        else:  # no static runtime: the .so then needs a libcudart on the loader path at import
            cudart = ["-L", str(libdir), "-lcudart", f"-Wl,-rpath,{libdir}"]
        cmd = [cxx, "-shared", "-o", str(out), *(str(c[1]) for c in commands), *cudart, *_sanitize_flags(ext)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"fastattn: linking {ext.name} failed:\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        _log(f"built {out.name} in {time.time() - t0:.0f}s")


def _sanitize_flags(ext) -> list:
    # UBSan stops at the first report, like ASan: a test run under them fails instead of printing and passing.
    return (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
            if ext.sanitize else [])


def extensions() -> list:
    want = os.environ.get("FASTATTN_BUILD_CUDA", "").strip()
    if want == "0":
        _log("FASTATTN_BUILD_CUDA=0: building the pure-Python package without the CUDA extension fastattn._C")
        return []
    if _find_nvcc() is None:
        if want == "1":
            raise SystemExit("fastattn: FASTATTN_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        _log("nvcc not found: building the pure-Python package without the CUDA extension fastattn._C")
        return []
    cuda_archs()  # reject a bad FASTATTN_CUDA_ARCHS before anything is built
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu")) + ["csrc/bindings.cpp"]
    exts = [CudaExtension("fastattn._C", sources=sources)]
    emulator = os.environ.get("FASTATTN_BUILD_EMULATOR", "").strip()
    if emulator != "0":
        exts.append(CudaExtension("fastattn._C_emu", sources=sources + ["csrc/emulate/runtime.cpp"], emulate=True))
    if emulator == "asan":
        exts.append(CudaExtension("fastattn._C_emu_asan", sources=sources + ["csrc/emulate/runtime.cpp"],
                                  emulate=True, sanitize=True))
    return exts


setup(
    name="fastattn",
    version=VERSION,
    description="Fused attention, softmax and LayerNorm kernels (Triton, CUDA C++) for PyTorch",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "tqdm"],
    ext_modules=extensions(),
    cmdclass={"develop": OfflineDevelop, "build_ext": BuildExt},
)
