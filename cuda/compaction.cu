// vtprune compaction kernel: gather the kept rows of a (B, L, D) tensor into (B, L', D).
//
// index is (B, L') int64; -1 marks a padding slot, which is written as zeros.
// One thread block per output row; rows are copied with 16-byte vector loads
// when the row size and both pointers allow it, element by element otherwise.
// This is the CUDA form of vtprune.compaction.gather_seq (dim=1), which stays
// the reference implementation and the CPU path.
//
// Build modes:
//   -DVTPRUNE_TORCH_EXTENSION   torch extension (vtprune.cuda.load builds it where a GPU is)
//   -DVTPRUNE_STANDALONE_TEST   a self-checking executable (main() compares with a CPU gather)
//   neither                     the kernels only (what CI compiles with plain nvcc)

#include <cstdint>
#include <cuda_runtime.h>

namespace vtprune {

template <typename Vec>
__global__ void gather_rows_kernel(const Vec* __restrict__ src, const int64_t* __restrict__ index,
                                   Vec* __restrict__ out, int64_t seq_in, int64_t seq_out, int64_t row_vecs) {
  const int64_t row = blockIdx.x;  // b * seq_out + j
  const int64_t b = row / seq_out;
  const int64_t picked = index[row];
  Vec* dst = out + row * row_vecs;
  if (picked < 0) {
    for (int64_t k = threadIdx.x; k < row_vecs; k += blockDim.x) {
      dst[k] = Vec{};
    }
    return;
  }
  const Vec* from = src + (b * seq_in + picked) * row_vecs;
  for (int64_t k = threadIdx.x; k < row_vecs; k += blockDim.x) {
    dst[k] = from[k];
  }
}

// Copies rows of `row_bytes` bytes. Returns the CUDA error of the launch.
inline cudaError_t gather_rows(const void* src, const int64_t* index, void* out, int64_t batch, int64_t seq_in,
                               int64_t seq_out, int64_t row_bytes, cudaStream_t stream) {
  const int64_t rows = batch * seq_out;
  if (rows == 0) return cudaSuccess;
  const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned16) {
    const int64_t vecs = row_bytes / 16;
    const int threads = static_cast<int>(vecs < 256 ? (vecs < 32 ? 32 : vecs) : 256);
    gather_rows_kernel<uint4><<<rows, threads, 0, stream>>>(static_cast<const uint4*>(src), index,
                                                           static_cast<uint4*>(out), seq_in, seq_out, vecs);
  } else {
    const int threads = static_cast<int>(row_bytes < 256 ? (row_bytes < 32 ? 32 : row_bytes) : 256);
    gather_rows_kernel<uint8_t><<<rows, threads, 0, stream>>>(static_cast<const uint8_t*>(src), index,
                                                             static_cast<uint8_t*>(out), seq_in, seq_out, row_bytes);
  }
  return cudaGetLastError();
}

}  // namespace vtprune

#ifdef VTPRUNE_TORCH_EXTENSION
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

torch::Tensor gather_seq_cuda(torch::Tensor x, torch::Tensor index) {
  TORCH_CHECK(x.is_cuda() && index.is_cuda(), "gather_seq_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 3, "gather_seq_cuda: x must be (batch, length, features), got ", x.dim(), " dims");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == torch::kLong, "gather_seq_cuda: index must be (batch, L') int64");
  TORCH_CHECK(index.size(0) == x.size(0), "gather_seq_cuda: batch sizes differ: ", index.size(0), " vs ", x.size(0));
  auto src = x.contiguous();
  auto idx = index.contiguous();
  auto out = torch::empty({x.size(0), idx.size(1), x.size(2)}, x.options());
  const int64_t row_bytes = x.size(2) * x.element_size();
  auto err = vtprune::gather_rows(src.data_ptr(), idx.data_ptr<int64_t>(), out.data_ptr(), x.size(0), x.size(1),
                                  idx.size(1), row_bytes, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gather_seq_cuda: launch failed: ", cudaGetErrorString(err));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_seq", &gather_seq_cuda, "gather kept rows (B, L, D) -> (B, L', D); index -1 gives zeros");
}
#endif

#ifdef VTPRUNE_STANDALONE_TEST
#include <cstdio>
#include <vector>

int main() {
  const int64_t B = 2, L = 7, Lp = 4, D = 12;  // 48-byte rows: the vector path
  std::vector<float> x(B * L * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  std::vector<int64_t> index = {0, 2, 5, 6, -1, -1, 1, 3};
  float *dx, *dout;
  int64_t* didx;
  cudaMalloc(&dx, x.size() * sizeof(float));
  cudaMalloc(&dout, B * Lp * D * sizeof(float));
  cudaMalloc(&didx, index.size() * sizeof(int64_t));
  cudaMemcpy(dx, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(didx, index.data(), index.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  if (vtprune::gather_rows(dx, didx, dout, B, L, Lp, D * sizeof(float), 0) != cudaSuccess) {
    std::printf("launch failed (no GPU?)\n");
    return 2;
  }
  std::vector<float> out(B * Lp * D);
  cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Lp; ++j)
      for (int64_t k = 0; k < D; ++k) {
        const int64_t p = index[b * Lp + j];
        const float want = p < 0 ? 0.f : x[(b * L + p) * D + k];
        if (out[(b * Lp + j) * D + k] != want) {
          std::printf("mismatch at b=%ld j=%ld k=%ld\n", (long)b, (long)j, (long)k);
          return 1;
        }
      }
  std::printf("ok\n");
  return 0;
}
#endif
