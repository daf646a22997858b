// CUDA kernels of the DiffFlow step ops (float32 / float16 / bfloat16 / float64).
//
// One generic row kernel runs the element math of diffflow_ext/math.h (shared with the CPU
// kernels) in one pass over memory:
//   * a block of 256 threads is laid out as (tx, ty): ty rows per block, tx threads per row
//     (tx = power of two sized to the row length: tx = 1 for D = 2, so one thread per row;
//     tx = 256 for large D). Rows may also be split into C column chunks (grid.y) so that
//     a few long rows still fill the GPU (B = 256, D = 65536 -> 1024 blocks);
//   * loads/stores are 16-byte vectors when every pointer is 16-byte aligned and D is a
//     multiple of the vector width, scalar otherwise;
//   * values are computed in the accumulation type (float32, float64 for double); per-row sums
//     are reduced with warp shuffles + shared memory, written directly when C == 1, else to a
//     (NRED, B, C) float32/float64 partial buffer summed by a second (deterministic) pass.
// Everything runs on the current CUDA stream.
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "diffflow_ext/host.h"
#include "diffflow_ext/register.h"

namespace diffflow_ext {
namespace cuda {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename T, int N>
struct PtrArray {
  T* p[N > 0 ? N : 1];
};

// Sum of v over the threads of a row group (threads with the same threadIdx.y; blockDim.x of them,
// a power of two). Must be called by every thread of the block. The result is valid in tx == 0.
template <typename A>
__device__ __forceinline__ A row_reduce(A v, A* smem) {
  const int nx = blockDim.x;
  const int width = nx < 32 ? nx : 32;
  for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (nx > 32) {
    const int wpr = nx >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read from the previous reduction
    if (lane == 0) smem[threadIdx.y * wpr + warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      A s = A(0);
      for (int w = 0; w < wpr; ++w) s += smem[threadIdx.y * wpr + w];
      v = s;
    }
  }
  return v;
}

template <typename scalar_t, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const Op op, const PtrArray<const scalar_t, Op::NIN> in, const PtrArray<scalar_t, Op::NOUT> out,
                const PtrArray<at::opmath_type<scalar_t>, Op::NRED> red, const int64_t B, const int64_t D,
                const int64_t C, const int64_t chunk, const bool direct, const bool any_red) {
  using A = at::opmath_type<scalar_t>;
  using V = AlignedVec<scalar_t, VEC>;
  constexpr int NIN = Op::NIN, NOUT = Op::NOUT, NR = Op::NRED > 0 ? Op::NRED : 1;
  __shared__ A smem[kThreads / 32];

  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = b < B;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    A acc[NR];
#pragma unroll
    for (int k = 0; k < NR; ++k) acc[k] = A(0);
    if (active) {
      const auto r = op.row(b);
      const int64_t off = b * D;
      const int64_t j1 = min(D, (c + 1) * chunk);
      const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
      for (int64_t j = c * chunk + static_cast<int64_t>(threadIdx.x) * VEC; j < j1; j += step) {
        A x[VEC][NIN];
#pragma unroll
        for (int i = 0; i < NIN; ++i) {
          if (in.p[i] != nullptr) {
            if constexpr (VEC > 1) {
              const V v = *reinterpret_cast<const V*>(in.p[i] + off + j);
#pragma unroll
              for (int e = 0; e < VEC; ++e) x[e][i] = static_cast<A>(v.v[e]);
            } else {
              x[0][i] = static_cast<A>(in.p[i][off + j]);
            }
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) x[e][i] = A(0);
          }
        }
        V y[NOUT];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          A o[NOUT], s[NR];
          op.elem(r, x[e], o, s);
#pragma unroll
          for (int q = 0; q < NOUT; ++q) y[q].v[e] = static_cast<scalar_t>(o[q]);
#pragma unroll
          for (int k = 0; k < Op::NRED; ++k) acc[k] += s[k];
        }
#pragma unroll
        for (int q = 0; q < NOUT; ++q) {
          if (out.p[q] == nullptr) continue;  // gradient not requested
          if constexpr (VEC > 1) {
            *reinterpret_cast<V*>(out.p[q] + off + j) = y[q];
          } else {
            out.p[q][off + j] = y[q].v[0];
          }
        }
      }
    }
    if (any_red) {
#pragma unroll
      for (int k = 0; k < Op::NRED; ++k) {
        const A s = row_reduce(acc[k], smem);
        if (threadIdx.x == 0 && active && red.p[k] != nullptr) {
          if (direct) {
            red.p[k][b] = s;
          } else {
            red.p[k][b * C + c] = s;
          }
        }
      }
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of SMs of the current device (cached per device). Only c10/cuda and the CUDA runtime are
// used (no ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers).
inline int sm_count() {
  static int cache[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev] = n;
  return n;
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

struct CudaLauncher {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); }

  template <typename scalar_t, typename Op>
  static void run(const Op& op, int64_t B, int64_t D, const std::array<const scalar_t*, Op::NIN>& in,
                  const std::array<scalar_t*, Op::NOUT>& out, const std::array<at::Tensor, Op::NRED>& red) {
    using A = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);

    // Vector width: 16-byte accesses when every row start is 16-byte aligned.
    bool aligned = D % kVec == 0;
    for (auto p : in) aligned = aligned && (reinterpret_cast<uintptr_t>(p) % 16 == 0);
    for (auto p : out) aligned = aligned && (reinterpret_cast<uintptr_t>(p) % 16 == 0);
    const int64_t vec = aligned ? kVec : 1;

    // Block shape and column chunks.
    const int64_t nvec = ceil_div(D, vec);
    const int64_t tx = std::min<int64_t>(kThreads, pow2_ceil(std::max<int64_t>(1, ceil_div(nvec, 4))));
    const int64_t ty = kThreads / tx;
    const int64_t row_blocks = ceil_div(B, ty);
    const int sms = sm_count();
    const int64_t max_c = std::max<int64_t>(1, ceil_div(nvec, tx * 4));        // >= 4 vectors per thread
    const int64_t want_c = std::max<int64_t>(1, ceil_div(8 * sms, row_blocks));  // ~8 blocks per SM
    int64_t C = std::min(max_c, want_c);
    const int64_t chunk_elems = ceil_div(nvec, C) * vec;  // a multiple of vec
    C = chunk_elems > 0 ? ceil_div(D, chunk_elems) : 1;

    bool any_red = false;
    for (const auto& t : red) any_red = any_red || t.defined();
    const bool direct = C == 1;
    at::Tensor partial;
    PtrArray<A, Op::NRED> red_ptrs{};
    if (any_red) {
      at::TensorOptions opts;
      for (const auto& t : red) {
        if (t.defined()) opts = t.options();
      }
      if (!direct) partial = at::empty({Op::NRED, B, C}, opts);
      for (int k = 0; k < Op::NRED; ++k) {
        if (!red[k].defined()) continue;
        red_ptrs.p[k] = direct ? red[k].template mutable_data_ptr<A>() : partial[k].template mutable_data_ptr<A>();
      }
    }
    PtrArray<const scalar_t, Op::NIN> in_ptrs{};
    PtrArray<scalar_t, Op::NOUT> out_ptrs{};
    for (int i = 0; i < Op::NIN; ++i) in_ptrs.p[i] = in[i];
    for (int q = 0; q < Op::NOUT; ++q) out_ptrs.p[q] = out[q];

    const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(std::min<int64_t>(C, 65535)));
    TORCH_CHECK(row_blocks <= std::numeric_limits<int32_t>::max(), "diffflow_ext: batch too large (", B, ")");
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (vec == kVec && kVec > 1) {
      rows_kernel<scalar_t, kVec, Op>
          <<<grid, block, 0, stream>>>(op, in_ptrs, out_ptrs, red_ptrs, B, D, C, chunk_elems, direct, any_red);
    } else {
      rows_kernel<scalar_t, 1, Op>
          <<<grid, block, 0, stream>>>(op, in_ptrs, out_ptrs, red_ptrs, B, D, C, chunk_elems, direct, any_red);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (any_red && !direct) {
      for (int k = 0; k < Op::NRED; ++k) {
        if (!red[k].defined()) continue;
        at::Tensor dst = red[k];
        const int64_t dim1[] = {1};
        at::sum_out(dst, partial[k], dim1);
      }
    }
  }
};

}  // namespace cuda
}  // namespace diffflow_ext

DIFFFLOW_REGISTER(diffflow_ext::cuda::CudaLauncher, c10::DispatchKey::CUDA, c10::DispatchKey::AutogradCUDA)
