// Fused multimodal embedding: text rows gathered from the embedding table, placeholder rows
// copied from the multimodal items (read in place through a pointer table), in one launch.
//
// Registered as torch.ops.ifk.embed_scatter_cuda; the Python launcher in
// triton_kernels/multimodal/scatter.py validates every argument before calling it.
// Rows are copied as raw bytes (out, table and items share one dtype), 16 bytes at a time
// when every address and the row size allow it.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = kThreads * 16 * 2;  // one CTA copies up to 8 KiB of a row

// Copies bytes [chunk * kChunkBytes, ...) of one row in units of sizeof(Unit).
template <typename Unit>
__device__ __forceinline__ void copy_row(char* dst, const char* src, int64_t row_bytes, int64_t chunk) {
  const int64_t begin = chunk * kChunkBytes / sizeof(Unit);
  const int64_t end = min(row_bytes, (chunk + 1) * kChunkBytes) / sizeof(Unit);
  auto* d = reinterpret_cast<Unit*>(dst);
  const auto* s = reinterpret_cast<const Unit*>(src);
#pragma unroll 2
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) d[i] = s[i];
}

// Zeroes bytes [chunk * kChunkBytes, ...) of one row, 2 bytes at a time (every dtype here is >= 2 bytes).
__device__ __forceinline__ void zero_row(char* dst, int64_t row_bytes, int64_t chunk) {
  const int64_t begin = chunk * kChunkBytes / 2;
  const int64_t end = min(row_bytes, (chunk + 1) * kChunkBytes) / 2;
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) d[i] = 0;
}

// Widest unit (16, 8, 4 or 2 bytes) that divides every address and the row size.
__device__ __forceinline__ int copy_unit(const char* dst, const char* src, int64_t row_bytes) {
  const auto bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                    static_cast<uintptr_t>(row_bytes);
  return (bits & 15) == 0 ? 16 : (bits & 7) == 0 ? 8 : (bits & 3) == 0 ? 4 : 2;
}

template <typename Index>
__global__ void embed_scatter_kernel(
    char* __restrict__ out, int64_t out_stride_bytes,   // [T, H]
    const Index* __restrict__ ids,                      // [T] or nullptr (merge: text rows untouched)
    const char* __restrict__ weight, int64_t w_stride_bytes, int64_t vocab,  // [V, H] or nullptr
    const bool* __restrict__ mask,                      // [T]
    const int32_t* __restrict__ rank,                   // [T] inclusive cumsum of mask
    const char* __restrict__ single_item, int64_t single_stride_bytes,  // [rows, H] or nullptr
    const int64_t* __restrict__ table, int64_t n_items, // [3, n_items + 1]: ptrs, starts, strides
    int64_t total_rows, int64_t row_bytes, int64_t elem_bytes) {
  const int64_t t = blockIdx.x;
  const char* src = nullptr;
  if (mask[t]) {
    const int64_t row = static_cast<int64_t>(rank[t]) - 1;
    if (row >= total_rows) return;  // unchecked capture with surplus placeholders
    if (single_item != nullptr) {
      src = single_item + row * single_stride_bytes;
    } else {
      const int64_t* starts = table + (n_items + 1);
      int64_t lo = 0, hi = n_items;
      while (hi - lo > 1) {  // last item whose first row is <= row
        const int64_t mid = (lo + hi) / 2;
        if (starts[mid] <= row) lo = mid; else hi = mid;
      }
      const int64_t stride_bytes = table[2 * (n_items + 1) + lo] * elem_bytes;
      src = reinterpret_cast<const char*>(table[lo]) + (row - starts[lo]) * stride_bytes;
    }
  } else if (ids != nullptr) {
    const int64_t token = static_cast<int64_t>(ids[t]);
    if (token < 0 || token >= vocab) {  // unchecked data: an out-of-vocab id gives a zero row
      zero_row(out + t * out_stride_bytes, row_bytes, blockIdx.y);
      return;
    }
    src = weight + token * w_stride_bytes;
  } else {
    return;
  }
  char* dst = out + t * out_stride_bytes;
  switch (copy_unit(dst, src, row_bytes)) {
    case 16: copy_row<uint4>(dst, src, row_bytes, blockIdx.y); break;
    case 8: copy_row<uint2>(dst, src, row_bytes, blockIdx.y); break;
    case 4: copy_row<uint32_t>(dst, src, row_bytes, blockIdx.y); break;
    default: copy_row<uint16_t>(dst, src, row_bytes, blockIdx.y); break;
  }
}

void embed_scatter_cuda(const at::Tensor& out, const std::optional<at::Tensor>& input_ids,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& single_item,
                        const std::optional<at::Tensor>& table, const at::Tensor& mask, const at::Tensor& rank,
                        int64_t total_rows) {
  TORCH_CHECK(out.is_cuda() && out.dim() == 2 && out.stride(1) == 1, "out must be a CUDA [T, H] tensor, unit stride in H");
  TORCH_CHECK(mask.scalar_type() == at::kBool && rank.scalar_type() == at::kInt, "mask must be bool, rank int32");
  TORCH_CHECK(single_item.has_value() || table.has_value() || total_rows == 0, "items missing");
  const int64_t num_tokens = out.size(0);
  if (num_tokens == 0 || out.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t elem = out.element_size();
  const int64_t row_bytes = out.size(1) * elem;
  const dim3 grid(num_tokens, (row_bytes + kChunkBytes - 1) / kChunkBytes);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const char* w = weight ? static_cast<const char*>(weight->data_ptr()) : nullptr;
  const int64_t w_stride = weight ? weight->stride(0) * elem : 0;
  const int64_t vocab = weight ? weight->size(0) : 0;
  const char* single = single_item ? static_cast<const char*>(single_item->data_ptr()) : nullptr;
  const int64_t single_stride = single_item ? single_item->stride(0) * elem : 0;
  const int64_t* tab = table ? table->data_ptr<int64_t>() : nullptr;
  const int64_t n_items = table ? table->size(1) - 1 : 1;
  auto launch = [&](auto* ids) {
    embed_scatter_kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<char*>(out.data_ptr()), out.stride(0) * elem, ids, w, w_stride, vocab, mask.data_ptr<bool>(),
        rank.data_ptr<int32_t>(), single, single_stride, tab, n_items, total_rows, row_bytes, elem);
  };
  if (!input_ids.has_value()) {
    launch(static_cast<const int64_t*>(nullptr));
  } else if (input_ids->scalar_type() == at::kInt) {
    launch(input_ids->data_ptr<int32_t>());
  } else {
    launch(input_ids->data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ifk, m) {
  m.def(
      "embed_scatter_cuda(Tensor(a!) out, Tensor? input_ids, Tensor? weight, Tensor? single_item, "
      "Tensor? table, Tensor mask, Tensor rank, int total_rows) -> ()");
}

TORCH_LIBRARY_IMPL(ifk, CUDA, m) { m.impl("embed_scatter_cuda", &embed_scatter_cuda); }
