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
//   decode_step(token, position, ...): a whole decoded token of a pre-norm GPT, batch 1 (at the end).
//
// All accumulate in fp32 (bf16 rounds once, at the end). Each has a path per instruction set, chosen
// when the file is compiled (glassgpt/cpu_kernels.py compiles it for the machine it runs on):
// AVX-512 with its bf16 dot product, AVX-512, AVX2 with FMA, and plain C++ for everything else.
// The threads are PyTorch's own (at::parallel_for), so `torch.set_num_threads` governs them too.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

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

// ---- One decoded token through the whole model, in one call ----
//
// Between its 49 products a GPT-2 small token runs about a hundred small operations (norms, the
// attention over the cache, GELU, residual adds). Called one by one from Python each costs a few
// microseconds, and more after every product, which has streamed megabytes of weights through the
// caches the interpreter was using: together as much as a sixth of the token. glassgpt/cpu_step.py
// calls this once a token instead. It computes what model.py's pre-norm GPT computes for one token
// of a batch of one and writes the token's keys and values into the model's own KV cache.
//
// T is the model's dtype: float, or bf16. The arithmetic is fp32 throughout; a bf16 model's values are
// rounded to bf16 wherever the model's own operations hand back a bf16 tensor (`kept`), so both round
// at the same points. int8 layers (in a float model) compute with their weights times their row scales.

template <typename T>
inline float kept(float value) {  // the value as a T tensor holds it
  if constexpr (std::is_same_v<T, float>) return value;
  else return float(T(value));
}

// out = kept(weight x + bias): weight fp32, bf16 (then T is bf16) or int8 with an fp32 scale per row.
template <typename T>
void layer_into(const float* x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& bias, float* out, std::vector<uint16_t>& x_bf16) {
  int64_t n_rows = weight.size(0), k_size = weight.size(1);
  const T* biases = bias ? bias->data_ptr<T>() : nullptr;
  auto finish = [&](int64_t first, int64_t rows, const float* sums, const float* scales) {
    for (int64_t r = 0; r < rows; ++r)
      out[first + r] = kept<T>(sums[r] * (scales ? scales[first + r] : 1.0f) +
                               (biases ? float(biases[first + r]) : 0.0f));
  };
  if (weight.scalar_type() == at::kFloat) {
    const float* weights = weight.data_ptr<float>();
    over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
      dot_rows_f32(x, weights + first * k_size, k_size, rows, sums);
      finish(first, rows, sums, nullptr);
    });
  } else if (weight.scalar_type() == at::kChar) {
    const int8_t* weights = weight.data_ptr<int8_t>();
    const float* scales = scale->data_ptr<float>();
    over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
      dot_rows_int8(x, weights + first * k_size, k_size, rows, sums);
      finish(first, rows, sums, scales);
    });
  } else {
    x_bf16.resize(k_size);  // x holds bf16 values already: this only packs them
    for (int64_t i = 0; i < k_size; ++i) x_bf16[i] = at::BFloat16(x[i]).x;
    auto weights = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    over_rows(n_rows, [&](int64_t first, int64_t rows, float* sums) {
      dot_rows_bf16(x_bf16.data(), weights + first * k_size, k_size, rows, sums);
      finish(first, rows, sums, nullptr);
    });
  }
}

// LayerNorm: (x - mean) / sqrt(biased variance + eps) * scale + shift.
template <typename T>
void layer_norm_into(const float* x, int64_t size, const at::Tensor& scale,
                     const std::optional<at::Tensor>& shift, double eps, float* out) {
  double sum = 0.0, squares = 0.0;
  for (int64_t i = 0; i < size; ++i) sum += x[i];
  double mean = sum / size;
  for (int64_t i = 0; i < size; ++i) squares += (x[i] - mean) * (x[i] - mean);
  float inverse = float(1.0 / std::sqrt(squares / size + eps));
  const T* scales = scale.data_ptr<T>();
  const T* shifts = shift ? shift->data_ptr<T>() : nullptr;
  for (int64_t i = 0; i < size; ++i)
    out[i] = kept<T>((x[i] - float(mean)) * inverse * float(scales[i]) + (shifts ? float(shifts[i]) : 0.0f));
}

// The new token's query attends over the cached keys 0..position, its own included: per head,
// softmax(q . k_j / sqrt(head_dim)) weighs the values. qkv holds [query; key; value], heads side by
// side in each; keys and values are one layer's cache (1, heads, slots, head_dim), written at position.
template <typename T>
void attend_into(const float* qkv, at::Tensor& keys, at::Tensor& values, int64_t heads, int64_t position,
                 float* context) {
  int64_t slots = keys.size(2), head_dim = keys.size(3), width = heads * head_dim;
  T* all_keys = keys.data_ptr<T>();
  T* all_values = values.data_ptr<T>();
  float scale = 1.0f / std::sqrt(float(head_dim));
  // Long caches split the heads over the threads; a short one is less work than waking them.
  int64_t grain = position >= 256 ? 1 : heads;
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(position + 1);
    for (int64_t h = begin; h < end; ++h) {
      T* head_keys = all_keys + h * slots * head_dim;
      T* head_values = all_values + h * slots * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        head_keys[position * head_dim + d] = T(qkv[width + h * head_dim + d]);
        head_values[position * head_dim + d] = T(qkv[2 * width + h * head_dim + d]);
      }
      const float* query = qkv + h * head_dim;
      float largest = -INFINITY;
      for (int64_t j = 0; j <= position; ++j) {
        // Sixteen running sums, one per lane, so the compiler can vectorise the dot product (a single
        // sum would fix the order of the additions and keep it scalar).
        float lanes[16] = {};
        int64_t d = 0;
        for (; d + 16 <= head_dim; d += 16)
          for (int64_t lane = 0; lane < 16; ++lane)
            lanes[lane] += query[d + lane] * float(head_keys[j * head_dim + d + lane]);
        float score = 0.0f;
        for (; d < head_dim; ++d) score += query[d] * float(head_keys[j * head_dim + d]);
        for (float lane : lanes) score += lane;
        weights[j] = score * scale;
        largest = std::max(largest, weights[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j <= position; ++j) total += weights[j] = std::exp(weights[j] - largest);
      float* out = context + h * head_dim;
      std::fill(out, out + head_dim, 0.0f);
      for (int64_t j = 0; j <= position; ++j) {
        float weight = weights[j] / total;
        for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * float(head_values[j * head_dim + d]);
      }
      for (int64_t d = 0; d < head_dim; ++d) out[d] = kept<T>(out[d]);
    }
  });
}

// GPT-2's GELU (tanh form) or ReLU, in place: PyTorch's own vectorised kernels, on the buffer as a tensor.
void activate(std::vector<float>& values, bool gelu) {
  at::Tensor view = at::from_blob(values.data(), {int64_t(values.size())}, at::kFloat);
  if (gelu) view.copy_(at::gelu(view, "tanh"));
  else view.clamp_min_(0.0f);
}

// `blocks`: per block, in this order, norm1 scale and shift; qkv, out_proj, expand and contract as
// (weight, scale or None, bias or None) each; norm2 scale and shift (kBlockEntries in all). `caches`: per
// block its keys and values. `ending`: the final norm's scale and shift (None: no final norm), then the
// head as (weight, scale, bias). Returns the logits (1, 1, n_outputs), in the model's dtype.
constexpr int64_t kBlockEntries = 16;
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

template <typename T>
at::Tensor step_in(int64_t token, int64_t position, const at::Tensor& token_embedding,
                   const at::Tensor& position_embedding, const OptionalTensors& blocks, at::TensorList caches,
                   const OptionalTensors& ending, int64_t n_heads, double eps, bool gelu) {
  auto entry = [&](int64_t block, int64_t index) { return blocks.get(block * kBlockEntries + index); };
  int64_t width = token_embedding.size(1), n_blocks = int64_t(caches.size()) / 2;
  int64_t hidden = entry(0, 8)->size(0);
  std::vector<float> x(width), normed(width), qkv(3 * width), context(width), sublayer(width);
  std::vector<float> expanded(hidden);
  std::vector<uint16_t> packed;
  const T* token_row = token_embedding.data_ptr<T>() + token * width;
  const T* position_row = position_embedding.data_ptr<T>() + position * width;
  for (int64_t i = 0; i < width; ++i) x[i] = kept<T>(float(token_row[i]) + float(position_row[i]));

  for (int64_t block = 0; block < n_blocks; ++block) {
    // x = x + out_proj(attention(norm1(x)))
    layer_norm_into<T>(x.data(), width, *entry(block, 0), entry(block, 1), eps, normed.data());
    layer_into<T>(normed.data(), *entry(block, 2), entry(block, 3), entry(block, 4), qkv.data(), packed);
    at::Tensor keys = caches[2 * block], values = caches[2 * block + 1];
    attend_into<T>(qkv.data(), keys, values, n_heads, position, context.data());
    layer_into<T>(context.data(), *entry(block, 5), entry(block, 6), entry(block, 7), sublayer.data(),
                  packed);
    for (int64_t i = 0; i < width; ++i) x[i] = kept<T>(x[i] + sublayer[i]);
    // x = x + contract(activation(expand(norm2(x))))
    layer_norm_into<T>(x.data(), width, *entry(block, 14), entry(block, 15), eps, normed.data());
    layer_into<T>(normed.data(), *entry(block, 8), entry(block, 9), entry(block, 10), expanded.data(),
                  packed);
    activate(expanded, gelu);
    for (float& h : expanded) h = kept<T>(h);
    layer_into<T>(expanded.data(), *entry(block, 11), entry(block, 12), entry(block, 13), sublayer.data(),
                  packed);
    for (int64_t i = 0; i < width; ++i) x[i] = kept<T>(x[i] + sublayer[i]);
  }
  const float* last = x.data();
  if (ending.get(0)) {
    layer_norm_into<T>(x.data(), width, *ending.get(0), ending.get(1), eps, normed.data());
    last = normed.data();
  }
  const at::Tensor& head = *ending.get(2);
  std::vector<float> logits(head.size(0));
  layer_into<T>(last, head, ending.get(3), ending.get(4), logits.data(), packed);
  at::Tensor out = at::empty({1, 1, head.size(0)}, token_embedding.options());
  T* result = out.data_ptr<T>();
  for (size_t i = 0; i < logits.size(); ++i) result[i] = T(logits[i]);
  return out;
}

at::Tensor decode_step(int64_t token, int64_t position, const at::Tensor& token_embedding,
                       const at::Tensor& position_embedding, const OptionalTensors& blocks,
                       at::TensorList caches, const OptionalTensors& ending, int64_t n_heads, double eps,
                       bool gelu) {
  int64_t n_blocks = int64_t(caches.size()) / 2;
  TORCH_CHECK(n_blocks > 0 && int64_t(blocks.size()) == n_blocks * kBlockEntries && ending.size() == 5,
              "decode_step: ", blocks.size(), " block entries for ", n_blocks, " blocks");
  TORCH_CHECK(0 <= token && token < token_embedding.size(0) && 0 <= position &&
                  position < position_embedding.size(0) && position < caches[0].size(2),
              "decode_step: token ", token, " or position ", position, " out of range");
  if (token_embedding.scalar_type() == at::kBFloat16)
    return step_in<at::BFloat16>(token, position, token_embedding, position_embedding, blocks, caches, ending,
                                 n_heads, eps, gelu);
  TORCH_CHECK(token_embedding.scalar_type() == at::kFloat, "decode_step: a float32 or bfloat16 model only");
  return step_in<float>(token, position, token_embedding, position_embedding, blocks, caches, ending, n_heads,
                        eps, gelu);
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
  m.def("decode_step(int token, int position, Tensor token_embedding, Tensor position_embedding, "
        "Tensor?[] blocks, Tensor(a!)[] caches, Tensor?[] ending, int n_heads, float eps, bool gelu) "
        "-> Tensor");
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(GLASSGPT_OPS, CPU, m) {
  m.impl("int8_matvec", &int8_matvec);
  m.impl("bf16_matvec", &bf16_matvec);
  m.impl("f32_matvec", &f32_matvec);
  m.impl("decode_step", &decode_step);
}
