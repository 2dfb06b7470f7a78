// Transport bandwidth and fixed cost between two processes on loopback.
//
// For 1 MB, 16 MB and 256 MB it reports, in one run:
//   raw memcpy (one process)       the ceiling for any same-host copy;
//   raw TCP socket copy            a child process receives the bytes over
//                                  127.0.0.1 and acks; the ceiling for tcp;
//   UCX write / read, tcp and shm  one-sided put/get into a transport_peer
//                                  child's registered region;
// and, per UCX wire, the fixed cost of a 4 KB record: write + notify
// (flush, active message) + the peer's reply, median µs.
// Where a CUDA device is usable (built with CUDA), also device-to-device
// cudaMemcpy, UCX between GPU buffers of two processes (cuda_ipc, and tcp
// staged through cuda_copy) and NCCL between them (built with NCCL), in the
// same run.
// One JSON object per line on stdout.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "baselines.h"
#include "bench_util.h"
#include "tests/cpp/transport/peer_util.h"
#include "transfer/store/segment_allocator.h"
#include "transfer/transport/ucx_transport.h"
#ifdef RELAYKV_BENCH_NCCL
#include "transfer/transport/nccl_transport.h"
#endif
#ifdef RELAYKV_BENCH_CUDA
#include <cuda_runtime.h>
#endif

namespace relaykv {
namespace {

using bench::JsonLine;
using bench::Median;
using bench::NowSeconds;

using bench::kMax;
using bench::kSizes;
using bench::Reps;

void Report(const char* path, const char* op, uint64_t size, const std::vector<double>& secs) {
  bench::Report("transport", path, op, size, secs);
}

// The write/read sweep (writes flushed, so the time covers delivery) and the
// fixed cost of a small record (4 KB write + notify + the peer's answer, which
// `await_reply` waits for) over one connected endpoint.
void MeasureEndpoint(const char* path, Endpoint& ep, const RemoteDescriptor& remote, uint8_t* buf,
                     std::chrono::seconds timeout, const std::function<Status()>& await_reply) {
  for (const char* op : {"write", "read"}) {
    const bool write = std::strcmp(op, "write") == 0;
    for (uint64_t size : kSizes) {
      std::vector<double> t;
      for (int i = 0; i < Reps(size) + 1; ++i) {
        const double t0 = NowSeconds();
        auto req = write ? ep.Write(buf, size, remote, 0) : ep.Read(buf, size, remote, 0);
        Status s = req.ok() ? (*req)->Wait(timeout) : req.status();
        if (s.ok() && write) {
          // A put is complete locally before it is visible remotely.
          auto f = ep.Flush();
          s = f.ok() ? (*f)->Wait(timeout) : f.status();
        }
        if (!s.ok()) {
          JsonLine("transport").Str("path", path).Str("op", op).Str("error", s.ToString()).Print();
          return;
        }
        if (i > 0) t.push_back(NowSeconds() - t0);
      }
      Report(path, op, size, t);
    }
  }
  std::vector<double> rtt;
  for (int i = 0; i < 300; ++i) {
    const double t0 = NowSeconds();
    auto w = ep.Write(buf, 4096, remote, 0);
    auto n = ep.Notify("ping");
    Status s = w.ok() ? (*w)->Wait(timeout) : w.status();
    if (s.ok()) s = n.ok() ? (*n)->Wait(timeout) : n.status();
    if (s.ok()) s = await_reply();
    if (!s.ok()) {
      JsonLine("transport").Str("path", path).Str("op", "rtt").Str("error", s.ToString()).Print();
      return;
    }
    if (i >= 20) rtt.push_back(NowSeconds() - t0);
  }
  JsonLine("transport")
      .Str("path", path)
      .Str("op", "write_notify_rtt")
      .Int("bytes", 4096)
      .Int("reps", static_cast<int64_t>(rtt.size()))
      .Num("p50_us", Median(rtt) * 1e6)
      .Num("p90_us", bench::Percentile(rtt, 0.9) * 1e6)
      .Print();
}

// The first failed set-up step, printed as the path's error row; true when one failed.
bool SetupFailed(const char* path, std::initializer_list<Status> steps) {
  for (const Status& s : steps) {
    if (!s.ok()) {
      JsonLine("transport").Str("path", path).Str("error", s.ToString()).Print();
      return true;
    }
  }
  return false;
}

// `buf` is kMax bytes of `kind` memory; `peer_memory` is "host" or "cuda".
void BenchUcx(const char* path, const char* tls, bool peer_errors, uint8_t* buf,
              MemoryKind kind = MemoryKind::kHost, const char* peer_memory = "host") {
  auto options = UcxTransportOptions::WithTls(tls, peer_errors);
  // A region UCX allocated in the peer is copied through a mapping.
  options.map_peer_memory = std::strcmp(peer_memory, "ucx") == 0;
  auto transport = UcxTransport::Create(options);
  auto peer =
      testing::PeerProcess::Spawn(RELAYKV_TRANSPORT_PEER, tls, kMax, peer_errors, peer_memory);
  if (SetupFailed(path, {transport.status(), peer.status()})) return;
  (void)(*peer)->Send(*(*transport)->LocalAddress());
  auto remote = RemoteDescriptor::Parse((*peer)->descriptor());
  auto ep = (*transport)->Connect((*peer)->address());
  if (SetupFailed(path, {remote.status(), ep.status()})) return;
  // Registering the source too lets UCX use zero-copy without a lookup per op.
  auto local_reg = (*transport)->RegisterMemory(buf, kMax, kind);
  const auto timeout = std::chrono::seconds(30);
  MeasureEndpoint(path, **ep, *remote, buf, timeout, [&]() -> Status {
    auto pong = (*transport)->WaitNotification(timeout);
    return pong.ok() ? Status::Ok() : pong.status();
  });
  ep->reset();
}

#ifdef RELAYKV_BENCH_NCCL
// NCCL between two processes on GPU buffers. With one GPU the peer claims
// another NCCL_HOSTID, so this measures NCCL's socket transport through host
// memory (what two hosts without GPUDirect RDMA get), not NVLink.
void BenchNccl(uint8_t* buf) {
  const char* path = "nccl_gpu";
  ::setenv("NCCL_HOSTID", "relaykv-bench-initiator", 1);
  ::setenv("NCCL_NET", "Socket", 1);
  auto transport = NcclTransport::Create();
  auto peer = testing::PeerProcess::SpawnWith(RELAYKV_NCCL_PEER,
                                              {std::to_string(kMax), "relaykv-bench-target"});
  if (SetupFailed(path, {transport.status(), peer.status()})) return;
  auto remote = RemoteDescriptor::Parse((*peer)->descriptor());
  auto ep = (*transport)->Connect((*peer)->address());
  if (SetupFailed(path, {remote.status(), ep.status()})) return;
  const auto timeout = std::chrono::seconds(60);
  MeasureEndpoint(path, **ep, *remote, buf, timeout, [&]() -> Status {
    auto pong = (*peer)->Recv(timeout);  // the NCCL peer answers over its socket
    return pong.ok() ? Status::Ok() : pong.status();
  });
}
#endif

#ifdef RELAYKV_BENCH_CUDA
// The GPU rows: d2d cudaMemcpy (the ceiling) and UCX GPU-to-GPU between two
// processes. Nothing is printed without a device (the CPU rows stand alone).
void BenchCuda() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    JsonLine("transport").Str("path", "cuda").Str("skipped", "no CUDA device").Print();
    return;
  }
  uint8_t *src = nullptr, *dst = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&src), kMax) != cudaSuccess ||
      cudaMalloc(reinterpret_cast<void**>(&dst), kMax) != cudaSuccess) {
    JsonLine("transport").Str("path", "cuda").Str("error", "cudaMalloc failed").Print();
    cudaFree(src);
    return;
  }
  cudaMemset(src, 0x5a, kMax);
  for (uint64_t size : kSizes) {
    std::vector<double> t;
    for (int i = 0; i < Reps(size) + 1; ++i) {
      const double t0 = NowSeconds();
      cudaMemcpy(dst, src, size, cudaMemcpyDeviceToDevice);
      cudaDeviceSynchronize();
      if (i > 0) t.push_back(NowSeconds() - t0);
    }
    Report("cuda_memcpy_d2d", "copy", size, t);
  }
  cudaFree(dst);
  BenchUcx("ucx_cuda_ipc", "cuda_ipc,cuda_copy,tcp", false, src, MemoryKind::kCudaDevice, "cuda");
  BenchUcx("ucx_tcp_cuda_staged", "tcp,cuda_copy", true, src, MemoryKind::kCudaDevice, "cuda");
#ifdef RELAYKV_BENCH_NCCL
  BenchNccl(src);
#endif
  cudaFree(src);
}
#endif

}  // namespace
}  // namespace relaykv

int main() {
  using namespace relaykv;  // NOLINT
  auto src = bench::Buffer(kMax);
  auto dst = bench::Buffer(kMax);
  testing::FillPattern(reinterpret_cast<uint8_t*>(src->base()), kMax, 0, 1);
  bench::BenchMemcpy("transport", reinterpret_cast<uint8_t*>(src->base()),
                     reinterpret_cast<uint8_t*>(dst->base()));
  bench::BenchRawTcp("transport", reinterpret_cast<uint8_t*>(src->base()));
  dst.reset();
  BenchUcx("ucx_tcp", "tcp", true, reinterpret_cast<uint8_t*>(src->base()));
  BenchUcx("ucx_shm", "posix,sysv,cma", false, reinterpret_cast<uint8_t*>(src->base()));
  // The peer's region allocated by UCX (sysv/posix shared memory): mapped here.
  BenchUcx("ucx_shm_mapped", "posix,sysv,cma", false, reinterpret_cast<uint8_t*>(src->base()),
           MemoryKind::kHost, "ucx");
#ifdef RELAYKV_BENCH_CUDA
  src.reset();
  BenchCuda();
#endif
  return 0;
}
