#pragma once
// Large CPU outputs on transparent huge pages, recycled. A fresh multi-megabyte tensor from the default allocator
// is mmapped 4 KiB page by page, and first-touch page faults plus the kernel's zeroing can cost more than the
// kernel that fills it (a 37 MB RLT output: ~20 ms of faults for ~3 ms of work on the build machine). Blocks here
// are 2 MiB-aligned with MADV_HUGEPAGE (honoured where THP is in "madvise" or "always" mode), and freed blocks are
// kept for reuse up to kMaxCachedBytes, so a training loop that tokenizes every step stops faulting after the first.
#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <mutex>

namespace vidfast {

class HugePageBlocks {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kMaxCachedBytes = size_t(256) << 20;

  struct Block {
    void* base = nullptr;  // what mmap returned
    size_t mapped = 0;     // bytes mapped at base
    void* data = nullptr;  // 2 MiB-aligned start inside the mapping
    size_t capacity = 0;   // usable bytes from data
  };

  static HugePageBlocks& instance() {
    static auto* blocks = new HugePageBlocks();  // never destroyed: tensors may outlive static destruction
    return *blocks;
  }

  // A block of at least `bytes`, reusing a cached one of up to twice that size.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = cached_.lower_bound(bytes);
      if (it != cached_.end() && it->first <= 2 * bytes) {
        Block b = it->second;
        cached_bytes_ -= b.capacity;
        cached_.erase(it);
        return b;
      }
    }
    Block b;
    b.capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    b.mapped = b.capacity + kHugePage;  // room to align the start
    b.base = mmap(nullptr, b.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b.base == MAP_FAILED) return Block{};
    const uintptr_t aligned = (reinterpret_cast<uintptr_t>(b.base) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
    b.data = reinterpret_cast<void*>(aligned);
    madvise(b.data, b.capacity, MADV_HUGEPAGE);
    return b;
  }

  void give_back(const Block& b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + b.capacity <= kMaxCachedBytes) {
        cached_.emplace(b.capacity, b);
        cached_bytes_ += b.capacity;
        return;
      }
    }
    munmap(b.base, b.mapped);
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, Block> cached_;
  size_t cached_bytes_ = 0;
};

// at::empty for CPU outputs of a few MiB and more; smaller ones go to the default allocator.
inline at::Tensor empty_cpu_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (bytes < HugePageBlocks::kHugePage) return at::empty(sizes, options);
  const HugePageBlocks::Block block = HugePageBlocks::instance().take(bytes);
  if (block.data == nullptr) return at::empty(sizes, options);
  return at::from_blob(
      block.data, sizes, [block](void*) { HugePageBlocks::instance().give_back(block); }, options.device(at::kCPU));
}

// The first `rows` rows of `buffer` as a tensor of its own, whose storage reports only their bytes: outputs whose
// length depends on the data are written into a buffer sized for the bound, then trimmed without a copy. The
// whole buffer is freed with the tensor.
inline at::Tensor first_rows(const at::Tensor& buffer, int64_t rows) {
  TORCH_INTERNAL_ASSERT(buffer.is_contiguous() && buffer.storage_offset() == 0 && rows <= buffer.size(0));
  std::vector<int64_t> sizes = buffer.sizes().vec();
  sizes[0] = rows;
  c10::Storage storage = buffer.storage();
  storage.set_nbytes(size_t(rows * buffer.stride(0)) * buffer.element_size());
  return at::empty({0}, buffer.options()).set_(storage, 0, sizes, {});
}

}  // namespace vidfast
