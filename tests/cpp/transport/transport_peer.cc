// transport_peer <fd> <tls> <bytes> peer|nopeer [host|ucx|cuda]: the target side
// of the two-process transport tests and benchmark. Registers a region of <bytes>
// bytes (host memory; host memory UCX allocates with "ucx"; GPU memory with
// "cuda") filled with PatternByte(i, 7), hands its address
// and descriptor to the parent over the socket <fd>, receives the parent's address, then serves: it
// drives UCX progress (tcp RMA is emulated by the target's CPU) and answers notifications over UCX:
//   "verify <offset> <length> <seed>" -> "ok" or "bad <index>"
//   "ping"                             -> "pong"
// It exits when the parent sends "exit" or closes the socket.
#include <poll.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <vector>

#include "tests/cpp/transport/peer_util.h"
#include "transfer/store/segment_allocator.h"
#include "transfer/transport/ucx_transport.h"
#ifdef RELAYKV_PEER_CUDA
#include <cuda_runtime.h>
#endif

using namespace relaykv;  // NOLINT: a tiny executable
using relaykv::testing::FailToParent;
using relaykv::testing::RecvFrame;
using relaykv::testing::SendFrame;

namespace {

// The served bytes: a host segment, host memory UCX allocated (and
// registered), or a cudaMalloc'd buffer that is filled and checked through a
// host copy (only the peer's CPU looks at it this way; the transport moves it
// as device memory).
class Region {
 public:
  static Result<Region> Create(uint64_t bytes, const std::string& memory, UcxTransport& transport) {
    Region r;
    r.bytes_ = bytes;
    if (memory == "host") {
      RELAYKV_ASSIGN_OR_RETURN(r.segment_,
                               Segment::Create(bytes, 4096, MemoryKind::kHost, /*populate=*/true));
      r.base_ = reinterpret_cast<uint8_t*>(r.segment_->base());
      return r;
    }
    if (memory == "ucx") {
      RELAYKV_ASSIGN_OR_RETURN(r.allocation_, transport.AllocateMemory(bytes));
      r.base_ = static_cast<uint8_t*>(r.allocation_->addr());
      return r;
    }
    if (memory != "cuda") return InvalidArgument("memory: host, ucx or cuda, not " + memory);
#ifdef RELAYKV_PEER_CUDA
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, bytes); e != cudaSuccess) {
      return Unavailable(std::string("cudaMalloc: ") + cudaGetErrorString(e));
    }
    r.device_.reset(p);
    r.base_ = static_cast<uint8_t*>(p);
    return r;
#else
    return Unimplemented("transport_peer was built without CUDA");
#endif
  }
  uint8_t* base() const { return base_; }
  MemoryKind kind() const { return device_ ? MemoryKind::kCudaDevice : MemoryKind::kHost; }
  // The registration that came with the memory ("ucx"), else null.
  const MemoryRegistration* allocation() const { return allocation_.get(); }

  Status Fill(uint32_t seed) {
    if (!device_) {
      relaykv::testing::FillPattern(base_, bytes_, 0, seed);
      return Status::Ok();
    }
    std::vector<uint8_t> host(bytes_);
    relaykv::testing::FillPattern(host.data(), bytes_, 0, seed);
    RELAYKV_RETURN_IF_ERROR(Copy(base_, host.data(), bytes_));
    return Sync();
  }
  // Index of the first wrong byte in [off, off + len), or -1.
  Result<int64_t> Check(uint64_t off, uint64_t len, uint32_t seed) {
    if (!device_) return relaykv::testing::CheckPattern(base_ + off, len, off, seed);
    std::vector<uint8_t> host(len);
    RELAYKV_RETURN_IF_ERROR(Copy(host.data(), base_ + off, len));
    return relaykv::testing::CheckPattern(host.data(), len, off, seed);
  }

 private:
  static Status Copy(void* dst, const void* src, uint64_t n) {
#ifdef RELAYKV_PEER_CUDA
    if (cudaError_t e = cudaMemcpy(dst, src, n, cudaMemcpyDefault); e != cudaSuccess) {
      return Internal(std::string("cudaMemcpy: ") + cudaGetErrorString(e));
    }
    return Status::Ok();
#else
    (void)dst, (void)src, (void)n;
    return Unimplemented("transport_peer was built without CUDA");
#endif
  }
  // UCX reads and writes device memory on its own non-blocking streams.
  static Status Sync() {
#ifdef RELAYKV_PEER_CUDA
    if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
      return Internal(std::string("cudaDeviceSynchronize: ") + cudaGetErrorString(e));
    }
#endif
    return Status::Ok();
  }
  struct CudaFree {
    void operator()(void* p) const {
#ifdef RELAYKV_PEER_CUDA
      cudaFree(p);
#else
      (void)p;
#endif
    }
  };

  uint64_t bytes_ = 0;
  std::unique_ptr<Segment> segment_;
  std::unique_ptr<MemoryRegistration> allocation_;
  std::unique_ptr<void, CudaFree> device_;
  uint8_t* base_ = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: %s <fd> <tls> <bytes> peer|nopeer [host|ucx|cuda]\n", argv[0]);
    return 64;
  }
  const std::string memory = argc == 6 ? argv[5] : "host";
  const bool cuda = memory == "cuda";
  const int fd = std::atoi(argv[1]);
  const std::string tls = argv[2];
  const uint64_t bytes = std::strtoull(argv[3], nullptr, 10);

#ifdef RELAYKV_PEER_CUDA
  // A current context before UCX starts, so its CUDA transports see the
  // device the parent uses.
  if (cuda && (cudaSetDevice(0) != cudaSuccess || cudaFree(nullptr) != cudaSuccess)) {
    return FailToParent(fd, Unavailable("no usable CUDA device"));
  }
#endif
  auto transport =
      UcxTransport::Create(UcxTransportOptions::WithTls(tls, std::string(argv[4]) == "peer"));
  if (!transport.ok()) return FailToParent(fd, transport.status());
  auto region = Region::Create(bytes, memory, **transport);
  if (!region.ok()) return FailToParent(fd, region.status());
  if (Status s = region->Fill(7); !s.ok()) return FailToParent(fd, s);
  std::unique_ptr<MemoryRegistration> own;
  const MemoryRegistration* reg = region->allocation();
  if (reg == nullptr) {
    auto r = (*transport)->RegisterMemory(region->base(), bytes, region->kind());
    if (!r.ok()) return FailToParent(fd, r.status());
    own = std::move(*r);
    reg = own.get();
  }
  auto addr = (*transport)->LocalAddress();
  if (!addr.ok()) return FailToParent(fd, addr.status());
  if (!SendFrame(fd, "OK").ok() || !SendFrame(fd, *addr).ok() ||
      !SendFrame(fd, reg->descriptor()).ok()) {
    return 3;
  }
  auto parent_addr = RecvFrame(fd, std::chrono::seconds(10));
  if (!parent_addr.ok()) return 4;
  std::unique_ptr<Endpoint> back;  // connected on the first reply

  while (true) {
    if (!(*transport)->Progress()) std::this_thread::yield();
    auto note = (*transport)->WaitNotification(std::chrono::milliseconds(0));
    if (note.ok()) {
      std::string reply;
      if (*note == "ping") {
        reply = "pong";
      } else {
        std::istringstream in(*note);
        std::string verb;
        uint64_t off = 0, len = 0;
        uint32_t seed = 0;
        in >> verb >> off >> len >> seed;
        if (verb != "verify" || off + len > bytes) {
          reply = "bad request: " + *note;
        } else {
          auto bad = region->Check(off, len, seed);
          reply = !bad.ok()  ? "error " + bad.status().ToString()
                  : *bad < 0 ? "ok"
                             : "bad " + std::to_string(*bad);
        }
      }
      if (!back) {
        auto ep = (*transport)->Connect(*parent_addr);
        if (!ep.ok()) return 5;
        back = std::move(*ep);
      }
      auto req = back->Notify(reply);
      if (!req.ok() || !(*req)->Wait(std::chrono::seconds(5)).ok()) return 6;
      continue;
    }
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, 0) > 0) {
      auto cmd = RecvFrame(fd, std::chrono::seconds(1));
      if (!cmd.ok() || *cmd == "exit") break;
    }
  }
  return 0;
}
