"""RoPE on CPU as one compiled pass (optional): reads each pair and its cos/sin once, writes once.

The rotation (Su et al. 2021, RoFormer, arXiv 2104.09864, Eq. 34) of each channel pair
``(x1, x2)`` by ``sign * theta``::

    y1 = x1 cos(theta) - sign * x2 sin(theta),    y2 = x2 cos(theta) + sign * x1 sin(theta)

with pairs ``(i, i + r/2)`` (half-split) or ``(2i, 2i + 1)`` (interleaved). The eager path
(``rotary_cpu.py``) needs four elementwise passes per chunk for the half-split layout; this one
is a single loop, so it runs at close to the cost of copying ``x``.

The C++ source below is compiled with ``torch.utils.cpp_extension.load_inline`` on first
request (tens of seconds, needs a C++ compiler and ninja) into a cache directory
(``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/posemb/torch_extensions``), so later processes
on the same machine only load it. Nothing here compiles implicitly: :func:`load` is called by
``posemb.kernels.load_compiled_cpu``, by ``posemb bench``, or on the first CPU call when the
environment variable ``POSEMB_COMPILED_KERNELS=1`` is set.

Code is portable (``-O3``, no ``-march``): the inner loops run over one row's pairs into two
small ``__restrict`` buffers, so the compiler vectorises them; on x86-64 Linux the row function
is also cloned for AVX2 and picked at load time (``target_clones``); bf16/fp16
are converted with branch-free bit arithmetic for the same reason. ``-fopenmp`` is needed because
``at::parallel_for`` is inlined from the OpenMP header of torch's build (without it the loop runs
on one thread); the extension then shares torch's already loaded ``libgomp``.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
from torch import Tensor

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <cmath>

// On x86-64 Linux the row loop is compiled twice, for AVX2 and for the baseline ISA, and the
// loader picks one at run time (GCC/clang function multi-versioning): the build stays portable
// (no -march) while AVX2 machines get 8-wide loops. Measured: 2x on bf16/fp16, 1.2x interleaved.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define POSEMB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define POSEMB_CLONES
#endif

namespace {

// Element conversions written branch-free on the bit patterns so the loops vectorise with the
// baseline ISA (c10's Half conversion is not inlined into vector code without F16C).
inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct Bf16 { using Store = uint16_t; using Math = float;
  static inline float in(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
  static inline uint16_t out(float f) {  // round to nearest even; NaN stays a quiet NaN
    uint32_t u = float_to_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
};

struct Fp16 { using Store = uint16_t; using Math = float;
  // IEEE half <-> single, the magic-number method of Maratea's FP16 library (MIT).
  static inline float in(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    // Selects as bit masks, not branches, so GCC's if-conversion keeps the loop vectorisable.
    const uint32_t tiny = 0u - static_cast<uint32_t>(two_w < (1u << 27));
    const uint32_t result = sign | (float_to_bits(denormalized) & tiny) | (float_to_bits(normalized) & ~tiny);
    return bits_to_float(result);
  }
  static inline uint16_t out(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    const uint32_t low = 0u - static_cast<uint32_t>(bias < 0x71000000u);
    bias = (bias & ~low) | (0x71000000u & low);
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
    return static_cast<uint16_t>((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
  }
};

template <typename F> struct Same { using Store = F; using Math = F;
  static inline F in(F v) { return v; }
  static inline F out(F v) { return v; }
};

// One row: `rh` rotated pairs, then the pass-through tail (dim - 2*rh channels) when copying.
template <typename K>
POSEMB_CLONES
void rotate_row(const typename K::Store* x, typename K::Store* y, const float* __restrict c,
                const float* __restrict s, int64_t rh, int64_t dim, bool interleaved, typename K::Math sign,
                bool copy_tail, typename K::Math* __restrict buf1, typename K::Math* __restrict buf2) {
  using C = typename K::Math;
  // x and y may be the same row (in place), so they are not __restrict: the pair results go
  // through two small per-thread buffers, which lets the compiler vectorise both loops.
  if (!interleaved) {
    const auto* x1 = x; const auto* x2 = x + rh;
    for (int64_t i = 0; i < rh; ++i) {
      C a = K::in(x1[i]), b = K::in(x2[i]);
      C cc = static_cast<C>(c[i]), ss = sign * static_cast<C>(s[i]);
      buf1[i] = a * cc - b * ss;
      buf2[i] = b * cc + a * ss;
    }
    auto* y1 = y; auto* y2 = y + rh;
    for (int64_t i = 0; i < rh; ++i) { y1[i] = K::out(buf1[i]); y2[i] = K::out(buf2[i]); }
  } else {
    for (int64_t i = 0; i < rh; ++i) {
      C a = K::in(x[2 * i]), b = K::in(x[2 * i + 1]);
      C cc = static_cast<C>(c[i]), ss = sign * static_cast<C>(s[i]);
      buf1[i] = a * cc - b * ss;
      buf2[i] = b * cc + a * ss;
    }
    for (int64_t i = 0; i < rh; ++i) { y[2 * i] = K::out(buf1[i]); y[2 * i + 1] = K::out(buf2[i]); }
  }
  if (copy_tail) {
    for (int64_t j = 2 * rh; j < dim; ++j) y[j] = x[j];
  }
}

template <typename K>
void run(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& cos, const torch::Tensor& sin,
         bool interleaved, double sign) {
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  const int64_t rh = cos.size(2);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : L * rh;  // cos/sin are contiguous (B|1, L, rh)
  using T = typename K::Store;
  using C = typename K::Math;
  const T* xp = static_cast<const T*>(x.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  // In place means the very same elements (pointer and strides); only then is the tail already there.
  const bool same = xp == op && xs0 == os0 && xs1 == os1 && xs2 == os2;
  const bool copy_tail = !same && (2 * rh < D);
  const C sg = static_cast<C>(sign);
  const int64_t rows = B * H * L;
  // Grain: about 32 KiB of x per task so threads share the work evenly without overhead.
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, D * (int64_t)sizeof(T)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<C> b1(rh), b2(rh);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = r % L, bh = r / L, h = bh % H, b = bh / H;
      const float* c = cp + b * cb + l * rh;
      const float* s = sp + b * cb + l * rh;
      rotate_row<K>(xp + b * xs0 + h * xs1 + l * xs2, op + b * os0 + h * os1 + l * os2, c, s, rh, D,
                    interleaved, sg, copy_tail, b1.data(), b2.data());
    }
  });
}

}  // namespace

torch::Tensor rotate(torch::Tensor x, torch::Tensor out, torch::Tensor cos, torch::Tensor sin,
                     bool interleaved, double sign) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4, "x and out must be 4-D");
  TORCH_CHECK(x.stride(3) == 1 && out.stride(3) == 1, "last dim must be contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin must be float32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos/sin must be contiguous");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out dtypes differ");
  switch (x.scalar_type()) {
    case at::kFloat: run<Same<float>>(x, out, cos, sin, interleaved, sign); break;
    case at::kDouble: run<Same<double>>(x, out, cos, sin, interleaved, sign); break;
    case at::kBFloat16: run<Bf16>(x, out, cos, sin, interleaved, sign); break;
    case at::kHalf: run<Fp16>(x, out, cos, sin, interleaved, sign); break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
  return out;
}
"""

_CPP_DECL = ("torch::Tensor rotate(torch::Tensor x, torch::Tensor out, torch::Tensor cos, torch::Tensor sin, "
             "bool interleaved, double sign);")

_NAME = "posemb_rotary_cpu_v7"
_lock = threading.Lock()
_module = None
_failed: str | None = None
#: Seconds the last :func:`load` took (compile or cache load), or None before any load.
last_load_seconds: float | None = None


def build_directory() -> str:
    """Where the extension is built and cached: ``$TORCH_EXTENSIONS_DIR/<name>`` or
    ``~/.cache/posemb/torch_extensions/<name>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "posemb", "torch_extensions")
    return os.path.join(root, _NAME)


def is_built() -> bool:
    """Whether a build of this kernel version is in the cache (then loading takes well under a second)."""
    return os.path.exists(os.path.join(build_directory(), f"{_NAME}.so"))


def _put_pip_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH. The ``ninja`` wheel (a test/bench extra) installs it
    into the environment's bin folder, which is not on PATH when Python is called by its full path
    (``.venv/bin/python -m pytest``), so add that folder if ninja is not found otherwise."""
    import shutil
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def loaded() -> bool:
    """Whether the compiled kernel is loaded in this process (``auto`` then selects it)."""
    return _module is not None


def load(build: bool = True) -> bool:
    """Load the compiled kernel, compiling it first if needed and ``build`` is true.

    Returns False, with one warning line, when it cannot be built (no compiler or ninja); never
    raises for that. With ``build=False`` it only loads an existing build from the cache.
    """
    global _module, _failed, last_load_seconds
    if _module is not None:
        return True
    if _failed is not None:
        return False
    with _lock:
        if _module is not None:
            return True
        directory = build_directory()
        if not build and not is_built():
            return False
        import time
        start = time.perf_counter()
        try:
            from torch.utils import cpp_extension
            _put_pip_ninja_on_path()
            os.makedirs(directory, exist_ok=True)
            module = cpp_extension.load_inline(
                name=_NAME, cpp_sources=[_CPP_DECL, _CPP_SOURCE], functions=["rotate"],
                # -ffp-contract=off: no FMA contraction, so results round like the reference's.
                extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=directory, verbose=False)
        except Exception as error:  # no compiler, no ninja, failed build: eager path stays in use
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            _failed = f"{type(error).__name__}: {first}"
            warnings.warn(f"posemb: compiled CPU RoPE kernel unavailable ({_failed}); using the eager path",
                          RuntimeWarning, stacklevel=2)
            return False
        last_load_seconds = time.perf_counter() - start
        _module = module
        return True


def unload() -> None:
    """Stop using the kernel in this process (``auto`` reverts to the eager path). The shared
    library stays mapped, so a later :func:`load` is immediate."""
    global _module
    _module = None


def supports(x: Tensor, out: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether :func:`rotate_compiled` handles these tensors (else use the eager CPU path)."""
    return (x.device.type == "cpu" and out.device.type == "cpu"
            and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            and x.stride(-1) == 1 and out.stride(-1) == 1)


def rotate_compiled(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, *, interleaved: bool,
                    sign: float = 1.0) -> Tensor:
    """Write the rotation of ``x`` (B, H, L, D) into ``out`` (may be ``x``) in one compiled pass.

    Same contract as :func:`posemb.kernels.rotary_cpu.rotate_cpu`; falls back to it for tensors
    the kernel does not take (last dim not contiguous, other dtypes, tables not float32) or when
    it is not loaded."""
    if _module is None or not supports(x, out, cos, sin):
        from posemb.kernels.rotary_cpu import rotate_cpu
        return rotate_cpu(x, cos, sin, out, interleaved=interleaved, sign=sign)
    cos, sin = cos.contiguous(), sin.contiguous()
    _module.rotate(x, out, cos, sin, interleaved, float(sign))
    return out
