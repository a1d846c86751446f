// Paged attention over ragged page tables, for decode and prefill (on top of cached KV) alike.
//
// Layout (NHD pages, as in radixrt/cache/page_pool.py and flashinfer):
//
//   k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]
//   request b:  queries  q[qo_indptr[b] : qo_indptr[b+1]]              ([T, H, D] overall)
//               pages    kv_indices[kv_indptr[b] : kv_indptr[b+1]]
//               keys     kv_len[b] = prefix (cached before this step) + its new tokens
//   key i of b lives at  page = kv_indices[kv_indptr[b] + i / page_size], row i % page_size.
//
// Query t (0-based within b's new tokens) sees keys [0, prefix + t]: the causal mask offset by
// the cached prefix; with a sliding window (window_left >= 0, flashinfer's convention) only keys
// [prefix + t - window_left, prefix + t]. Scores are q . k * scale, soft-capped when softcap > 0
// (s -> softcap * tanh(s / softcap), Gemma 2) before the softmax. One pass with an online softmax
// (running max m, running sum l, unnormalized output acc) over blocks of up to kBlock keys. Each
// block's K/V rows are read from their pages once, in memory order, into a few KB of per-thread
// scratch (no whole-sequence gather).
//
// Keys fall into splits at fixed positions ([0, S), [S, 2 S), ...), S = split_keys(the query's key
// count): 64 up to kShortContext keys, 256 past it. Each split runs its own online softmax, and a
// query's splits are merged in order (merge_partial), so a query's result depends on its keys alone:
// not on its batch, nor on whether it is a decode query or one of several new tokens (a speculative
// verify step), nor on which thread ran what. (Splits sized by the batch, as before, parted n-gram
// speculation's greedy output from plain decoding on 1,300-token prompts.) Short splits give a
// batch-1 decode over a short context work for both threads (per layer, 64-264 keys: 25.8 -> 20.8
// us); long contexts keep 256, as 64 cost 32 requests over 1,600 keys 4-11% of a decoder call (the
// merges). docs/kernels.md has the measurements.
//
// Work is split into tasks, handed out dynamically to torch's intra-op threads:
//   - decode (one query): one task per run of up to kMaxSplitsPerTask consecutive splits of a
//     request, over all KV heads, so each key block reads whole contiguous page rows. When a request
//     spans several tasks, each split's result has a slot of its own and the slots are merged in
//     order afterwards (flash-decoding), so one long request keeps every thread busy; a task that
//     holds all of a request's splits merges them itself, in the same order. A large batch runs
//     fewer, longer tasks: which tasks there are never changes a result, only the splits do.
//   - prefill: one task per (request, KV head, block of kQBlock queries of one split size), its
//     splits one by one.
// Within a task the G = H / H_kv query heads sharing a KV head are processed together, so every
// key row fetched from memory serves G (decode) or G * kQBlock (prefill) queries.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace radixrt {
namespace {

constexpr int kBlock = 32;      // keys per online-softmax step
constexpr int kQBlock = 16;     // prefill queries per task
constexpr int kShortContext = 512;   // a query with at most this many keys splits them finely; see above
constexpr int kMaxSplitsPerTask = 4;  // decode: splits one task may run (batches with many splits)

// Keys per split of a query that sees keys [.., kv_len) (a multiple of kBlock).
inline int split_keys(int kv_len) { return kv_len <= kShortContext ? 64 : 256; }

struct Task {
  int b;
  int h0, h1;    // KV heads [h0, h1)
  int q0, q1;    // queries of b, 0-based within its new tokens
  int kv0, kv1;  // keys [kv0, kv1) (some splits of a decode request; else the whole range)
  int split;     // keys per split of the task's queries (split_keys)
  int partial;   // >= 0: the slot of the task's first split in the partial-result workspace
  int64_t cost;
};

struct Problem {
  int H, Hkv, G, D, page_size;
  int64_t q_s0, q_s1;          // query strides (tokens, heads), elements
  int64_t kv_s_token;          // cache stride between key rows (= Hkv * D)
  const int32_t* qo_indptr;
  const int32_t* kv_indptr;
  const int32_t* kv_indices;
  const int32_t* kv_lens;
  float scale;
  bool simd;
  int window_left;  // keys before the query it sees; -1: all (no sliding window)
  float softcap;    // 0: none
};

// The first key a query at position `pos` sees.
inline int first_key(const Problem& p, int pos) { return p.window_left < 0 ? 0 : std::max(0, pos - p.window_left); }

// attend_rows with the scores soft-capped before the softmax (Gemma 2), on fp32 rows.
inline void attend_rows_capped(const float* q, int rows, const float* const* k, const float* const* v, int n, int d,
                               float* m, float* l, float* acc, float* s, float cap, bool simd) {
  for (int r = 0; r < rows; ++r) {
    float alpha;
    scores(q + r * d, k, n, d, s, simd);
    for (int j = 0; j < n; ++j) s[j] = cap * std::tanh(s[j] / cap);
    update_stats(s, n, m[r], l[r], alpha, simd);
    accumulate(acc + r * d, alpha, s, v, n, d, simd);
  }
}

// Per-thread scratch, sized for the largest task. Kept between calls (`for_thread`): allocating it
// for each of a step's 30 layers was 4% of a batch-1 decoder call.
template <typename T>
struct Scratch {
  std::vector<float> q, m, l, acc, s, kbuf, vbuf;
  std::vector<float> run_m, run_l, run_acc;  // each row's merge of its finished splits
  std::vector<const float*> krow, vrow;
  std::vector<const T*> krow_t, vrow_t;
  std::vector<int64_t> base;
  std::vector<T> kstage, vstage;

  // This thread's scratch, grown to hold `rows` query rows of D and `heads` KV heads' staged keys.
  static Scratch& for_thread(int rows, int D, int heads) {
    thread_local Scratch sc;
    sc.grow(rows, D, heads);
    return sc;
  }

 private:
  void grow(int rows, int D, int heads) {
    const size_t r = rows, d = D, staged = size_t(kBlock) * heads * D;
    if (q.size() >= r * d && m.size() >= r && kbuf.size() >= kBlock * d && kstage.size() >= staged) return;
    for (auto* v : {&q, &acc, &run_acc}) v->resize(std::max(v->size(), r * d));
    for (auto* v : {&m, &l, &run_m, &run_l}) v->resize(std::max(v->size(), r));
    for (auto* v : {&kbuf, &vbuf}) v->resize(std::max(v->size(), kBlock * d));
    for (auto* v : {&kstage, &vstage}) v->resize(std::max(v->size(), staged));
    s.resize(kMaxGroup * kBlock);
    krow.resize(kBlock), vrow.resize(kBlock), krow_t.resize(kBlock), vrow_t.resize(kBlock), base.resize(kBlock);
  }
};

// (m, l, acc) += one split's (m2, l2, acc2), the softmax statistics rescaled to the larger max.
// Out of line, so that every caller runs the same instructions (the same roundings) whatever the
// compiler would have inlined or vectorized where. A split in which the row saw no key (m2 = -inf)
// changes nothing; the first one is copied.
__attribute__((noinline)) void merge_partial(float& m, float& l, float* acc, float m2, float l2, const float* acc2,
                                             int D) {
  if (m2 == kNegInf) return;
  if (m == kNegInf) {
    m = m2, l = l2;
    std::memcpy(acc, acc2, sizeof(float) * D);
    return;
  }
  const float mx = std::max(m, m2), a = std::exp(m - mx), b = std::exp(m2 - mx);
  l = l * a + l2 * b;
  for (int d = 0; d < D; ++d) acc[d] = acc[d] * a + acc2[d] * b;
  m = mx;
}

// A query head's output: its merged acc / l, rounded to the storage type.
template <typename T>
__attribute__((noinline)) void finish_row(const float* acc, float l, T* dst, int D) {
  const float inv = 1.f / l;
  for (int i = 0; i < D; ++i) dst[i] = from_f32<T>(acc[i] * inv);
}

template <typename T>
void run_task(const Problem& p, const Task& t, const T* q, const T* kc, const T* vc, T* out, float* partial,
              Scratch<T>& sc) {
  const int D = p.D, G = p.G, nq = t.q1 - t.q0;
  const int q_start = p.qo_indptr[t.b];
  const int qlen = p.qo_indptr[t.b + 1] - q_start;
  const int prefix = p.kv_lens[t.b] - qlen;
  const int32_t* pages = p.kv_indices + p.kv_indptr[t.b];
  const int rows_per_head = nq * G;
  const int rows = (t.h1 - t.h0) * rows_per_head;
  const bool capped = p.softcap > 0.f;
  const bool direct = has_direct_path(D, p.simd) && !capped;  // the vector path has no soft cap

  // Row r = ((hk - h0) * nq + qi) * G + g  <->  query token q_start + q0 + qi, head hk * G + g.
  for (int hk = t.h0; hk < t.h1; ++hk)
    for (int qi = 0; qi < nq; ++qi)
      for (int g = 0; g < G; ++g) {
        int r = ((hk - t.h0) * nq + qi) * G + g;
        const T* src = q + (q_start + t.q0 + qi) * p.q_s0 + (hk * G + g) * p.q_s1;
        float* dst = sc.q.data() + size_t(r) * D;
        for (int i = 0; i < D; ++i) dst[i] = to_f32(src[i]) * p.scale;
      }
  std::fill(sc.run_m.begin(), sc.run_m.begin() + rows, kNegInf);
  std::fill(sc.run_l.begin(), sc.run_l.begin() + rows, 0.f);

  const int kv_begin = std::max(t.kv0, first_key(p, prefix + t.q0));  // the first query's window start
  const int kv_end = std::min(t.kv1, prefix + t.q1);                  // the last query's causal limit
  const int64_t* base = sc.base.data();
  int slot = t.partial;
  for (int split = kv_begin / t.split * t.split; split < kv_end; split += t.split) {
    const int lo_key = std::max(kv_begin, split), hi_key = std::min(kv_end, split + t.split);
    std::fill(sc.m.begin(), sc.m.begin() + rows, kNegInf);
    std::fill(sc.l.begin(), sc.l.begin() + rows, 0.f);
    std::fill(sc.acc.begin(), sc.acc.begin() + size_t(rows) * D, 0.f);
    // Blocks end at multiples of kBlock too, so a query whose window starts mid-block meets its keys
    // in the same blocks whichever query of the task set where the task starts.
    for (int kb = lo_key, n; kb < hi_key; kb += n) {
      n = std::min((kb / kBlock + 1) * kBlock, hi_key) - kb;
      int page = kb / p.page_size, row = kb % p.page_size;  // one division per block, not per key
      for (int j = 0; j < n; ++j) {  // element offset of each key row of the block
        sc.base[j] = (int64_t(pages[page]) * p.page_size + row) * p.kv_s_token;
        if (++row == p.page_size) row = 0, ++page;
      }
      // Stage the block: each key's rows for the task's heads are adjacent in its page, so this reads
      // memory in order with no compute in between (many misses in flight), into a few KB of scratch.
      // Reading the pages in place from the compute loops instead leaves a decode waiting on memory
      // (bf16: 1.4x slower; fp32: the same).
      const int64_t width = int64_t(t.h1 - t.h0) * D;
      for (int j = 0; j < n; ++j) {
        std::memcpy(sc.kstage.data() + j * width, kc + base[j] + int64_t(t.h0) * D, width * sizeof(T));
        std::memcpy(sc.vstage.data() + j * width, vc + base[j] + int64_t(t.h0) * D, width * sizeof(T));
      }
      for (int hk = t.h0; hk < t.h1; ++hk) {
        for (int j = 0; j < n; ++j) {
          sc.krow_t[j] = sc.kstage.data() + j * width + (hk - t.h0) * D;
          sc.vrow_t[j] = sc.vstage.data() + j * width + (hk - t.h0) * D;
        }
        // The portable loops take fp32 rows: float pages as they are, others widened once per block
        // (every query row of this head reuses them). The vector path widens in registers.
        const float* const* krow = nullptr;
        const float* const* vrow = nullptr;
        if constexpr (std::is_same_v<T, float>) {
          krow = sc.krow_t.data();
          vrow = sc.vrow_t.data();
        } else if (!direct) {
          for (int j = 0; j < n; ++j) {
            row_to_f32(sc.krow_t[j], sc.kbuf.data() + size_t(j) * D, D, p.simd);
            row_to_f32(sc.vrow_t[j], sc.vbuf.data() + size_t(j) * D, D, p.simd);
            sc.krow[j] = sc.kbuf.data() + size_t(j) * D;
            sc.vrow[j] = sc.vbuf.data() + size_t(j) * D;
          }
          krow = sc.krow.data();
          vrow = sc.vrow.data();
        }
        for (int qi = 0; qi < nq; ++qi) {
          const int pos = prefix + t.q0 + qi;
          const int lo = std::max(0, first_key(p, pos) - kb);  // keys [lo, hi) of this block it sees
          const int hi = std::min(n, pos + 1 - kb);
          if (hi <= lo) continue;
          const int r = ((hk - t.h0) * nq + qi) * G;  // its G rows, one per query head of this KV head
          float* qr = sc.q.data() + size_t(r) * D;
          float* acc = sc.acc.data() + size_t(r) * D;
          float* m = sc.m.data() + r;
          float* l = sc.l.data() + r;
          if (direct)
            attend_rows_direct<T>(qr, G, sc.krow_t.data() + lo, sc.vrow_t.data() + lo, hi - lo, D, m, l, acc,
                                  sc.s.data(), kBlock);
          else if (capped)
            attend_rows_capped(qr, G, krow + lo, vrow + lo, hi - lo, D, m, l, acc, sc.s.data(), p.softcap, p.simd);
          else
            attend_rows(qr, G, krow + lo, vrow + lo, hi - lo, D, m, l, acc, sc.s.data(), kBlock, p.simd);
        }
      }
    }
    if (t.partial >= 0) {  // a decode request's split: its (m, l, acc) to its own slot, merged later
      for (int r = 0; r < rows; ++r) {  // (rows = the heads of the one query, in head order)
        float* dst = partial + (size_t(slot) * p.H + t.h0 * G + r) * (D + 2);
        dst[0] = sc.m[r];
        dst[1] = sc.l[r];
        std::memcpy(dst + 2, sc.acc.data() + size_t(r) * D, sizeof(float) * D);
      }
      ++slot;
      continue;
    }
    for (int r = 0; r < rows; ++r)
      merge_partial(sc.run_m[r], sc.run_l[r], sc.run_acc.data() + size_t(r) * D, sc.m[r], sc.l[r],
                    sc.acc.data() + size_t(r) * D, D);
  }
  if (t.partial >= 0) return;

  for (int hk = t.h0; hk < t.h1; ++hk)
    for (int qi = 0; qi < nq; ++qi)
      for (int g = 0; g < G; ++g) {
        const int r = ((hk - t.h0) * nq + qi) * G + g;
        const float* a = sc.run_acc.data() + size_t(r) * D;
        finish_row(a, sc.run_l[r], out + (int64_t(q_start + t.q0 + qi) * p.H + hk * G + g) * D, D);
      }
}

// out[request's token] = the merge of its splits' (m, l, acc) in key order, per head.
template <typename T>
void merge_splits(const Problem& p, int b, int first, int count, const float* partial, T* out) {
  const int D = p.D;
  T* dst_tok = out + int64_t(p.qo_indptr[b]) * p.H * D;
  std::vector<float> acc(D);
  for (int h = 0; h < p.H; ++h) {
    float m = kNegInf, l = 0.f;
    for (int i = 0; i < count; ++i) {
      const float* src = partial + (size_t(first + i) * p.H + h) * (D + 2);
      merge_partial(m, l, acc.data(), src[0], src[1], src + 2, D);
    }
    finish_row(acc.data(), l, dst_tok + int64_t(h) * D, D);
  }
}

template <typename T>
void run(const Problem& p, int batch, const T* q, const T* kc, const T* vc, T* out) {
  const int nthreads = std::max(1, at::get_num_threads());
  std::vector<Task> tasks;
  std::vector<std::array<int, 3>> merges;  // (request, first partial slot, count)
  int num_partial = 0;
  int max_rows = p.H;
  // The splits of a decode query that sees keys [first_key, kv_len).
  auto splits_of = [&](int kv_len) {
    const int split = split_keys(kv_len);
    return (kv_len - 1) / split - first_key(p, kv_len - 1) / split + 1;
  };
  int decode_splits = 0;
  for (int b = 0; b < batch; ++b)
    if (p.qo_indptr[b + 1] - p.qo_indptr[b] == 1) decode_splits += splits_of(p.kv_lens[b]);
  // Enough tasks for every thread several times over, as few as that allows (each costs a setup).
  const int per_task = std::clamp(decode_splits / (4 * nthreads), 1, kMaxSplitsPerTask);
  for (int b = 0; b < batch; ++b) {
    const int qlen = p.qo_indptr[b + 1] - p.qo_indptr[b];
    const int kv_len = p.kv_lens[b];
    if (qlen == 0) continue;
    TORCH_CHECK(kv_len >= qlen, "request ", b, " has ", qlen, " new tokens but only ", kv_len, " keys");
    if (qlen == 1) {
      // One task for all of the request's splits merges them itself, as a prefill task does.
      const int split = split_keys(kv_len), count = splits_of(kv_len), slots = count > per_task ? count : 0;
      for (int i = 0, lo = first_key(p, kv_len - 1); lo < kv_len; i += per_task) {
        const int hi = std::min(kv_len, (lo / split + per_task) * split);
        tasks.push_back({b, 0, p.Hkv, 0, 1, lo, hi, split, slots ? num_partial + i : -1, int64_t(hi - lo) * p.Hkv});
        lo = hi;
      }
      if (slots) {
        merges.push_back({b, num_partial, count});
        num_partial += count;
      }
      continue;
    }
    const int prefix = kv_len - qlen;
    max_rows = std::max(max_rows, kQBlock * p.G);
    // Query qi sees prefix + qi + 1 keys: blocks of queries end where the split size changes.
    const int short_end = std::clamp(kShortContext - prefix, 0, qlen);
    for (int hk = 0; hk < p.Hkv; ++hk)
      for (int q0 = 0; q0 < qlen;) {
        const int q1 = std::min(q0 < short_end ? short_end : qlen, q0 + kQBlock);
        const int64_t keys = prefix + q1 - first_key(p, prefix + q0);
        tasks.push_back({b, hk, hk + 1, q0, q1, 0, kv_len, split_keys(prefix + q0 + 1), -1, int64_t(q1 - q0) * keys});
        q0 = q1;
      }
  }
  // Longest first, then dynamic hand-out: ragged lengths still finish together.
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::vector<float> partial(size_t(num_partial) * p.H * (p.D + 2));

  std::atomic<int> next{0};
  const int workers = std::min<int>(nthreads, int(tasks.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<T>& sc = Scratch<T>::for_thread(max_rows, p.D, p.Hkv);
    for (int i = next.fetch_add(1); i < int(tasks.size()); i = next.fetch_add(1))
      run_task(p, tasks[i], q, kc, vc, out, partial.data(), sc);
  });
  if (!merges.empty()) {
    at::parallel_for(0, int64_t(merges.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) merge_splits(p, merges[i][0], merges[i][1], merges[i][2], partial.data(), out);
    });
  }
}

}  // namespace

// q: [T, H, D] (rows may be strided); k_cache, v_cache: [P, page_size, Hkv, D] contiguous;
// index tensors int32 on the CPU; out: [T, H, D] contiguous, same dtype as q and the caches.
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& qo_indptr, const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                     const at::Tensor& kv_lens, at::Tensor& out, double scale, bool simd, int64_t window_left,
                     double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad q / cache shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(),
              "q rows, the caches and out must be contiguous in head_dim");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              "q, caches and out must share a dtype");
  for (const at::Tensor* t : {&qo_indptr, &kv_indptr, &kv_indices, &kv_lens})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "index tensors must be contiguous int32");
  const int H = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "head shapes do not match");
  const int batch = kv_lens.numel();
  TORCH_CHECK(qo_indptr.numel() == batch + 1 && kv_indptr.numel() == batch + 1, "indptr sizes do not match");
  TORCH_CHECK(window_left >= -1 && softcap >= 0, "window_left must be >= -1 and softcap >= 0");

  Problem p{H, Hkv, H / Hkv, D, int(k_cache.size(1)), q.stride(0), q.stride(1), int64_t(Hkv) * D,
            qo_indptr.data_ptr<int32_t>(), kv_indptr.data_ptr<int32_t>(), kv_indices.data_ptr<int32_t>(),
            kv_lens.data_ptr<int32_t>(), float(scale), simd, int(window_left), float(softcap)};
  switch (q.scalar_type()) {
    case at::kFloat:
      run<float>(p, batch, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                 out.data_ptr<float>());
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(p, batch, q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                         v_cache.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      run<c10::Half>(p, batch, q.data_ptr<c10::Half>(), k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(),
                     out.data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "paged_attention supports float32, bfloat16 and float16, not ", q.scalar_type());
  }
}

}  // namespace radixrt
