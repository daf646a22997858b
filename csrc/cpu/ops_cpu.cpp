// C++ CPU kernels of the DiffFlow step ops: one pass over memory per op, parallel over
// (row, column-chunk) tiles with at::parallel_for, vectorised over features with
// at::vec::Vectorized (float32/float64 natively, float16/bfloat16 computed in float32).
//
// Per-row sums are accumulated per tile in the accumulation type, pairwise (PairwiseSum: error growing
// like log D), and the tiles' partial sums combined in a fixed order, so results are deterministic and
// independent of the threads' scheduling.
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#define DIFFFLOW_HUGE_PAGES 1
#endif

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "diffflow_ext/cpu.h"
#include "diffflow_ext/host.h"
#include "diffflow_ext/register.h"

namespace diffflow_ext {
namespace cpu {
namespace {

template <typename scalar_t>
inline constexpr bool is_reduced_v = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// Load n (<= Vec::size()) elements as a vector of the accumulation type (missing lanes are 0).
template <typename scalar_t, typename A = at::opmath_type<scalar_t>>
inline at::vec::Vectorized<A> vload(const scalar_t* p, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  if constexpr (is_reduced_v<scalar_t>) {
    Vec out;
    if (n == Vec::size()) {
      at::vec::load_to_float<scalar_t>(p, out);
    } else {
      scalar_t buf[Vec::size()];
      for (int64_t i = 0; i < Vec::size(); ++i) buf[i] = i < n ? p[i] : scalar_t(0);
      at::vec::load_to_float<scalar_t>(buf, out);
    }
    return out;
  } else {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  }
}

template <typename scalar_t, typename A = at::opmath_type<scalar_t>>
inline void vstore(scalar_t* p, const at::vec::Vectorized<A>& v, int64_t n) {
  if constexpr (is_reduced_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);  // first Vec::size() lanes are v
  } else {
    v.store(p, n);
  }
}

constexpr int64_t kMinChunk = 4096;     // elements of one row handled by a tile when rows are split
constexpr int64_t kGrainElems = 32768;  // elements per parallel task, at least
constexpr int64_t kSumBlock = 32;       // vectors summed sequentially before entering the pairwise cascade

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pairwise (cascade) summation of NR running sums of vectors. Blocks of at most kSumBlock vectors are
// summed sequentially by the caller and added here; block sums are combined like a binary counter
// (level[l] holds the sum of 2^l blocks), so every element passes through O(kSumBlock + log2(blocks))
// additions instead of D / Vec::size(): the relative error of a row sum grows like log(D), not D
// (the lane-sequential sum had 3e-6 at D = 196,608 and 6e-5 at D = 8.4M; torch's sum 2e-7).
template <typename Vec, int NR>
struct PairwiseSum {
  static constexpr int kLevels = 48;  // 2^48 blocks
  static_assert(std::is_trivially_copyable_v<Vec> && std::is_trivially_destructible_v<Vec>);
  // Raw storage: a level is written before it is read, and rows of a few elements (one tile per row,
  // e.g. B = 5000, D = 2) must not pay for initialising NR * kLevels vectors.
  alignas(Vec) unsigned char storage[sizeof(Vec) * NR * kLevels];
  uint64_t count = 0;

  Vec* level(int k) { return reinterpret_cast<Vec*>(storage) + k * kLevels; }
  const Vec* level(int k) const { return reinterpret_cast<const Vec*>(storage) + k * kLevels; }

  void add(const Vec (&block)[NR]) {
    Vec carry[NR];
    for (int k = 0; k < NR; ++k) carry[k] = block[k];
    int l = 0;
    for (uint64_t c = count; c & 1; c >>= 1, ++l) {
      for (int k = 0; k < NR; ++k) carry[k] = carry[k] + level(k)[l];
    }
    for (int k = 0; k < NR; ++k) std::memcpy(static_cast<void*>(level(k) + l), &carry[k], sizeof(Vec));
    ++count;
  }
  // The total of sum k, smallest partial sums first.
  Vec total(int k) const {
    Vec s(0);
    for (int l = 0; l < kLevels && (count >> l) != 0; ++l) {
      if ((count >> l) & 1) s = s + level(k)[l];
    }
    return s;
  }
};

// ---------------------------------------------------------------------------------------------
// Large outputs on transparent huge pages, with a bounded reuse cache.
//
// A fresh multi-MiB output from the default CPU allocator is a new glibc mmap, and writing it
// page-faults 4 KiB at a time (a 64 MiB output: 16384 faults, ~20 ms, as much as the kernel's own
// pass over memory), after the OS has zeroed every page. Outputs of at least kHugeMinBytes are
// therefore mapped here, 2 MiB-aligned, with madvise(MADV_HUGEPAGE): the first touch (inside the
// parallel_for that writes them, so on every worker) faults 2 MiB at a time. Freed mappings are kept
// in a small cache (at most DIFFFLOW_CPU_CACHE_MB, default 512 MiB; 0 = unmap at once) for the next
// output of the same size -- a training loop asks for the same shapes every step -- so a reused
// output is neither faulted nor zeroed again. Cached mappings are madvise(MADV_FREE)d: the OS may
// reclaim them under memory pressure (they then fault in again on reuse), so the cache holds no
// memory that anything else needs.
// The tensors are ordinary CPU tensors (resizable storage owned by HugePageAllocator, whose
// allocate() also serves resize_). Without THP support (or with THP "never") madvise is a no-op
// and this is a plain anonymous mapping. DIFFFLOW_CPU_HUGE_PAGES=0 turns it off (at::empty).
#ifdef DIFFFLOW_HUGE_PAGES
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeMinBytes = size_t(4) << 20;

// Layout of one mapping: [header page: mapped length, requested bytes][data, 2 MiB-aligned ...].
struct MapHeader {
  size_t map_len;
  size_t nbytes;
};

std::atomic<size_t> g_huge_bytes{0};  // bytes of live tensors (for the profiler's memory events)

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

size_t env_size(const char* name, size_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 10);
  return end != v ? static_cast<size_t>(x) : dflt;
}

// Freed mappings, oldest first. Never destroyed (tensors may be freed during static destruction).
struct MapCache {
  std::mutex mu;
  std::vector<MapHeader*> maps;
  size_t bytes = 0;
  const size_t cap = env_size("DIFFFLOW_CPU_CACHE_MB", 512) << 20;
};
MapCache& map_cache() {
  static auto* c = new MapCache;
  return *c;
}

MapHeader* header_of(void* data) { return reinterpret_cast<MapHeader*>(static_cast<char*>(data) - page_size()); }
void* data_of(MapHeader* h) { return reinterpret_cast<char*>(h) + page_size(); }

void report(void* data, int64_t delta) {
  const size_t total = delta >= 0 ? g_huge_bytes.fetch_add(delta) + delta : g_huge_bytes.fetch_sub(-delta) + delta;
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(data, delta, total, total, c10::Device(c10::kCPU));
  }
}

void huge_free(void* data) {
  if (data == nullptr) return;
  MapHeader* h = header_of(data);
  report(data, -static_cast<int64_t>(h->nbytes));
  auto& c = map_cache();
  if (h->map_len > c.cap) {
    munmap(h, h->map_len);
    return;
  }
#ifdef MADV_FREE
  madvise(data, h->map_len - page_size(), MADV_FREE);  // reclaimable; the header page stays
#endif
  std::vector<MapHeader*> evict;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.maps.push_back(h);
    c.bytes += h->map_len;
    size_t n = 0;
    while (c.bytes > c.cap) {
      c.bytes -= c.maps[n]->map_len;
      evict.push_back(c.maps[n++]);
    }
    c.maps.erase(c.maps.begin(), c.maps.begin() + static_cast<std::ptrdiff_t>(n));
  }
  for (auto* e : evict) munmap(e, e->map_len);
}

MapHeader* cached_map(size_t map_len) {
  auto& c = map_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (size_t i = c.maps.size(); i-- > 0;) {  // newest first: its pages are the most likely still resident
    MapHeader* h = c.maps[i];
    if (h->map_len == map_len) {
      c.maps.erase(c.maps.begin() + static_cast<std::ptrdiff_t>(i));
      c.bytes -= map_len;
      return h;
    }
  }
  return nullptr;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device dev(c10::kCPU);
    if (nbytes == 0) return {nullptr, nullptr, &huge_free, dev};
    const size_t pg = page_size();
    const size_t len = (nbytes + pg - 1) / pg * pg;
    MapHeader* h = cached_map(pg + len);
    if (h == nullptr) {
      const size_t want = pg + len + kHugePage;  // header page + data + alignment slack
      void* m = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK_WITH(OutOfMemoryError, m != MAP_FAILED, "diffflow_ext: CPU out of memory: failed to map ", nbytes,
                       " bytes: ", std::strerror(errno));
      const uintptr_t base = reinterpret_cast<uintptr_t>(m);
      const uintptr_t data = (base + pg + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
      const uintptr_t start = data - pg, end = data + len;
      if (start > base) munmap(m, start - base);
      if (base + want > end) munmap(reinterpret_cast<void*>(end), base + want - end);
      madvise(reinterpret_cast<void*>(data), len, MADV_HUGEPAGE);  // best effort (EINVAL without THP)
      h = reinterpret_cast<MapHeader*>(start);
      h->map_len = pg + len;
    }
    h->nbytes = nbytes;
    void* data = data_of(h);
    report(data, static_cast<int64_t>(nbytes));
    return {data, data, &huge_free, dev};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &huge_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DIFFFLOW_CPU_HUGE_PAGES");
    return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
  }();
  return on;
}
#endif

}  // namespace

// Elements [j0, j1) of the row at offset `off`, one at a time (the element math with T = A); adds each
// element's per-row sum contributions to sums[].
template <typename scalar_t, typename Op, typename Row, typename A = at::opmath_type<scalar_t>>
inline void scalar_elems(const Op& op, const Row& r, const std::array<const scalar_t*, Op::NIN>& in,
                         const std::array<scalar_t*, Op::NOUT>& out, int64_t off, int64_t j0, int64_t j1, A* sums) {
  for (int64_t j = j0; j < j1; ++j) {
    A sin[Op::NIN], sout[Op::NOUT], sred[Op::NRED > 0 ? Op::NRED : 1];
    for (int i = 0; i < Op::NIN; ++i) sin[i] = in[i] ? static_cast<A>(in[i][off + j]) : A(0);
    op.elem(r, sin, sout, sred);
    for (int o = 0; o < Op::NOUT; ++o) {
      if (out[o]) out[o][off + j] = static_cast<scalar_t>(sout[o]);
    }
    for (int k = 0; k < Op::NRED; ++k) sums[k] += sred[k];
  }
}

struct CpuLauncher {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  // State-shaped outputs (contiguous): large ones on transparent huge pages (see HugePageAllocator).
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#ifdef DIFFFLOW_HUGE_PAGES
    const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
    if (nbytes >= kHugeMinBytes && huge_pages_enabled()) {
      static HugePageAllocator alloc;
      return at::detail::empty_generic(sizes, &alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                       c10::typeMetaToScalarType(opts.dtype()), c10::MemoryFormat::Contiguous);
    }
#endif
    return at::empty(sizes, opts);
  }

  template <typename scalar_t, typename Op>
  static void run(const Op& op, int64_t B, int64_t D, const std::array<const scalar_t*, Op::NIN>& in,
                  const std::array<scalar_t*, Op::NOUT>& out, const std::array<at::Tensor, Op::NRED>& red) {
    using A = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<A>;
    constexpr int64_t VS = Vec::size();
    constexpr int NR = Op::NRED > 0 ? Op::NRED : 1;

    std::array<A*, NR> red_ptr{};
    bool any_red = false;
    for (int k = 0; k < Op::NRED; ++k) {
      red_ptr[k] = red[k].defined() ? red[k].template mutable_data_ptr<A>() : nullptr;
      any_red = any_red || red_ptr[k] != nullptr;
    }

    // Rows shorter than a vector (e.g. 2-D data, B = 5000, D = 2): a plain scalar pass per row, with none of
    // the tiling, vector and pairwise-sum bookkeeping below (which would cost more than the row itself).
    if (D < VS) {
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1));
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const auto r = op.row(b);
          const int64_t off = b * D;
          A sums[NR] = {};
          scalar_elems<scalar_t>(op, r, in, out, off, 0, D, sums);
          for (int k = 0; k < Op::NRED; ++k) {
            if (red_ptr[k]) red_ptr[k][b] = sums[k];
          }
        }
      });
      return;
    }

    // Tiles: rows, or (row, column chunk) when there are too few rows to keep every thread busy.
    const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
    int64_t C = 1;
    if (D >= 2 * kMinChunk && B < 4 * nthreads) {
      C = std::min(ceil_div(D, kMinChunk), ceil_div(4 * nthreads, B));
    }
    int64_t chunk = ceil_div(ceil_div(D, C), VS) * VS;
    C = chunk > 0 ? ceil_div(D, chunk) : 1;
    std::vector<A> partial(any_red && C > 1 ? static_cast<size_t>(NR * B * C) : 0);
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(chunk, 1));

    at::parallel_for(0, B * C, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        const int64_t j0 = c * chunk, j1 = std::min(D, j0 + chunk);
        const auto r = op.row(b);
        const int64_t off = b * D;
        PairwiseSum<Vec, NR> sums;
        int64_t j = j0;
        while (j + VS <= j1) {
          const int64_t block_end = std::min(j1, j + kSumBlock * VS);
          Vec block[NR];
          for (int k = 0; k < NR; ++k) block[k] = Vec(A(0));
          for (; j + VS <= block_end; j += VS) {
            Vec vin[Op::NIN], vout[Op::NOUT], vred[NR];
            for (int i = 0; i < Op::NIN; ++i) vin[i] = in[i] ? vload<scalar_t>(in[i] + off + j, VS) : Vec(A(0));
            op.elem(r, vin, vout, vred);
            for (int o = 0; o < Op::NOUT; ++o) {
              if (out[o]) vstore<scalar_t>(out[o] + off + j, vout[o], VS);
            }
            if (any_red) {
              for (int k = 0; k < Op::NRED; ++k) block[k] = block[k] + vred[k];
            }
          }
          if (any_red) sums.add(block);
        }
        // Scalar tail (and whole rows when D < Vec::size()): same element math with T = A.
        A tail[NR] = {};
        scalar_elems<scalar_t>(op, r, in, out, off, j, j1, tail);
        if (any_red) {
          for (int k = 0; k < Op::NRED; ++k) {
            if (!red_ptr[k]) continue;
            A lanes[VS];
            sums.total(k).store(lanes);
            A s = A(0);
            for (int64_t l = 0; l < VS; ++l) s += lanes[l];
            s += tail[k];
            if (C == 1) {
              red_ptr[k][b] = s;
            } else {
              partial[(k * B + b) * C + c] = s;
            }
          }
        }
      }
    });
    if (any_red && C > 1) {
      for (int k = 0; k < Op::NRED; ++k) {
        if (!red_ptr[k]) continue;
        for (int64_t b = 0; b < B; ++b) {
          A s = A(0);
          for (int64_t c = 0; c < C; ++c) s += partial[(k * B + b) * C + c];
          red_ptr[k][b] = s;
        }
      }
    }
  }
};

// The exported C++ API (diffflow_ext/cpu.h).
using CpuOps = Ops<CpuLauncher>;
#define DIFFFLOW_DEFINE_CPU_OP(NAME, ...) sig::NAME& NAME = CpuOps::NAME;
DIFFFLOW_OPS(DIFFFLOW_DEFINE_CPU_OP)
#undef DIFFFLOW_DEFINE_CPU_OP

}  // namespace cpu

}  // namespace diffflow_ext

DIFFFLOW_REGISTER(diffflow_ext::cpu::CpuLauncher, c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU)
