// Skipping CUDA tests where there is no usable device, naming the reason.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>

namespace relaykv::testing {

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

#define RELAYKV_SKIP_WITHOUT_CUDA_DEVICE()                                               \
  do {                                                                                   \
    const std::string relaykv_reason_ = ::relaykv::testing::NoCudaDeviceReason();        \
    if (!relaykv_reason_.empty()) GTEST_SKIP() << "no CUDA device: " << relaykv_reason_; \
  } while (0)
