// Skipping CUDA tests where there is no usable device, naming the reason.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace relaykv::testing {

struct CudaFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<uint8_t, CudaFree>;

// Device bytes [0, n) at `dev` := `fill(host, n)` applied to a host copy, then
// a device-wide synchronise: a copy from pageable memory may return before it
// landed, and transports read on their own streams.
template <typename Fill>
cudaError_t FillDevice(uint8_t* dev, uint64_t n, Fill fill) {
  std::vector<uint8_t> host(n);
  fill(host.data(), n);
  if (cudaError_t e = cudaMemcpy(dev, host.data(), n, cudaMemcpyHostToDevice); e != cudaSuccess) {
    return e;
  }
  return cudaDeviceSynchronize();
}

// Empty when a device is usable, else why not (the runtime's words).
inline std::string NoCudaDeviceReason() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not left behind as the "last error" of a later check
    return cudaGetErrorString(err);
  }
  return n == 0 ? "cudaGetDeviceCount found 0 devices" : "";
}

}  // namespace relaykv::testing

#define ASSERT_CUDA_OK(expr)                                                  \
  do {                                                                        \
    const cudaError_t relaykv_err_ = (expr);                                  \
    ASSERT_EQ(relaykv_err_, cudaSuccess) << cudaGetErrorString(relaykv_err_); \
  } while (0)

#define RELAYKV_SKIP_WITHOUT_CUDA_DEVICE()                                               \
  do {                                                                                   \
    const std::string relaykv_reason_ = ::relaykv::testing::NoCudaDeviceReason();        \
    if (!relaykv_reason_.empty()) GTEST_SKIP() << "no CUDA device: " << relaykv_reason_; \
  } while (0)
