// vtprune compaction kernels: the prefill compaction of a batch in one launch.
//
// compact_batch: for every output slot (b, j) of index (B, L') int64 (-1 marks a padding slot)
//   out[b, j, :]        = x[b, index[b, j], :]          (zeros for padding)
//   mask[b, j]          = index[b, j] >= 0              (int64, the new attention mask)
//   pos_out[p, b, j]    = pos[p, b, index[b, j]]        (0 for padding; P = 1 for 1-D ids, 3 for M-RoPE)
// gather_seq: the rows only (the same kernel without mask and positions).
// One thread block per output row; rows are copied with 16-byte vector loads when the row size
// and both pointers allow it, byte by byte otherwise; thread 0 of the block writes the mask and the
// positions. This is the CUDA form of vtprune.compaction.compact_batch / gather_seq (dim=1), which
// stay the reference implementation and the CPU path; the result is a pure copy, bit-identical.
//
// Build modes:
//   -DVTPRUNE_TORCH_EXTENSION   torch extension (vtprune.cuda.load builds it where a GPU is)
//   -DVTPRUNE_STANDALONE_TEST   a self-checking executable (main() compares with a CPU gather)
//   neither                     the kernels only (what CI compiles with plain nvcc)

#include <cstdint>
#include <cuda_runtime.h>

namespace vtprune {

template <typename Vec>
__global__ void compact_kernel(const Vec* __restrict__ src, const int64_t* __restrict__ index, Vec* __restrict__ out,
                               int64_t* __restrict__ mask, const int64_t* __restrict__ pos_in,
                               int64_t* __restrict__ pos_out, int64_t n_pos, int64_t batch, int64_t seq_in,
                               int64_t seq_out, int64_t row_vecs) {
  const int64_t row = blockIdx.x;  // b * seq_out + j
  const int64_t b = row / seq_out;
  const int64_t j = row - b * seq_out;
  const int64_t picked = index[row];
  if (threadIdx.x == 0) {
    if (mask != nullptr) mask[row] = picked >= 0 ? 1 : 0;
    for (int64_t p = 0; p < n_pos; ++p) {
      pos_out[(p * batch + b) * seq_out + j] = picked < 0 ? 0 : pos_in[(p * batch + b) * seq_in + picked];
    }
  }
  Vec* dst = out + row * row_vecs;
  if (picked < 0) {
    for (int64_t k = threadIdx.x; k < row_vecs; k += blockDim.x) dst[k] = Vec{};
    return;
  }
  const Vec* from = src + (b * seq_in + picked) * row_vecs;
  for (int64_t k = threadIdx.x; k < row_vecs; k += blockDim.x) dst[k] = from[k];
}

// One launch for the whole batch. mask / pos_in / pos_out may be null (n_pos = 0).
// Returns the CUDA error of the launch.
inline cudaError_t compact(const void* src, const int64_t* index, void* out, int64_t* mask, const int64_t* pos_in,
                           int64_t* pos_out, int64_t n_pos, int64_t batch, int64_t seq_in, int64_t seq_out,
                           int64_t row_bytes, cudaStream_t stream) {
  const int64_t rows = batch * seq_out;
  if (rows == 0) return cudaSuccess;
  const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned16) {
    const int64_t vecs = row_bytes / 16;
    const int threads = static_cast<int>(vecs < 256 ? (vecs < 32 ? 32 : vecs) : 256);
    compact_kernel<uint4><<<rows, threads, 0, stream>>>(static_cast<const uint4*>(src), index,
                                                        static_cast<uint4*>(out), mask, pos_in, pos_out, n_pos,
                                                        batch, seq_in, seq_out, vecs);
  } else {
    const int threads = static_cast<int>(row_bytes < 256 ? (row_bytes < 32 ? 32 : row_bytes) : 256);
    compact_kernel<uint8_t><<<rows, threads, 0, stream>>>(static_cast<const uint8_t*>(src), index,
                                                          static_cast<uint8_t*>(out), mask, pos_in, pos_out, n_pos,
                                                          batch, seq_in, seq_out, row_bytes);
  }
  return cudaGetLastError();
}

}  // namespace vtprune

#ifdef VTPRUNE_TORCH_EXTENSION
#include <torch/extension.h>

#include <tuple>

static void check_inputs(const torch::Tensor& x, const torch::Tensor& index) {
  TORCH_CHECK(x.is_cuda() && index.is_cuda(), "vtprune compaction: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 3, "vtprune compaction: x must be (batch, length, features), got ", x.dim(), " dims");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == torch::kLong,
              "vtprune compaction: index must be (batch, L') int64");
  TORCH_CHECK(index.size(0) == x.size(0), "vtprune compaction: batch sizes differ: ", index.size(0), " vs ",
              x.size(0));
}

// `stream` is the caller's current CUDA stream as an integer (torch.cuda.current_stream().cuda_stream), and the
// caller makes x's device current: the extension then needs no CUDA headers of torch (it compiles against a
// CPU build of torch too, which is how CI checks it).
std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>> compact_batch_cuda(
    torch::Tensor x, torch::Tensor index, c10::optional<torch::Tensor> positions, int64_t stream) {
  check_inputs(x, index);
  auto src = x.contiguous();
  auto idx = index.contiguous();
  const int64_t batch = x.size(0), seq_in = x.size(1), seq_out = idx.size(1);
  auto out = torch::empty({batch, seq_out, x.size(2)}, x.options());
  auto mask = torch::empty({batch, seq_out}, idx.options());
  const int64_t* pos_in = nullptr;
  int64_t* pos_out_ptr = nullptr;
  int64_t n_pos = 0;
  c10::optional<torch::Tensor> pos_out;
  torch::Tensor pos;
  if (positions.has_value()) {
    pos = positions->contiguous();
    TORCH_CHECK(pos.is_cuda() && pos.dim() == 3 && pos.scalar_type() == torch::kLong && pos.size(1) == batch &&
                    pos.size(2) == seq_in,
                "vtprune compaction: positions must be (P, batch, length) int64 on the same device");
    n_pos = pos.size(0);
    pos_out = torch::empty({n_pos, batch, seq_out}, pos.options());
    pos_in = pos.data_ptr<int64_t>();
    pos_out_ptr = pos_out->data_ptr<int64_t>();
  }
  auto err = vtprune::compact(src.data_ptr(), idx.data_ptr<int64_t>(), out.data_ptr(), mask.data_ptr<int64_t>(),
                              pos_in, pos_out_ptr, n_pos, batch, seq_in, seq_out, x.size(2) * x.element_size(),
                              reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "vtprune compaction: launch failed: ", cudaGetErrorString(err));
  return {out, mask, pos_out};
}

torch::Tensor gather_seq_cuda(torch::Tensor x, torch::Tensor index, int64_t stream) {
  check_inputs(x, index);
  auto src = x.contiguous();
  auto idx = index.contiguous();
  auto out = torch::empty({x.size(0), idx.size(1), x.size(2)}, x.options());
  auto err = vtprune::compact(src.data_ptr(), idx.data_ptr<int64_t>(), out.data_ptr(), nullptr, nullptr, nullptr, 0,
                              x.size(0), x.size(1), idx.size(1), x.size(2) * x.element_size(),
                              reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "vtprune compaction: launch failed: ", cudaGetErrorString(err));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_seq", &gather_seq_cuda, "gather kept rows (B, L, D) -> (B, L', D); index -1 gives zeros",
        pybind11::arg("x"), pybind11::arg("index"), pybind11::arg("stream"));
  m.def("compact_batch", &compact_batch_cuda, "rows, new mask and kept positions (P, B, L) in one launch",
        pybind11::arg("x"), pybind11::arg("index"), pybind11::arg("positions"), pybind11::arg("stream"));
}
#endif

#ifdef VTPRUNE_STANDALONE_TEST
#include <cstdio>
#include <vector>

int main() {
  const int64_t B = 2, L = 7, Lp = 4, D = 12, P = 3;  // 48-byte rows: the vector path; M-RoPE positions
  std::vector<float> x(B * L * D);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
  std::vector<int64_t> pos(P * B * L);
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<int64_t>(1000 + i);
  std::vector<int64_t> index = {0, 2, 5, 6, -1, -1, 1, 3};
  float *dx, *dout;
  int64_t *didx, *dmask, *dpos, *dpos_out;
  cudaMalloc(&dx, x.size() * sizeof(float));
  cudaMalloc(&dout, B * Lp * D * sizeof(float));
  cudaMalloc(&didx, index.size() * sizeof(int64_t));
  cudaMalloc(&dmask, B * Lp * sizeof(int64_t));
  cudaMalloc(&dpos, pos.size() * sizeof(int64_t));
  cudaMalloc(&dpos_out, P * B * Lp * sizeof(int64_t));
  cudaMemcpy(dx, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(didx, index.data(), index.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  cudaMemcpy(dpos, pos.data(), pos.size() * sizeof(int64_t), cudaMemcpyHostToDevice);
  if (vtprune::compact(dx, didx, dout, dmask, dpos, dpos_out, P, B, L, Lp, D * sizeof(float), 0) != cudaSuccess) {
    std::printf("launch failed (no GPU?)\n");
    return 2;
  }
  std::vector<float> out(B * Lp * D);
  std::vector<int64_t> mask(B * Lp), pos_out(P * B * Lp);
  cudaMemcpy(out.data(), dout, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(mask.data(), dmask, mask.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
  cudaMemcpy(pos_out.data(), dpos_out, pos_out.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Lp; ++j) {
      const int64_t p = index[b * Lp + j];
      if (mask[b * Lp + j] != (p >= 0 ? 1 : 0)) {
        std::printf("mask mismatch at b=%ld j=%ld\n", (long)b, (long)j);
        return 1;
      }
      for (int64_t r = 0; r < P; ++r) {
        const int64_t want = p < 0 ? 0 : pos[(r * B + b) * L + p];
        if (pos_out[(r * B + b) * Lp + j] != want) {
          std::printf("position mismatch at r=%ld b=%ld j=%ld\n", (long)r, (long)b, (long)j);
          return 1;
        }
      }
      for (int64_t k = 0; k < D; ++k) {
        const float want = p < 0 ? 0.f : x[(b * L + p) * D + k];
        if (out[(b * Lp + j) * D + k] != want) {
          std::printf("mismatch at b=%ld j=%ld k=%ld\n", (long)b, (long)j, (long)k);
          return 1;
        }
      }
    }
  std::printf("ok\n");
  return 0;
}
#endif
