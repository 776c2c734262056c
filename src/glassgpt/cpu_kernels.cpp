// glassgpt's CPU matrix-vector kernels: one token row times a float32, bf16 or int8 weight matrix.
//
// Decoding one token reads every weight once, so on a CPU its speed is the speed at which the weights
// stream from memory. PyTorch's own one-row products in bf16 and int8 stream them at about half of
// what the memory gives, and the fp32 one a little below it (docs/PERFORMANCE.md), so these kernels
// do only that: each thread walks its own block of weight rows front to back, asks for the bytes a
// few kilobytes ahead of where it reads (a software prefetch: with the widening and multiplying
// between loads, the processor alone keeps too few reads in flight to fill the memory's bandwidth),
// and multiplies in registers.
//
//   f32_matvec(x, weight, bias):       x fp32 (..., K) of one row, weight fp32 (N, K) -> fp32 (..., N)
//   bf16_matvec(x, weight, bias):      x bf16 (..., K) of one row, weight bf16 (N, K) -> bf16 (..., N)
//   int8_matvec(x, q, scale, bias):    x fp32 (..., K) of one or a few rows, q int8 (N, K), scale fp32 (N,)
//                                      -> fp32 (..., N), out[n] = scale[n] * sum_k x[k] q[n, k] + bias[n]
//
// All accumulate in fp32 (bf16 rounds once, at the end). Each has a path per instruction set, chosen
// when the file is compiled (glassgpt/cpu_kernels.py compiles it for the machine it runs on):
// AVX-512 with its bf16 dot product, AVX-512, AVX2 with FMA, and plain C++ for everything else.
// The threads are PyTorch's own (at::parallel_for), so `torch.set_num_threads` governs them too.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The namespace the operators live in (a test builds the other paths under other names).
#ifndef GLASSGPT_OPS
#define GLASSGPT_OPS glassgpt
#endif

namespace {

constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the reads the prefetches run
constexpr int64_t kRows = 2;              // weight rows per pass: x is loaded once for both

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = uint32_t(bits) << 16;  // bf16 is the top half of an fp32
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

inline void prefetch(const void* address) { __builtin_prefetch(address, 0, 3); }

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float sum_lanes(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#endif

// out[r] = sum_k x[k] w[r * k_size + k] for the `rows` rows starting at w (rows <= kRows).
void dot_rows_int8(const float* x, const int8_t* w, int64_t k_size, int64_t rows, float* out) {
  int64_t k = 0;
  float sums[kRows] = {};
#if defined(__AVX512F__)
  if (rows == kRows) {
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 16 <= k_size; k += 16) {
      __m512 xs = _mm512_loadu_ps(x + k);
      if (k % 64 == 0)
        for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes);
      for (int64_t r = 0; r < kRows; ++r) {
        __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k_size + k));
        acc[r] = _mm512_fmadd_ps(xs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), acc[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (rows == kRows) {
    __m256 acc[kRows] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 8 <= k_size; k += 8) {
      __m256 xs = _mm256_loadu_ps(x + k);
      if (k % 64 == 0)
        for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes);
      for (int64_t r = 0; r < kRows; ++r) {
        __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * k_size + k));
        acc[r] = _mm256_fmadd_ps(xs, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), acc[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = sum_lanes(acc[r]);
  }
#endif
  // The columns the vector loop left (all of them in plain C++, or for a lone last row).
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = w + r * k_size;
    float sum = sums[r];
    for (int64_t i = k; i < k_size; ++i) sum += x[i] * float(row[i]);
    out[r] = sum;
  }
}

void dot_rows_f32(const float* x, const float* w, int64_t k_size, int64_t rows, float* out) {
  int64_t k = 0;
  float sums[kRows] = {};
#if defined(__AVX512F__)
  if (rows == kRows) {
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 16 <= k_size; k += 16) {
      __m512 xs = _mm512_loadu_ps(x + k);
      for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes / 4);
      for (int64_t r = 0; r < kRows; ++r)
        acc[r] = _mm512_fmadd_ps(xs, _mm512_loadu_ps(w + r * k_size + k), acc[r]);
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (rows == kRows) {
    __m256 acc[kRows] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 8 <= k_size; k += 8) {
      __m256 xs = _mm256_loadu_ps(x + k);
      if (k % 16 == 0)
        for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes / 4);
      for (int64_t r = 0; r < kRows; ++r)
        acc[r] = _mm256_fmadd_ps(xs, _mm256_loadu_ps(w + r * k_size + k), acc[r]);
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = sum_lanes(acc[r]);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * k_size;
    float sum = sums[r];
    for (int64_t i = k; i < k_size; ++i) sum += x[i] * row[i];
    out[r] = sum;
  }
}

void dot_rows_bf16(const uint16_t* x, const uint16_t* w, int64_t k_size, int64_t rows, float* out) {
  int64_t k = 0;
  float sums[kRows] = {};
#if defined(__AVX512BF16__)
  if (rows == kRows) {
    // One instruction multiplies 32 bf16 pairs and adds them, in fp32, into 16 lanes.
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 32 <= k_size; k += 32) {
      __m512bh xs = (__m512bh)_mm512_loadu_si512(x + k);
      for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes / 2);
      for (int64_t r = 0; r < kRows; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], xs, (__m512bh)_mm512_loadu_si512(w + r * k_size + k));
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
  }
#elif defined(__AVX512F__)
  if (rows == kRows) {
    auto widen = [](const uint16_t* p) {  // 16 bf16 -> 16 fp32: shift each into the top half
      __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    };
    __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 16 <= k_size; k += 16) {
      __m512 xs = widen(x + k);
      if (k % 32 == 0)
        for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes / 2);
      for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_fmadd_ps(xs, widen(w + r * k_size + k), acc[r]);
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (rows == kRows) {
    auto widen = [](const uint16_t* p) {  // 8 bf16 -> 8 fp32
      __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
    };
    __m256 acc[kRows] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 8 <= k_size; k += 8) {
      __m256 xs = widen(x + k);
      if (k % 32 == 0)
        for (int64_t r = 0; r < kRows; ++r) prefetch(w + r * k_size + k + kPrefetchBytes / 2);
      for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_fmadd_ps(xs, widen(w + r * k_size + k), acc[r]);
    }
    for (int64_t r = 0; r < kRows; ++r) sums[r] = sum_lanes(acc[r]);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = w + r * k_size;
    float sum = sums[r];
    for (int64_t i = k; i < k_size; ++i) sum += bf16_to_float(x[i]) * bf16_to_float(row[i]);
    out[r] = sum;
  }
}

// Splits the weight rows over PyTorch's threads, kRows at a time; `dot_rows(first_row, rows, out)`.
template <typename DotRows>
void over_rows(int64_t n_rows, DotRows dot_rows) {
  int64_t groups = (n_rows + kRows - 1) / kRows;
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    float sums[kRows];
    for (int64_t group = begin; group < end; ++group) {
      int64_t first = group * kRows;
      int64_t rows = std::min(kRows, n_rows - first);
      dot_rows(first, rows, sums);
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const char* name, bool one_row = true) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && (!one_row || x.numel() == x.size(-1)), name, ": x must hold one row, got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), name, ": weight ", weight.sizes(),
              " does not take rows of ", x.size(-1));
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), name, ": contiguous tensors only");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous()),
              name, ": bias must be a contiguous vector of ", weight.size(0));
}

at::Tensor output_like(const at::Tensor& x, int64_t n_rows, at::ScalarType dtype) {
  auto sizes = x.sizes().vec();
  sizes.back() = n_rows;
  return at::empty(sizes, x.options().dtype(dtype));
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_rows(x, q, bias, "int8_matvec", /*one_row=*/false);
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar &&
                  scale.scalar_type() == at::kFloat,
              "int8_matvec: needs float32 x, int8 q and float32 scale");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.is_contiguous(),
              "int8_matvec: one scale per weight row");
  TORCH_CHECK(!bias || bias->scalar_type() == at::kFloat, "int8_matvec: float32 bias");
  int64_t n_rows = q.size(0), k_size = q.size(1), tokens = x.numel() / k_size;
  at::Tensor out = output_like(x, n_rows, at::kFloat);
  const float* xs = x.data_ptr<float>();
  const int8_t* weights = q.data_ptr<int8_t>();
  const float* scales = scale.data_ptr<float>();
  const float* biases = bias ? bias->data_ptr<float>() : nullptr;
  float* result = out.data_ptr<float>();
  // A few token rows (a short prompt, a batch): each pair of weight rows is read from memory once and
  // meets every token row while it sits in the cache, instead of PyTorch widening the whole matrix.
  over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
    for (int64_t token = 0; token < tokens; ++token) {
      dot_rows_int8(xs + token * k_size, weights + first * k_size, k_size, rows, sums);
      float* row_out = result + token * n_rows;
      for (int64_t r = 0; r < rows; ++r)
        row_out[first + r] = sums[r] * scales[first + r] + (biases ? biases[first + r] : 0.0f);
    }
  });
  return out;
}

at::Tensor f32_matvec(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rows(x, weight, bias, "f32_matvec");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  (!bias || bias->scalar_type() == at::kFloat),
              "f32_matvec: float32 tensors only");
  int64_t n_rows = weight.size(0), k_size = weight.size(1);
  at::Tensor out = output_like(x, n_rows, at::kFloat);
  const float* xs = x.data_ptr<float>();
  const float* weights = weight.data_ptr<float>();
  const float* biases = bias ? bias->data_ptr<float>() : nullptr;
  float* result = out.data_ptr<float>();
  over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
    dot_rows_f32(xs, weights + first * k_size, k_size, rows, sums);
    for (int64_t r = 0; r < rows; ++r) result[first + r] = sums[r] + (biases ? biases[first + r] : 0.0f);
  });
  return out;
}

at::Tensor bf16_matvec(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rows(x, weight, bias, "bf16_matvec");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
                  (!bias || bias->scalar_type() == at::kBFloat16),
              "bf16_matvec: bfloat16 tensors only");
  int64_t n_rows = weight.size(0), k_size = weight.size(1);
  at::Tensor out = output_like(x, n_rows, at::kBFloat16);
  auto xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto weights = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto biases = bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>()) : nullptr;
  at::BFloat16* result = out.data_ptr<at::BFloat16>();
  over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
    dot_rows_bf16(xs, weights + first * k_size, k_size, rows, sums);
    for (int64_t r = 0; r < rows; ++r)  // the bias added in fp32, then one rounding to bf16
      result[first + r] = at::BFloat16(sums[r] + (biases ? bf16_to_float(biases[first + r]) : 0.0f));
  });
  return out;
}

// Which path this build compiled in (glassgpt/cpu_kernels.py uses the kernels only where it is fast).
std::string instruction_set() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(GLASSGPT_OPS, m) {
  m.def("int8_matvec(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("bf16_matvec(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("f32_matvec(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(GLASSGPT_OPS, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
  m.impl("bf16_matvec", &bf16_matvec);
  m.impl("f32_matvec", &f32_matvec);
}
