#pragma once
// Large CPU outputs on transparent huge pages. A fresh multi-megabyte tensor from the default allocator is mmapped
// 4 KiB page by page, and first-touch page faults can cost more than the kernel that fills it (a 37 MB RLT output:
// ~20 ms of faults for ~3 ms of work on the build machine). Asking for huge pages (MADV_HUGEPAGE, honoured where
// THP is in "madvise" or "always" mode) cuts the faults 512-fold; elsewhere it is a plain mmap.
#include <ATen/ATen.h>
#include <sys/mman.h>

#include <cstdint>

namespace vidfast {

inline at::Tensor empty_cpu_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (bytes < kHugePage) return at::empty(sizes, options);
  const size_t mapped = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  // Over-map by one huge page so the data can start on a 2 MiB boundary.
  void* base = mmap(nullptr, mapped + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::empty(sizes, options);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  madvise(reinterpret_cast<void*>(aligned), mapped, MADV_HUGEPAGE);
  const size_t total = mapped + kHugePage;
  return at::from_blob(
      reinterpret_cast<void*>(aligned), sizes, [base, total](void*) { munmap(base, total); },
      options.device(at::kCPU));
}

}  // namespace vidfast
