// C++ glue over libtorch for what tch does not expose. Compiled by build.rs against the venv's torch headers.
#include <ATen/DeviceAccelerator.h>
#include <cstdint>

// Peak bytes allocated / reserved by the caching allocator since the last reset (torch.cuda.max_memory_*).
extern "C" void tg_memory_peaks(int device, int64_t* peak_allocated, int64_t* peak_reserved) {
  auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  constexpr size_t AGG = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  *peak_allocated = s.allocated_bytes[AGG].peak;
  *peak_reserved = s.reserved_bytes[AGG].peak;
}

extern "C" void tg_reset_memory_peaks(int device) {
  at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
}
