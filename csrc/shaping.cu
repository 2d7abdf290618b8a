// flowkern._C: fused per-sequence reward shaping and GRPO advantages (DESIGN.md §1).
//
// One thread block (kThreads threads) owns one sequence (row) of the rollout batch and does, in
// one launch:
//   1. the group-normalised outcome Â of its row (a first phase over the row's group of
//      `group_size` outcomes: a few floats, read from L2);
//   2. masked min / max (and count) over the row's action tokens;
//   3. normalisation (minmax, minmax-bil, mean or none) and the threshold η;
//   4. top-k by an MSB-first radix select (4 passes of 8 bits) over order-preserving uint32 keys,
//      per side for the two-sided norms; exact for any T (the select is over counts, not sorts);
//   5. r = -β·s on the kept tokens;
//   6. the reward-to-go G[k] = r[k] + γ·G[k+1] as a block-wide scan of affine maps, right to left
//      in chunks of kThreads positions, and A = Â + G on action tokens.
//
// The row is staged in shared memory when T·4 bytes fit (T ≤ 32,768 on sm_80 and sm_90 with the
// opt-in limit); otherwise the rewards output row doubles as the scratch buffer (L2-resident). Both
// paths run the same code. The mask is re-read from global memory in each pass (L1/L2 hits).
//
// Exactness: normalisation uses IEEE round-to-nearest intrinsics (__fsub_rn, __fdiv_rn, __fmul_rn)
// so that no FMA contraction or approximate division can move a value across η or change the top-k
// order: minmax, minmax-bil and none reproduce the torch reference bit for bit. For `mean`, the row
// sum is accumulated in fp64 and rounded once, so it may differ from torch's fp32 sum in the last bit.
// Ties at the k-th value are broken by position (lowest index first); exactly k are kept per side.
//
// Bytes moved / bandwidth floor (DRAM, per token):
//   fused  shape_rewards_and_advantages: read scores 4 B + mask 1 B, write rewards 4 B + advantages 4 B
//          = 13 B/token. B=1024, T=4096: 4.19 M tokens × 13 B = 54.5 MB → 13 µs at 4.2 TB/s (H200).
//   shape_rewards alone: 9 B/token; shape_advantages alone: read rewards 4 + mask 1, write 4 = 9 B/token.
// The extra passes of steps 2–6 re-read the row from shared memory (or L2) and the mask from L1/L2.

#include "shaping.h"

// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a minimal
// toolkit (nvcc + cudart, as on the CPU CI machine) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>

namespace flowkern {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;  // radix digit of 8 bits
constexpr unsigned kFull = 0xffffffffu;
constexpr unsigned kNoSlot = 0xffffffffu;
constexpr int kDefaultSmem = 48 * 1024;
static_assert(kThreads >= kBins, "the digit scan gives one bin to each of the first kBins threads");
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
static_assert(kThreads < (1 << 16), "tie counts of one chunk are packed in 16 bits");

// G_left = b + a * G_right: one step (or a run) of the reward-to-go recurrence.
struct Affine {
  double a, b;
};

struct ShapeArgs {
  int norm;
  float threshold;  // η, rounded to fp32 as torch does when comparing an fp32 tensor with a scalar
  int topk;
  float neg_coef;  // -β in fp32, as torch multiplies an fp32 tensor by a Python scalar
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int o) {
  return __shfl_xor_sync(kFull, v, o);
}
template <typename T>
__device__ __forceinline__ T shfl_up(T v, int o) {
  return __shfl_up_sync(kFull, v, o);
}
template <>
__device__ __forceinline__ Affine shfl_up<Affine>(Affine v, int o) {
  return Affine{__shfl_up_sync(kFull, v.a, o), __shfl_up_sync(kFull, v.b, o)};
}

struct MinF {
  __device__ float operator()(float x, float y) const { return fminf(x, y); }
};
struct MaxF {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
struct SumI {
  __device__ int operator()(int x, int y) const { return x + y; }
};
struct SumD {
  __device__ double operator()(double x, double y) const { return x + y; }
};
// x precedes y in scan order (x covers the positions to the right of y's).
struct Compose {
  __device__ Affine operator()(Affine x, Affine y) const { return Affine{x.a * y.a, y.b + y.a * x.b}; }
};

// Every thread gets the reduction of `v` over the block. Called by all threads.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, void* scratch_raw) {
  T* scratch = static_cast<T*>(scratch_raw);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  __syncthreads();  // earlier readers of scratch are done
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}

// Inclusive scan of `v` in thread order; `*total` gets the block aggregate. Called by all threads.
template <typename T, typename Op>
__device__ __forceinline__ T block_inclusive_scan(T v, Op op, void* scratch_raw, T* total) {
  T* scratch = static_cast<T*>(scratch_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = shfl_up(v, o);
    if (lane >= o) v = op(n, v);
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  T acc = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (w == warp) v = op(acc, v);
    acc = op(acc, scratch[w]);
  }
  *total = acc;
  return v;
}

// Order-preserving map float -> uint32 (larger float, larger key); -0 is folded onto +0.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(__fadd_rn(v, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// 0: dropped by the threshold; 1: kept on the first side (one-sided: s > η; two-sided: |s| > η and
// s > 0); 2: two-sided, |s| > η and s < 0; 3: two-sided, s == 0 with η < 0 (kept only when topk == 0).
__device__ __forceinline__ int side_of(float s, bool two_sided, float thr) {
  if (!two_sided) return s > thr ? 1 : 0;
  if (!(fabsf(s) > thr)) return 0;
  return s > 0.f ? 1 : (s < 0.f ? 2 : 3);
}

// Â of row `row`: (R - mean) / (std + 1e-6) over its group, unbiased std, fp64; 0 for a constant group.
__device__ float group_advantage(const float* __restrict__ outcome, int64_t row, int n, void* scratch) {
  const float* g = outcome + (row / n) * n;
  double sum = 0.0;
  float lo = INFINITY, hi = -INFINITY;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const float v = g[j];
    sum += v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  sum = block_allreduce(sum, SumD(), scratch);
  lo = block_allreduce(lo, MinF(), scratch);
  hi = block_allreduce(hi, MaxF(), scratch);
  if (n < 2 || !(lo < hi)) return 0.f;  // zero std (and groups of one)
  const double mean = sum / n;
  double ss = 0.0;
  for (int j = threadIdx.x; j < n; j += kThreads) {
    const double d = static_cast<double>(g[j]) - mean;
    ss += d * d;
  }
  ss = block_allreduce(ss, SumD(), scratch);
  const double sd = sqrt(ss / (n - 1));
  return static_cast<float>((static_cast<double>(outcome[row]) - mean) / (sd + 1e-6));
}

// One radix digit of the select: choose the bin holding the `remaining`-th largest key among those
// counted in `h`, extend `prefix` by it, and update `remaining` (rank inside the bin) and `eq` (the
// bin's count; after the last digit, the number of keys equal to the k-th).
__device__ void radix_digit(const unsigned* h, int shift, unsigned& prefix, int& remaining, int& eq,
                            void* scratch, int* sel) {
  const int t = threadIdx.x;
  const int c = t < kBins ? static_cast<int>(h[kBins - 1 - t]) : 0;  // thread t holds bin 255 - t
  int total;
  const int incl = block_inclusive_scan(c, SumI(), scratch, &total);  // keys in bins >= 255 - t
  if (incl >= remaining && incl - c < remaining) {  // exactly one thread (total >= remaining >= 1)
    sel[0] = kBins - 1 - t;
    sel[1] = remaining - (incl - c);
    sel[2] = c;
  }
  __syncthreads();
  prefix |= static_cast<unsigned>(sel[0]) << shift;
  remaining = sel[1];
  eq = sel[2];
}

// Steps 2-5 for one row. `buf` is the row's scratch (shared memory, or `out` itself); each thread
// only ever touches positions i ≡ threadIdx.x (mod kThreads) of it until the final write.
__device__ void shape_row(const float* __restrict__ sc, const uint8_t* __restrict__ m, float* buf, float* out,
                          bool keep_in_buf, int T, const ShapeArgs& sa, void* scratch, unsigned* hist,
                          int (*sel)[3]) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;

  // Stage the action scores; masked min / max / count.
  float lo = INFINITY, hi = -INFINITY;
  int cnt = 0;
  for (int i = tid; i < T; i += kThreads) {
    if (m[i]) {
      const float v = sc[i];
      buf[i] = v;
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
      ++cnt;
    }
  }

  // Normalise in place (bit-exact with the torch reference's elementwise ops).
  if (sa.norm != kNormNone) {
    lo = block_allreduce(lo, MinF(), scratch);
    hi = block_allreduce(hi, MaxF(), scratch);
    const float span = __fsub_rn(hi, lo);
    const bool constant = !(span > 0.f);  // also rows without action tokens
    const float denom = constant ? 1.f : span;
    double sum = 0.0;
    for (int i = tid; i < T; i += kThreads) {
      if (m[i]) {
        const float unit = constant ? 0.f : __fdiv_rn(__fsub_rn(buf[i], lo), denom);
        float s = unit;
        if (sa.norm == kNormMinmaxBil) {
          s = constant ? 0.f : __fsub_rn(__fmul_rn(2.f, unit), 1.f);
        } else if (sa.norm == kNormMean) {
          sum += unit;
        }
        buf[i] = s;
      }
    }
    if (sa.norm == kNormMean) {
      sum = block_allreduce(sum, SumD(), scratch);
      cnt = block_allreduce(cnt, SumI(), scratch);
      const float mean = __fdiv_rn(static_cast<float>(sum), static_cast<float>(cnt > 1 ? cnt : 1));
      for (int i = tid; i < T; i += kThreads) {
        if (m[i]) buf[i] = __fsub_rn(buf[i], mean);
      }
    }
  }

  const bool two = sa.norm == kNormMinmaxBil || sa.norm == kNormMean;
  const float thr = sa.threshold;
  const bool select = sa.topk > 0;                  // topk == 0 keeps every survivor
  const int K = two ? sa.topk / 2 : sa.topk;         // per side
  bool need[2] = {false, false};                     // side has more than K survivors
  unsigned kth[2] = {0u, 0u};                        // key of the K-th largest
  int rem[2] = {0, 0};                               // how many keys equal to kth are kept
  int eq[2] = {0, 0};                                // how many keys equal kth
  if (select && K > 0) {
    int n1 = 0, n2 = 0;
    for (int i = tid; i < T; i += kThreads) {
      if (m[i]) {
        const int sd = side_of(buf[i], two, thr);
        n1 += sd == 1;
        n2 += sd == 2;
      }
    }
    n1 = block_allreduce(n1, SumI(), scratch);
    n2 = block_allreduce(n2, SumI(), scratch);
    need[0] = n1 > K;
    need[1] = n2 > K;
    if (need[0] || need[1]) {
      unsigned prefix[2] = {0u, 0u};
      int remaining[2] = {K, K};
      for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        const unsigned high = pass == 0 ? 0u : (kFull << (shift + 8));  // digits already chosen
        for (int j = tid; j < 2 * kBins; j += kThreads) hist[j] = 0u;
        __syncthreads();
        for (int base = 0; base < T; base += kThreads) {  // uniform trip count: whole warps below
          const int i = base + tid;
          unsigned slot = kNoSlot;
          if (i < T && m[i]) {
            const float s = buf[i];
            const int sd = side_of(s, two, thr);
            if ((sd == 1 && need[0]) || (sd == 2 && need[1])) {
              const int k = sd - 1;
              const unsigned key = order_key(k ? -s : s);
              if ((key & high) == (k ? prefix[1] : prefix[0])) slot = k * kBins + ((key >> shift) & 0xffu);
            }
          }
          // Warp-aggregated histogram update: one atomic per distinct bin per warp.
          const unsigned peers = __match_any_sync(kFull, slot);
          if (slot != kNoSlot && lane == __ffs(peers) - 1) atomicAdd(&hist[slot], static_cast<unsigned>(__popc(peers)));
        }
        __syncthreads();
        if (need[0]) radix_digit(hist, shift, prefix[0], remaining[0], eq[0], scratch, sel[0]);
        if (need[1]) radix_digit(hist + kBins, shift, prefix[1], remaining[1], eq[1], scratch, sel[1]);
      }
      kth[0] = prefix[0];
      kth[1] = prefix[1];
      rem[0] = remaining[0];
      rem[1] = remaining[1];
    }
  }
  const bool tie_break[2] = {need[0] && rem[0] < eq[0], need[1] && rem[1] < eq[1]};
  const bool any_tie = tie_break[0] || tie_break[1];

  // Final write: keep, scale by -β; ties at the k-th key go to the lowest positions.
  int tie_base[2] = {0, 0};
  for (int base = 0; base < T; base += kThreads) {  // uniform trip count: block scan inside
    const int i = base + tid;
    const bool act = i < T && m[i];
    const float s = act ? buf[i] : 0.f;
    const int sd = act ? side_of(s, two, thr) : 0;
    bool keep = false;
    int tie = 0;  // side-0 tie in bits 0-15, side-1 tie in bits 16-31
    if (sd != 0) {
      if (!select) {
        keep = true;
      } else if (sd <= 2 && K > 0) {
        const int k = sd - 1;
        if (!(k ? need[1] : need[0])) {
          keep = true;
        } else {
          const unsigned key = order_key(k ? -s : s);
          const unsigned kk = k ? kth[1] : kth[0];
          if (key > kk) {
            keep = true;
          } else if (key == kk) {
            if (k ? tie_break[1] : tie_break[0]) tie = 1 << (16 * k);
            else keep = true;
          }
        }
      }
    }
    if (any_tie) {
      int total;
      const int excl = block_inclusive_scan(tie, SumI(), scratch, &total) - tie;
      if (tie & 0xffff) keep = tie_base[0] + (excl & 0xffff) < rem[0];
      else if (tie) keep = tie_base[1] + (excl >> 16) < rem[1];
      tie_base[0] += total & 0xffff;
      tie_base[1] += total >> 16;
    }
    if (i < T) {
      const float r = keep ? __fmul_rn(sa.neg_coef, s) : 0.f;
      out[i] = r;
      if (keep_in_buf) buf[i] = r;
    }
  }
}

// Step 6: A[p] = Â + Σ_{s ≥ p} γ^(s-p) r[s] on action tokens, 0 elsewhere. Chunks of kThreads
// positions are scanned right to left; thread t holds position base + kThreads-1-t, so an inclusive
// scan in thread order is a suffix scan in position order. fp64 accumulation.
__device__ void reward_to_go(const float* r, const uint8_t* __restrict__ m, float* adv, int T, float adv_hat,
                             double gamma, void* scratch) {
  const int tid = threadIdx.x;
  double carry = 0.0;  // G at the first position right of the current chunk
  const int chunks = (T + kThreads - 1) / kThreads;
  for (int c = chunks - 1; c >= 0; --c) {
    const int p = c * kThreads + (kThreads - 1 - tid);
    const bool in = p < T;
    const bool act = in && m[p];
    const Affine e = in ? Affine{gamma, act ? static_cast<double>(r[p]) : 0.0} : Affine{1.0, 0.0};
    Affine total;
    const Affine inc = block_inclusive_scan(e, Compose(), scratch, &total);
    if (in) adv[p] = act ? __fadd_rn(adv_hat, static_cast<float>(inc.b + inc.a * carry)) : 0.f;
    carry = total.b + total.a * carry;
  }
}

template <bool kShape, bool kAdv, bool kSmem>
__global__ void __launch_bounds__(kThreads)
shaping_kernel(const float* __restrict__ scores, const uint8_t* __restrict__ mask,
               const float* __restrict__ rewards_in, const float* __restrict__ outcome, float* rewards_out,
               float* adv_out, int T, ShapeArgs sa, int group_size, double gamma) {
  extern __shared__ float smem_row[];
  __shared__ __align__(16) unsigned char scratch[32 * sizeof(Affine)];
  __shared__ unsigned hist[2 * kBins];
  __shared__ int sel[2][3];

  const int64_t row = blockIdx.x;
  const int64_t off = row * static_cast<int64_t>(T);
  const uint8_t* m = mask + off;

  float adv_hat = 0.f;
  if (kAdv) adv_hat = group_advantage(outcome, row, group_size, scratch);
  if (kShape) {
    float* buf = kSmem ? smem_row : rewards_out + off;
    shape_row(scores + off, m, buf, rewards_out + off, kAdv && kSmem, T, sa, scratch, hist, sel);
  }
  if (kAdv) {
    __syncthreads();  // the rewards written above are read by other threads
    const float* r = kShape ? (kSmem ? smem_row : rewards_out + off) : rewards_in + off;
    reward_to_go(r, m, adv_out + off, T, adv_hat, gamma, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: validation, launch.

constexpr const char* kPrefix = "flowkern._C.";

void check_float32(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kPrefix, fn, ": ", name, " must be a float32 tensor, got dtype ",
                   t.scalar_type());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* fn, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, kPrefix, fn, ": ", name, " must be ", layout, ", got shape ", t.sizes());
}

void check_mask(const at::Tensor& mask, const at::Tensor& like, const char* fn, const char* like_name) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, kPrefix, fn,
                   ": action_mask must be a bool or uint8 tensor, got dtype ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == like.sizes(), kPrefix, fn, ": action_mask must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", mask.sizes());
}

// The [B] outcome of a batch whose [B, T] row tensor is `rows`.
void check_outcome(const at::Tensor& outcome, const at::Tensor& rows, const char* fn, const char* rows_name) {
  check_float32(outcome, fn, "outcome");
  check_dim(outcome, 1, fn, "outcome", "[B]");
  TORCH_CHECK_VALUE(outcome.size(0) == rows.size(0), kPrefix, fn, ": outcome must have shape [", rows.size(0),
                    "] (one per row of ", rows_name, "), got ", outcome.sizes());
}

struct NamedTensor {
  const at::Tensor& tensor;
  const char* name;
};

// Every argument is a CUDA tensor, all on the first one's device; checked in argument order.
void check_one_cuda_device(const char* fn, std::initializer_list<NamedTensor> args) {
  const NamedTensor& first = *args.begin();
  for (const NamedTensor& a : args) {
    TORCH_CHECK(a.tensor.is_cuda(), kPrefix, fn, ": ", a.name, " must be a CUDA tensor, got a tensor on ",
                a.tensor.device(), " (the CUDA kernels need CUDA tensors; use backend=\"torch\" for CPU tensors)");
  }
  for (const NamedTensor& a : args) {
    TORCH_CHECK(a.tensor.device() == first.tensor.device(), kPrefix, fn, ": ", a.name, " is on ", a.tensor.device(),
                " but ", first.name, " is on ", first.tensor.device());
  }
}

// The [B, T] float32 row tensor of a call (scores or token rewards), small enough for the kernels' int indexing.
void check_rows(const at::Tensor& t, const char* fn, const char* name) {
  check_float32(t, fn, name);
  check_dim(t, 2, fn, name, "[B, T]");
  TORCH_CHECK_VALUE(t.size(0) <= INT_MAX && t.size(1) <= INT_MAX / 2, kPrefix, fn, ": ", name, " is too large, got shape ",
                    t.sizes());
}

ShapeArgs shape_args(int64_t norm, double threshold, int64_t topk, double coef, const char* fn) {
  TORCH_CHECK_VALUE(norm >= kNormMinmax && norm <= kNormNone, kPrefix, fn,
                    ": norm must be a code of _C.NORM_CODES (0-3), got ", norm);
  TORCH_CHECK_VALUE(topk >= 0 && topk <= INT_MAX, kPrefix, fn, ": topk must be a non-negative int, got ", topk);
  TORCH_CHECK_VALUE(!std::isnan(threshold), kPrefix, fn, ": threshold must not be NaN");
  TORCH_CHECK_VALUE(std::isfinite(coef), kPrefix, fn, ": coef must be finite, got ", coef);
  return ShapeArgs{static_cast<int>(norm), static_cast<float>(threshold), static_cast<int>(topk),
                   static_cast<float>(-coef)};
}

void check_group(int64_t B, int64_t group_size, double gamma, const char* fn) {
  TORCH_CHECK_VALUE(group_size >= 1 && group_size <= INT_MAX, kPrefix, fn, ": group_size must be a positive int, got ",
                    group_size);
  TORCH_CHECK_VALUE(B % group_size == 0, kPrefix, fn, ": group_size (", group_size, ") must divide the batch size B (",
                    B, ")");
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, kPrefix, fn, ": gamma must lie in [0, 1], got ", gamma);
}

int64_t compute_smem_row_limit(int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, shaping_kernel<true, true, true>));
  const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
  return avail > 0 ? avail / static_cast<int64_t>(sizeof(float)) : 0;
}

// Longest row staged in shared memory on the current device (cached per device).
int64_t smem_row_limit() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices];  // 0: not computed yet
  const int device = c10::cuda::current_device();
  if (device < 0 || device >= kMaxDevices) return compute_smem_row_limit(device);
  int64_t v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = compute_smem_row_limit(device) + 1;  // stored +1 so that a limit of 0 is cached too
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v - 1;
}

template <bool kShape, bool kAdv, bool kSmem>
void launch(int64_t B, int64_t T, const float* scores, const uint8_t* mask, const float* rewards_in,
            const float* outcome, float* rewards_out, float* adv_out, ShapeArgs sa, int group_size, double gamma) {
  auto kernel = shaping_kernel<kShape, kAdv, kSmem>;
  const size_t smem = kSmem ? static_cast<size_t>(T) * sizeof(float) : 0;
  if (smem > static_cast<size_t>(kDefaultSmem)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(B), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      scores, mask, rewards_in, outcome, rewards_out, adv_out, static_cast<int>(T), sa, group_size, gamma);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Stages rows in shared memory when asked and when T fits, else uses the rewards output as scratch.
template <bool kAdv>
void launch_shaping(bool use_smem, int64_t B, int64_t T, const float* scores, const uint8_t* mask,
                    const float* outcome, float* rewards_out, float* adv_out, ShapeArgs sa, int group_size,
                    double gamma) {
  if (use_smem && T <= smem_row_limit()) {
    launch<true, kAdv, true>(B, T, scores, mask, nullptr, outcome, rewards_out, adv_out, sa, group_size, gamma);
  } else {
    launch<true, kAdv, false>(B, T, scores, mask, nullptr, outcome, rewards_out, adv_out, sa, group_size, gamma);
  }
}

const uint8_t* mask_ptr(const at::Tensor& mask) { return static_cast<const uint8_t*>(mask.data_ptr()); }

}  // namespace

at::Tensor shape_rewards(const at::Tensor& scores_in, const at::Tensor& mask_in, int64_t norm, double threshold,
                         int64_t topk, double coef, bool use_smem) {
  const char* fn = "shape_rewards";
  check_rows(scores_in, fn, "scores");
  check_mask(mask_in, scores_in, fn, "scores");
  const ShapeArgs sa = shape_args(norm, threshold, topk, coef, fn);
  check_one_cuda_device(fn, {{scores_in, "scores"}, {mask_in, "action_mask"}});

  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1);
  at::Tensor out = at::empty({B, T}, scores.options());
  if (B == 0 || T == 0) return out;
  launch_shaping<false>(use_smem, B, T, scores.data_ptr<float>(), mask_ptr(mask), nullptr, out.data_ptr<float>(),
                        nullptr, sa, 1, 1.0);
  return out;
}

at::Tensor shape_advantages(const at::Tensor& outcome_in, const at::Tensor& rewards_in, const at::Tensor& mask_in,
                            int64_t group_size, double gamma) {
  const char* fn = "shape_advantages";
  check_rows(rewards_in, fn, "token_rewards");
  check_outcome(outcome_in, rewards_in, fn, "token_rewards");
  check_mask(mask_in, rewards_in, fn, "token_rewards");
  check_group(rewards_in.size(0), group_size, gamma, fn);
  check_one_cuda_device(fn, {{outcome_in, "outcome"}, {rewards_in, "token_rewards"}, {mask_in, "action_mask"}});

  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor outcome = outcome_in.contiguous();
  const at::Tensor rewards = rewards_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T = rewards.size(1);
  at::Tensor adv = at::empty({B, T}, rewards.options());
  if (B == 0 || T == 0) return adv;
  launch<false, true, false>(B, T, nullptr, mask_ptr(mask), rewards.data_ptr<float>(), outcome.data_ptr<float>(),
                             nullptr, adv.data_ptr<float>(), ShapeArgs{kNormNone, 0.f, 0, 0.f},
                             static_cast<int>(group_size), gamma);
  return adv;
}

std::tuple<at::Tensor, at::Tensor> shape_rewards_and_advantages(const at::Tensor& scores_in, const at::Tensor& mask_in,
                                                                const at::Tensor& outcome_in, int64_t norm,
                                                                double threshold, int64_t topk, double coef,
                                                                int64_t group_size, double gamma, bool use_smem) {
  const char* fn = "shape_rewards_and_advantages";
  check_rows(scores_in, fn, "scores");
  check_outcome(outcome_in, scores_in, fn, "scores");
  check_mask(mask_in, scores_in, fn, "scores");
  const ShapeArgs sa = shape_args(norm, threshold, topk, coef, fn);
  check_group(scores_in.size(0), group_size, gamma, fn);
  check_one_cuda_device(fn, {{scores_in, "scores"}, {mask_in, "action_mask"}, {outcome_in, "outcome"}});

  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor outcome = outcome_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1);
  at::Tensor rewards = at::empty({B, T}, scores.options());
  at::Tensor adv = at::empty({B, T}, scores.options());
  if (B == 0 || T == 0) return {rewards, adv};
  launch_shaping<true>(use_smem, B, T, scores.data_ptr<float>(), mask_ptr(mask), outcome.data_ptr<float>(),
                       rewards.data_ptr<float>(), adv.data_ptr<float>(), sa, static_cast<int>(group_size), gamma);
  return {rewards, adv};
}

std::string kernel_unavailable_reason(int64_t device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("no usable CUDA device (") + cudaGetErrorString(err) + ")";
  }
  if (device < 0 || device >= count) {
    return "CUDA device index " + std::to_string(device) + " is out of range (" + std::to_string(count) + " devices)";
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, shaping_kernel<true, true, true>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    cudaDeviceProp prop;
    std::string cc = "?";
    if (cudaGetDeviceProperties(&prop, static_cast<int>(device)) == cudaSuccess) {
      cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
    } else {
      (void)cudaGetLastError();
    }
    return "flowkern._C has no kernel for this GPU (compute capability " + cc +
           "; it is built for FLOWKERN_CUDA_ARCHS, default 8.0;9.0): " + cudaGetErrorString(err);
  }
  return "";
}

int64_t max_smem_row(int64_t device) {
  TORCH_CHECK_VALUE(device >= 0, kPrefix, "max_smem_row: device must be a CUDA device index, got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return smem_row_limit();
}

}  // namespace flowkern
