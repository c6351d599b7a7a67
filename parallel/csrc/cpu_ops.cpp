// Fused CPU kernels for the decode step of Llama-family models (see parallel/native.py).
//
// A batch-1 decode step is dominated by reading the weights once; everything between two
// weight streams (norms, RoPE, the KV-cache store, attention over a few hundred keys) is tiny
// and, as separate torch ops, costs more in dispatch than in arithmetic. Each function here
// does one such stretch in one call. Low-precision results are rounded at the same points as
// the torch ops they replace (an fp32 computation rounded once per torch op), so only the
// order of fp32 summation differs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Work below this many multiply-adds per chunk runs on the calling thread: waking the
// thread pool costs more than such chunks.
constexpr int64_t kGrainWork = 1 << 15;

int64_t grain_for(int64_t work_per_unit) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_unit));
}

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// e^x within ~2 ulp, branch-free so that loops over it vectorise (libm's expf does not):
// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by Cephes' polynomial.
inline float exp_fast(float x) {
  const float xc = std::min(std::max(x, -87.f), 88.f);
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = std::fma(xc, 1.44269504089f, magic);
  const float n = shifted - magic;
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float y = std::fma(p, r * r, r) + 1.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x > 88.f ? INFINITY : (x < -87.f ? 0.f : y * scale);
}

template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* sum, int64_t rows,
                   int64_t dim, float eps) {
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t r0, int64_t r1) {
    std::vector<float> h(dim);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * dim;
      float ss = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        // residual add rounded to T, as `x + residual` would be
        float v = res ? float(round_to<T>(float(xr[i]) + float(res[r * dim + i]))) : float(xr[i]);
        if (sum) sum[r * dim + i] = round_to<T>(v);
        h[i] = v;
        ss = std::fma(v, v, ss);
      }
      float inv = 1.f / std::sqrt(ss / float(dim) + eps);
      for (int64_t i = 0; i < dim; ++i)  // normalised value rounded to T, then times weight
        out[r * dim + i] = round_to<T>(float(w[i]) * float(round_to<T>(h[i] * inv)));
    }
  });
}

// rms_norm(x [+ residual]) * weight over the last dim. Returns (normed, x + residual); the
// second is x itself when there is no residual.
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                            double eps, const std::optional<at::Tensor>& res) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous inputs");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be (", dim, ") of x's dtype");
  if (res) TORCH_CHECK(res->sizes() == x.sizes() && res->is_contiguous() &&
                       res->scalar_type() == x.scalar_type(), "rms_norm: residual like x");
  auto out = at::empty_like(x);
  auto sum = res ? at::empty_like(x) : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            res ? sum.data_ptr<scalar_t>() : nullptr, rows, dim, float(eps));
  });
  return {out, sum};
}

// x * cos + roll(x, d / 2) * signed_sin, each product and the sum rounded to T like the
// three torch ops it replaces.
template <typename T>
inline void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const T rolled = x[i < half ? i + half : i - half];
    out[i] = round_to<T>(float(round_to<T>(float(x[i]) * float(cos[i]))) +
                         float(round_to<T>(float(rolled) * float(sin[i]))));
  }
}

template <typename T>
void rope_store_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                     at::Tensor& q_out, int64_t heads, int64_t kv_heads, int64_t d) {
  const int64_t tokens = qkv.size(0), width = qkv.size(1), rope_heads = heads + kv_heads;
  const T* src = qkv.data_ptr<T>();
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* q = q_out.data_ptr<T>();
  at::parallel_for(0, tokens, grain_for(width), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = src + t * width;
      for (int64_t h = 0; h < heads; ++h)
        rope_row(row + h * d, c + t * d, s + t * d, q + (t * heads + h) * d, d);
      if (slot[t] < 0) continue;  // padding: nothing to cache
      T* kdst = kc + slot[t] * kv_heads * d;
      for (int64_t h = heads; h < rope_heads; ++h)
        rope_row(row + h * d, c + t * d, s + t * d, kdst + (h - heads) * d, d);
      std::copy(row + rope_heads * d, row + width, vc + slot[t] * kv_heads * d);
    }
  });
}

// qkv: (tokens, (heads + 2 kv_heads) * d) -> RoPE'd q (tokens, heads, d); RoPE'd k and v are
// written to their cache slots (slot -1: not stored). cos, sin: (tokens, d), sin signed.
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                      int64_t heads, int64_t kv_heads) {
  const int64_t d = k_cache.size(-1), tokens = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * kv_heads) * d,
              "rope_store: qkv must be (tokens, (heads + 2 kv_heads) * head_dim)");
  TORCH_CHECK(d % 2 == 0, "rope_store: head_dim must be even");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->numel() == tokens * d &&
                t->scalar_type() == qkv.scalar_type(), "rope_store: cos/sin (tokens, head_dim)");
  for (const auto* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == qkv.scalar_type() &&
                t->size(-2) == kv_heads, "rope_store: cache (blocks, block, kv_heads, d)");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == tokens &&
              slots.is_contiguous(), "rope_store: one int64 slot per token");
  const int64_t num_slots = k_cache.numel() / (kv_heads * d);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] >= -1 && sp[t] < num_slots, "rope_store: slot ", sp[t],
                " outside the cache's ", num_slots, " slots");
  auto q = at::empty({tokens, heads, d}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_store", [&] {
    rope_store_impl<scalar_t>(qkv, cos, sin, k_cache, v_cache, slots, q, heads, kv_heads, d);
  });
  return q;
}

// One sequence's cached keys and values, read through its block table.
template <typename T>
struct PagedSequence {
  const T* k;
  const T* v;
  const int64_t* table;
  int64_t block, kv_heads, d;

  // fn(j, offset) for positions first + j, j = 0..len-1, in order: offset is where kv head
  // kvh of that position starts in the cache. Walks block by block (no division per position).
  template <typename F>
  void each(int64_t kvh, int64_t first, int64_t len, F&& fn) const {
    const int64_t stride = kv_heads * d, end = first + len;
    for (int64_t t = first; t < end;) {
      const int64_t in_block = t % block, n = std::min(block - in_block, end - t);
      const int64_t base = ((table[t / block] * block + in_block) * kv_heads + kvh) * d;
      for (int64_t m = 0; m < n; ++m) fn(t - first + m, base + m * stride);
      t += n;
    }
  }
};

constexpr int64_t kKeys = 8;  // keys scored together: 8 independent accumulators per head
constexpr int64_t kLanes = 16;  // one 512-bit register of fp32

// Scores of g heads (qf: (g, d)) against the first n <= kKeys keys of keys (kKeys, d) fp32,
// written to p[h * len + j0 + k]; slots past n (earlier keys) are summed and dropped. Each
// key's partial sums stay in their own lanes until the end, so the loop has kKeys independent
// chains and one horizontal sum per key instead of one per 16 lanes.
inline void score_keys(const float* qf, int64_t g, int64_t d, const float* keys, int64_t n,
                       float scale, float* p, int64_t len, int64_t j0) {
  for (int64_t h = 0; h < g; ++h) {
    const float* qh = qf + h * d;
    float part[kKeys][kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes)
      for (int64_t k = 0; k < kKeys; ++k)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l)
          part[k][l] = std::fma(qh[i + l], keys[k * d + i + l], part[k][l]);
    for (int64_t k = 0; k < n; ++k) {
      float dot = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) dot += part[k][l];
      for (int64_t r = i; r < d; ++r) dot = std::fma(qh[r], keys[k * d + r], dot);  // d % 16
      p[h * len + j0 + k] = dot * scale;
    }
  }
}

// The query heads of kv heads k0..k0+nk-1 in kv-head order: those of kv head k0 + k are rows
// start[k]..start[k+1]-1 of a unit's qf / p / acc, and order[row] is the query head.
struct HeadSpan {
  int64_t k0 = 0, nk = 0;
  std::vector<int64_t> start, order;
};

// kv heads split into `parts` spans (any head map, also an irregular uneven-tp one).
std::vector<HeadSpan> head_spans(const int64_t* kv_index, int64_t heads, int64_t kv_heads,
                                 int64_t parts) {
  std::vector<HeadSpan> spans(parts);
  for (int64_t part = 0; part < parts; ++part) {
    HeadSpan& s = spans[part];
    s.k0 = part * kv_heads / parts;
    s.nk = (part + 1) * kv_heads / parts - s.k0;
    s.start.push_back(0);
    for (int64_t k = s.k0; k < s.k0 + s.nk; ++k) {
      for (int64_t h = 0; h < heads; ++h)
        if (kv_index[h] == k) s.order.push_back(h);
      s.start.push_back(s.order.size());
    }
  }
  return spans;
}

// A span's query heads (qf: (rows, d) fp32) attend to positions first..first+len-1 of one
// sequence, reading each position's kv heads of the span together (they are adjacent in the
// cache). Scratch: p (rows, len), keys (nk, kKeys, d), row (d). Writes acc (rows, d): the
// softmax-weighted value sums, already divided by each head's softmax total.
template <typename T>
void attend_span(const PagedSequence<T>& seq, const HeadSpan& span, const float* qf,
                 int64_t first, int64_t len, float scale, float* p, float* keys, float* row,
                 float* acc) {
  const int64_t d = seq.d, rows = span.start[span.nk];
  seq.each(span.k0, first, len, [&](int64_t j, int64_t at) {  // scores, kKeys at a time
    const int64_t slot = j % kKeys;
    for (int64_t k = 0; k < span.nk; ++k) {  // each key converted once
      float* dst = keys + (k * kKeys + slot) * d;
      for (int64_t i = 0; i < d; ++i) dst[i] = float(seq.k[at + k * d + i]);
    }
    if (slot == kKeys - 1 || j == len - 1)
      for (int64_t k = 0; k < span.nk; ++k)
        score_keys(qf + span.start[k] * d, span.start[k + 1] - span.start[k], d,
                   keys + k * kKeys * d, slot + 1, scale, p + span.start[k] * len, len,
                   j - slot);
  });
  for (int64_t h = 0; h < rows; ++h) {  // softmax numerators in place
    float* ph = p + h * len;
    const float top = *std::max_element(ph, ph + len);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) ph[j] = exp_fast(ph[j] - top);
  }
  std::fill(acc, acc + rows * d, 0.f);
  seq.each(span.k0, first, len, [&](int64_t j, int64_t at) {
    for (int64_t k = 0; k < span.nk; ++k) {
      for (int64_t i = 0; i < d; ++i) row[i] = float(seq.v[at + k * d + i]);
      for (int64_t h = span.start[k]; h < span.start[k + 1]; ++h) {
        const float e = p[h * len + j];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[h * d + i] = std::fma(e, row[i], acc[h * d + i]);
      }
    }
  });
  for (int64_t h = 0; h < rows; ++h) {
    float total = 0.f;
    for (int64_t j = 0; j < len; ++j) total += p[h * len + j];
    for (int64_t i = 0; i < d; ++i) acc[h * d + i] /= total;
  }
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& positions, const at::Tensor& kv_index,
                           double scale, int64_t window, at::Tensor& out) {
  const int64_t b = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(pos, pos + b) + 1;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // a unit is one sequence's span of kv heads: the whole row when there are rows enough for
  // every thread, else the kv heads split so that a small batch still uses all threads
  const int64_t parts = std::clamp<int64_t>((at::get_num_threads() + b - 1) / b, 1, kv_heads);
  const std::vector<HeadSpan> spans =
      head_spans(kv_index.data_ptr<int64_t>(), heads, kv_heads, parts);
  const int64_t per_unit = 2 * max_len * d * std::max<int64_t>(1, heads / parts);
  at::parallel_for(0, b * parts, grain_for(per_unit), [&](int64_t u0, int64_t u1) {
    std::vector<float> p(heads * max_len), qf(heads * d), acc(heads * d), row(d),
        keys(kv_heads * kKeys * d);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = u / parts, last = pos[r];
      const HeadSpan& span = spans[u % parts];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const PagedSequence<T> seq{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                                 block_tables.data_ptr<int64_t>() + r * block_tables.size(1),
                                 block, kv_heads, d};
      for (size_t h = 0; h < span.order.size(); ++h) {
        const T* src = qp + (r * heads + span.order[h]) * d;
        for (int64_t i = 0; i < d; ++i) qf[h * d + i] = float(src[i]);
      }
      attend_span(seq, span, qf.data(), first, last - first + 1, float(scale), p.data(),
                  keys.data(), row.data(), acc.data());
      for (size_t h = 0; h < span.order.size(); ++h)
        for (int64_t i = 0; i < d; ++i)
          op[(r * heads + span.order[h]) * d + i] = round_to<T>(acc[h * d + i]);
    }
  });
}

// One new token per sequence: q (batch, heads, d) attends to cached keys 0..positions[row]
// (the last `window` of them when window > 0) of its sequence, through its block table;
// query head h reads kv head kv_index[h]. Scores, softmax and sums in fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& positions, const at::Tensor& kv_index,
                            double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "decode_attention: q (batch, heads, d)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.scalar_type() == q.scalar_type() && v_cache.sizes() == k_cache.sizes() &&
              k_cache.size(-1) == q.size(2), "decode_attention: caches like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
              block_tables.size(0) == q.size(0), "decode_attention: block_tables (batch, n)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0),
              "decode_attention: one position per row");
  TORCH_CHECK(kv_index.scalar_type() == at::kLong && kv_index.numel() == q.size(1),
              "decode_attention: one kv head per query head");
  auto out = at::empty_like(q);
  if (q.numel() == 0) return out;
  auto pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t block = k_cache.size(1), blocks = k_cache.size(0), width = block_tables.size(1);
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  for (int64_t r = 0; r < pos.numel(); ++r) {
    TORCH_CHECK(pp[r] >= 0 && pp[r] < width * block, "decode_attention: position ", pp[r],
                " outside the block table's ", width * block, " slots");
    for (int64_t j = 0; j <= pp[r] / block; ++j)  // every block the row will read
      TORCH_CHECK(bt[r * width + j] >= 0 && bt[r * width + j] < blocks, "decode_attention: "
                  "block ", bt[r * width + j], " outside the cache's ", blocks, " blocks");
  }
  auto kvi = kv_index.contiguous();
  const int64_t* kp = kvi.data_ptr<int64_t>();
  for (int64_t h = 0; h < kvi.numel(); ++h)
    TORCH_CHECK(kp[h] >= 0 && kp[h] < k_cache.size(2), "decode_attention: kv head ", kp[h],
                " outside the cache's ", k_cache.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attn", [&] {
    decode_attention_impl<scalar_t>(q, k_cache, v_cache, block_tables, pos, kvi, scale, window,
                                    out);
  });
  return out;
}

template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * n;
      for (int64_t i = 0; i < n; ++i) {
        const float x = float(g[i]);
        const T act = round_to<T>(x / (1.f + exp_fast(-x)));  // F.silu, rounded
        out[r * n + i] = round_to<T>(float(act) * float(g[n + i]));
      }
    }
  });
}

// gate_up: (..., 2n), gate then up -> silu(gate) * up: (..., n).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "silu_mul: contiguous (..., 2n) input");
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / std::max<int64_t>(1, 2 * n);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] {
    silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(shardserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor, Tensor)",
        &rms_norm);
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, int heads, int kv_heads) -> Tensor", &rope_store);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor positions, Tensor kv_index, float scale, int window) -> Tensor",
        &decode_attention);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
}
