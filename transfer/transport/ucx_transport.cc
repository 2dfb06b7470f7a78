#include "transfer/transport/ucx_transport.h"

#include <ucp/api/ucp.h>

#include <sys/mman.h>
#include <sys/shm.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace relaykv {
namespace {

constexpr char kAddrMagic[4] = {'R', 'K', 'V', 'U'};
constexpr unsigned kNotifyAmId = 0x524b;  // "RK": one id for all relaykv notifications

// RAII for every UCX handle: each deleter is the one matching call.
struct ContextDeleter {
  void operator()(ucp_context_h c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker_h w) const { ucp_worker_destroy(w); }
};
struct ConfigDeleter {
  void operator()(ucp_config_t* c) const { ucp_config_release(c); }
};
struct RkeyDeleter {
  void operator()(ucp_rkey_h r) const { ucp_rkey_destroy(r); }
};
using ContextPtr = std::unique_ptr<std::remove_pointer_t<ucp_context_h>, ContextDeleter>;
using WorkerPtr = std::unique_ptr<std::remove_pointer_t<ucp_worker_h>, WorkerDeleter>;
using ConfigPtr = std::unique_ptr<ucp_config_t, ConfigDeleter>;
using RkeyPtr = std::unique_ptr<std::remove_pointer_t<ucp_rkey_h>, RkeyDeleter>;

Status FromUcs(ucs_status_t s, std::string_view what) {
  std::string msg = std::string(what) + ": " + ucs_status_string(s);
  switch (s) {
    case UCS_OK:
      return Status::Ok();
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_CANCELED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_TIMED_OUT:
      return Unavailable(std::move(msg));
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return ResourceExhausted(std::move(msg));
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return InvalidArgument(std::move(msg));
    case UCS_ERR_UNSUPPORTED:
      return Unimplemented(std::move(msg));
    default:
      return Internal(std::move(msg));
  }
}

// Called inside ucp_worker_progress on the driving thread.
ucs_status_t OnNotification(void* arg, const void* /*header*/, size_t /*header_length*/, void* data,
                            size_t length, const ucp_am_recv_param_t* param);

}  // namespace

struct UcxTransport::Core {
  // Member order is destruction order in reverse: the worker goes before the
  // context that created it.
  ContextPtr context;
  // Requests dropped while UCX may still read a buffer they own (a
  // notification's payload): freed once UCX is done, or, if the transport
  // goes first, after the worker (declared after this, so destroyed before).
  std::vector<std::pair<void*, std::shared_ptr<void>>> orphans;
  WorkerPtr worker;
  std::deque<std::string> notifications;
  std::chrono::milliseconds close_timeout{1000};
  bool peer_error_handling = true;
  bool map_peer_memory = false;
  uint64_t mapped_ops = 0;  // Read/Write served through a mapping

  // One progress call; spins a little, then yields so that two processes on
  // a small machine do not starve each other while both wait.
  bool ProgressOnce(unsigned& idle) {
    if (ucp_worker_progress(worker.get()) != 0) {
      idle = 0;
      if (!orphans.empty()) ReapOrphans();
      return true;
    }
    if (++idle > 64) std::this_thread::yield();
    return false;
  }
  void ReapOrphans() {
    std::erase_if(orphans, [](const auto& o) {
      if (ucp_request_check_status(o.first) == UCS_INPROGRESS) return false;
      ucp_request_free(o.first);
      return true;
    });
  }
};

namespace {

using Core = UcxTransport::Core;

ucs_status_t OnNotification(void* arg, const void*, size_t, void* data, size_t length,
                            const ucp_am_recv_param_t* param) {
  // Senders always use eager; a rendezvous notification is not ours: drop it
  // (returning UCS_OK tells UCX the data is not kept).
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) return UCS_OK;
  static_cast<Core*>(arg)->notifications.emplace_back(static_cast<const char*>(data), length);
  return UCS_OK;
}

// One sysv shared-memory attachment of this process: [lo, hi) and its shmid
// (the inode column of /proc/self/maps), for read-write shared mappings.
struct SysvMapping {
  uintptr_t lo = 0, hi = 0;
  int shmid = -1;
  bool operator==(const SysvMapping&) const = default;
};

std::vector<SysvMapping> SysvMappings() {
  std::vector<SysvMapping> out;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find(" /SYSV") == std::string::npos) continue;
    SysvMapping m;
    char perms[5] = {0};
    unsigned long inode = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %4s %*s %*s %lu", &m.lo, &m.hi, perms,
                    &inode) == 4 &&
        perms[0] == 'r' && perms[1] == 'w' && perms[3] == 's') {
      m.shmid = static_cast<int>(inode);
      out.push_back(m);
    }
  }
  return out;
}

// The endpoint's connection, shared by the Endpoint and its in-flight
// notifications. Closes the ucp endpoint when the last holder lets go.
struct EpHandle {
  std::shared_ptr<Core> core;
  ucp_ep_h ep = nullptr;
  // Set by UCX's error callback; every later operation fails with it.
  ucs_status_t error = UCS_OK;
  // An unpacked key and, with map_peer_memory, the sysv segment unpacking
  // it attached here (hi == 0: none, or not known for sure).
  struct RemoteKey {
    RkeyPtr rkey;
    uintptr_t seg_lo = 0, seg_hi = 0;
  };
  // By packed bytes; destroyed before the endpoint closes.
  std::unordered_map<std::string, RemoteKey> rkeys;

  static void OnError(void* arg, ucp_ep_h, ucs_status_t status) {
    static_cast<EpHandle*>(arg)->error = status;
  }

  ~EpHandle() {
    rkeys.clear();
    if (ep == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    // A failed endpoint cannot flush; a healthy one closes gracefully so the
    // peer sees an orderly disconnect rather than an error.
    p.flags = error != UCS_OK ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) {
      const auto deadline = std::chrono::steady_clock::now() + core->close_timeout;
      unsigned idle = 0;
      while (ucp_request_check_status(r) == UCS_INPROGRESS &&
             std::chrono::steady_clock::now() < deadline) {
        core->ProgressOnce(idle);
      }
      // Still pending after the deadline: UCX releases it when it finishes
      // or when the worker is destroyed.
      ucp_request_free(r);
    }
  }

  Status Check() const {
    if (error != UCS_OK) return FromUcs(error, "ucx endpoint failed");
    return Status::Ok();
  }

  // Where `remote` is mapped in this process, or null when it is not.
  // ucp_rkey_ptr only adds an offset, so the translated range must lie inside
  // the very segment that unpacking this key attached: a descriptor with a
  // shifted address, a longer length or another segment's key (forged or
  // stale) is never copied through, it goes to UCX.
  static uint8_t* MappedBase(const RemoteKey& key, const RemoteDescriptor& remote) {
    void* p = nullptr;
    if (key.seg_hi == 0 || ucp_rkey_ptr(key.rkey.get(), remote.addr, &p) != UCS_OK) return nullptr;
    const auto lo = reinterpret_cast<uintptr_t>(p);
    if (lo < key.seg_lo || lo >= key.seg_hi || remote.length > key.seg_hi - lo) return nullptr;
    return static_cast<uint8_t*>(p);
  }

  Result<const RemoteKey*> Rkey(const std::string& packed) {
    auto it = rkeys.find(packed);
    if (it != rkeys.end()) return &it->second;
    ucp_rkey_h raw = nullptr;
    std::vector<SysvMapping> before;
    if (core->map_peer_memory) before = SysvMappings();
    ucs_status_t s = ucp_ep_rkey_unpack(ep, packed.data(), &raw);
    if (s != UCS_OK) {
      // Garbage key bytes are the caller's input, not an internal fault.
      return InvalidArgument(std::string("ucx: cannot unpack remote key: ") + ucs_status_string(s));
    }
    RemoteKey key{RkeyPtr(raw)};
    if (core->map_peer_memory) {
      // Another thread of this process may attach a segment at the same
      // time; then which one is this key's is unknown and nothing is mapped.
      std::vector<SysvMapping> added;
      for (const auto& m : SysvMappings()) {
        if (std::find(before.begin(), before.end(), m) == before.end()) added.push_back(m);
      }
      if (added.size() == 1) {
        key.seg_lo = added[0].lo;
        key.seg_hi = added[0].hi;
        // Our page tables for the segment start empty: without this, every
        // 4 KB page a copy first touches is a page fault here (measured: a
        // 256 MB put into fresh store space at 1.9 GB/s instead of 9).
        // Costs page-table memory for the whole segment; EINVAL (kernels
        // before 5.14) leaves the faults to happen lazily.
        (void)::madvise(reinterpret_cast<void*>(key.seg_lo), key.seg_hi - key.seg_lo,
                        MADV_POPULATE_WRITE);
      }
    }
    return &rkeys.emplace(packed, std::move(key)).first->second;
  }
};

// One ucp request, optionally followed by a second one issued when the first
// succeeds (Notify: flush, then the active message).
class UcxRequest final : public TransferRequest {
 public:
  // `keep` (e.g. a notification's payload) lives until UCX is done with the
  // request, even when this object is destroyed first.
  UcxRequest(std::shared_ptr<Core> core, std::shared_ptr<EpHandle> ep, ucs_status_ptr_t req,
             std::string what, std::function<ucs_status_ptr_t()> then = nullptr,
             std::shared_ptr<void> keep = nullptr)
      : core_(std::move(core)),
        ep_(std::move(ep)),
        req_(req),
        what_(std::move(what)),
        then_(std::move(then)),
        keep_(std::move(keep)) {
    Absorb();
  }
  ~UcxRequest() override {
    if (!UCS_PTR_IS_PTR(req_)) return;
    if (keep_ && ucp_request_check_status(req_) == UCS_INPROGRESS) {
      core_->orphans.emplace_back(req_, std::move(keep_));
      return;
    }
    // Not waited for: UCX frees it when it completes (or the worker dies).
    ucp_request_free(req_);
  }

  bool Test() override {
    if (!done_) {
      unsigned idle = 0;
      core_->ProgressOnce(idle);
      Poll();
    }
    return done_;
  }

  Status Wait(std::chrono::milliseconds timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    unsigned idle = 0;
    while (!Poll()) {
      if (std::chrono::steady_clock::now() >= deadline) {
        return DeadlineExceeded(what_ + " not complete after " + std::to_string(timeout.count()) +
                                " ms");
      }
      core_->ProgressOnce(idle);
    }
    return status_;
  }

 private:
  // Turns an immediate completion (NULL or error pointer) into a result.
  void Absorb() {
    while (!done_ && !UCS_PTR_IS_PTR(req_)) {
      Finish(UCS_PTR_STATUS(req_));
    }
  }
  void Finish(ucs_status_t s) {
    req_ = nullptr;
    if (s == UCS_OK && then_) {
      auto next = std::move(then_);
      then_ = nullptr;
      req_ = next();
      return;  // Absorb/Poll continue with the second stage
    }
    done_ = true;
    if (s != UCS_OK) {
      status_ = FromUcs(s, what_);
      // The endpoint error says why (e.g. connection reset) when the request
      // only says "canceled".
      if (ep_ && ep_->error != UCS_OK && ep_->error != s) {
        status_ = FromUcs(ep_->error, what_ + " (endpoint failed)");
      }
    }
  }
  bool Poll() {
    if (done_) return true;
    if (UCS_PTR_IS_PTR(req_)) {
      ucs_status_t s = ucp_request_check_status(req_);
      if (s == UCS_INPROGRESS) return false;
      ucp_request_free(req_);
      Finish(s);
    }
    Absorb();
    return done_;
  }

  std::shared_ptr<Core> core_;
  std::shared_ptr<EpHandle> ep_;
  ucs_status_ptr_t req_;
  std::string what_;
  std::function<ucs_status_ptr_t()> then_;
  std::shared_ptr<void> keep_;
  bool done_ = false;
  Status status_;
};

class UcxRegistration final : public MemoryRegistration {
 public:
  UcxRegistration(std::shared_ptr<Core> core, ucp_mem_h memh, void* addr, size_t length,
                  MemoryKind kind, std::string desc)
      : MemoryRegistration(addr, length, kind, std::move(desc)),
        core_(std::move(core)),
        memh_(memh) {}
  ~UcxRegistration() override { ucp_mem_unmap(core_->context.get(), memh_); }

 private:
  std::shared_ptr<Core> core_;
  ucp_mem_h memh_;
};

class UcxEndpoint final : public Endpoint {
 public:
  explicit UcxEndpoint(std::shared_ptr<EpHandle> h) : h_(std::move(h)) {}

  Result<std::unique_ptr<TransferRequest>> Write(const void* local, size_t length,
                                                 const RemoteDescriptor& remote,
                                                 uint64_t offset) override {
    return Rma(const_cast<void*>(local), length, remote, offset, /*write=*/true);
  }
  Result<std::unique_ptr<TransferRequest>> Read(void* local, size_t length,
                                                const RemoteDescriptor& remote,
                                                uint64_t offset) override {
    return Rma(local, length, remote, offset, /*write=*/false);
  }
  Result<std::unique_ptr<TransferRequest>> Flush() override {
    RELAYKV_RETURN_IF_ERROR(h_->Check());
    ucp_request_param_t p{};
    return Make(ucp_ep_flush_nbx(h_->ep, &p), "ucx flush");
  }
  Result<std::unique_ptr<TransferRequest>> Notify(std::string_view message) override {
    if (message.size() > kMaxNotificationBytes) {
      return InvalidArgument("notification of " + std::to_string(message.size()) +
                             " bytes exceeds the " + std::to_string(kMaxNotificationBytes) +
                             "-byte limit");
    }
    RELAYKV_RETURN_IF_ERROR(h_->Check());
    // RMA and active messages may travel on different lanes, so the message
    // could overtake the data: flush first, send once the flush completed.
    auto payload = std::make_shared<std::string>(message);
    auto h = h_;
    // UCX may read the payload after the send was issued (queued behind a
    // connection being set up): the request keeps it (see UcxRequest).
    auto send = [h, payload]() -> ucs_status_ptr_t {
      if (h->error != UCS_OK) return UCS_STATUS_PTR(h->error);
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_EAGER;
      return ucp_am_send_nbx(h->ep, kNotifyAmId, nullptr, 0, payload->data(), payload->size(), &p);
    };
    ucp_request_param_t p{};
    return Make(ucp_ep_flush_nbx(h_->ep, &p), "ucx notify", std::move(send), payload);
  }
  bool healthy() const override { return h_->error == UCS_OK; }

 private:
  Result<std::unique_ptr<TransferRequest>> Make(ucs_status_ptr_t r, std::string what,
                                                std::function<ucs_status_ptr_t()> then = nullptr,
                                                std::shared_ptr<void> keep = nullptr) {
    return std::unique_ptr<TransferRequest>(
        new UcxRequest(h_->core, h_, r, std::move(what), std::move(then), std::move(keep)));
  }

  Result<std::unique_ptr<TransferRequest>> Rma(void* local, size_t length,
                                               const RemoteDescriptor& remote, uint64_t offset,
                                               bool write) {
    if (local == nullptr && length > 0) return InvalidArgument("null local buffer");
    if (offset > remote.length || length > remote.length - offset) {
      return InvalidArgument("range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                             ") outside the " + std::to_string(remote.length) +
                             "-byte remote region");
    }
    RELAYKV_RETURN_IF_ERROR(h_->Check());
    RELAYKV_ASSIGN_OR_RETURN(const EpHandle::RemoteKey* key, h_->Rkey(remote.access_key));
    ucp_rkey_h rkey = key->rkey.get();
    ucp_request_param_t p{};
    const uint64_t raddr = remote.addr + offset;
    uint8_t* mapped = nullptr;
    if (remote.kind == MemoryKind::kHost && length > 0 &&
        (mapped = EpHandle::MappedBase(*key, remote)) != nullptr) {
      mapped += offset;
      // The peer's region is mapped here (shared memory UCX allocated on this
      // host): a plain copy, complete on return. UCX would pick cma for large
      // transfers instead, a syscall that pins the peer's pages each time.
      // Ordering against the peer comes from what tells it (or us) that the
      // bytes are there: a UCX message (its shared-memory FIFO fences) or a
      // control-socket syscall. The fences only keep the compiler from
      // moving the copy across the call that follows or precedes it.
      if (write) {
        std::memcpy(mapped, local, length);
        std::atomic_thread_fence(std::memory_order_release);
      } else {
        std::atomic_thread_fence(std::memory_order_acquire);
        std::memcpy(local, mapped, length);
      }
      ++h_->core->mapped_ops;
      return Make(UCS_STATUS_PTR(UCS_OK), write ? "ucx write (mapped)" : "ucx read (mapped)");
    }
    if (write) {
      return Make(ucp_put_nbx(h_->ep, local, length, raddr, rkey, &p), "ucx write");
    }
    return Make(ucp_get_nbx(h_->ep, local, length, raddr, rkey, &p), "ucx read");
  }

  std::shared_ptr<EpHandle> h_;
};

}  // namespace

Result<std::unique_ptr<UcxTransport>> UcxTransport::Create(const UcxTransportOptions& options) {
  ucp_config_t* raw_config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &raw_config);
  if (s != UCS_OK) return FromUcs(s, "ucp_config_read");
  ConfigPtr config(raw_config);
  if (!options.tls.empty()) {
    s = ucp_config_modify(config.get(), "TLS", options.tls.c_str());
    if (s != UCS_OK) return InvalidArgument("ucx: bad tls '" + options.tls + "'");
  }
  if (!options.tcp_segment_size.empty()) {
    for (const char* key : {"TCP_TX_SEG_SIZE", "TCP_RX_SEG_SIZE"}) {
      if (std::getenv((std::string("UCX_") + key).c_str()) != nullptr) continue;
      s = ucp_config_modify(config.get(), key, options.tcp_segment_size.c_str());
      if (s != UCS_OK) {
        return InvalidArgument("ucx: bad tcp_segment_size '" + options.tcp_segment_size + "'");
      }
    }
  }
  for (const auto& [key, value] : options.config) {
    s = ucp_config_modify(config.get(), key.c_str(), value.c_str());
    if (s != UCS_OK) return InvalidArgument("ucx: bad config " + key + "=" + value);
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM;
  if (options.wakeup) params.features |= UCP_FEATURE_WAKEUP;
  ucp_context_h ctx = nullptr;
  s = ucp_init(&params, config.get(), &ctx);
  if (s != UCS_OK) return FromUcs(s, "ucp_init (tls '" + options.tls + "')");
  auto core = std::make_shared<Core>();
  core->context.reset(ctx);
  core->close_timeout = options.close_timeout;
  core->map_peer_memory = options.map_peer_memory;
  core->peer_error_handling = options.peer_error_handling;

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // one driving thread (see transport.h)
  ucp_worker_h worker = nullptr;
  s = ucp_worker_create(ctx, &wp, &worker);
  if (s != UCS_OK) return FromUcs(s, "ucp_worker_create");
  core->worker.reset(worker);

  ucp_am_handler_param_t ap{};
  ap.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG;
  ap.id = kNotifyAmId;
  ap.cb = OnNotification;
  ap.arg = core.get();
  s = ucp_worker_set_am_recv_handler(worker, &ap);
  if (s != UCS_OK) return FromUcs(s, "ucp_worker_set_am_recv_handler");
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(core)));
}

UcxTransport::~UcxTransport() = default;

namespace {

// ucp_mem_map, then the packed descriptor peers need; the registration
// unmaps (and frees what UCX allocated) when destroyed.
Result<std::unique_ptr<MemoryRegistration>> MapMemory(
    const std::shared_ptr<UcxTransport::Core>& core, const ucp_mem_map_params_t& params,
    MemoryKind kind) {
  ucp_mem_h memh = nullptr;
  ucs_status_t s = ucp_mem_map(core->context.get(), &params, &memh);
  if (s != UCS_OK) {
    return FromUcs(s, std::string("ucp_mem_map (") + std::string(MemoryKindName(kind)) + ")");
  }
  // Wrap at once so a failure below still unmaps (and frees what UCX allocated).
  auto reg_guard =
      std::unique_ptr<std::remove_pointer_t<ucp_mem_h>, std::function<void(ucp_mem_h)>>(
          memh, [ctx = core->context.get()](ucp_mem_h m) { ucp_mem_unmap(ctx, m); });
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  s = ucp_mem_query(memh, &attr);
  if (s != UCS_OK) return FromUcs(s, "ucp_mem_query");
  // UCX may round an allocation up; the region is what was asked for.
  const size_t length = params.length;
  if (attr.length < length) return Internal("ucp_mem_map: mapped less than asked");
  void* rkey_buf = nullptr;
  size_t rkey_len = 0;
  s = ucp_rkey_pack(core->context.get(), memh, &rkey_buf, &rkey_len);
  if (s != UCS_OK) return FromUcs(s, "ucp_rkey_pack");
  RemoteDescriptor d;
  d.addr = reinterpret_cast<uint64_t>(attr.address);
  d.length = length;
  d.kind = kind;
  d.access_key.assign(static_cast<const char*>(rkey_buf), rkey_len);
  ucp_rkey_buffer_release(rkey_buf);
  return std::unique_ptr<MemoryRegistration>(
      new UcxRegistration(core, reg_guard.release(), attr.address, length, kind, d.Pack()));
}

}  // namespace

Result<std::unique_ptr<MemoryRegistration>> UcxTransport::RegisterMemory(void* addr, size_t length,
                                                                         MemoryKind kind) {
  if (addr == nullptr || length == 0) return InvalidArgument("register: null address or length 0");
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                  UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = addr;
  mp.length = length;
  mp.memory_type = kind == MemoryKind::kCudaDevice ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  return MapMemory(core_, mp, kind);
}

namespace {

// UCX creates sysv segments for the owner and its group (mode 0660), and any
// process in the same IPC namespace can find their ids: the bytes would be
// open to the whole group, past whatever token guards them. Only this user
// may attach.
Status RestrictSysvToOwner(const void* addr) {
  const auto p = reinterpret_cast<uintptr_t>(addr);
  for (const SysvMapping& m : SysvMappings()) {
    if (p < m.lo || p >= m.hi) continue;
    shmid_ds ds{};
    if (::shmctl(m.shmid, IPC_STAT, &ds) != 0) {
      return Internal(std::string("shmctl(IPC_STAT): ") + std::strerror(errno));
    }
    ds.shm_perm.mode = (ds.shm_perm.mode & ~0777u) | 0600u;
    if (::shmctl(m.shmid, IPC_SET, &ds) != 0) {
      return Internal(std::string("shmctl(IPC_SET): ") + std::strerror(errno));
    }
    return Status::Ok();
  }
  return Status::Ok();  // not sysv shared memory (UCX fell back to another allocator)
}

}  // namespace

Result<std::unique_ptr<MemoryRegistration>> UcxTransport::AllocateMemory(size_t length) {
  if (length == 0) return InvalidArgument("allocate: length 0");
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                  UCP_MEM_MAP_PARAM_FIELD_FLAGS | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  mp.address = nullptr;
  mp.length = length;
  mp.flags = UCP_MEM_MAP_ALLOCATE;
  mp.memory_type = UCS_MEMORY_TYPE_HOST;
  RELAYKV_ASSIGN_OR_RETURN(auto reg, MapMemory(core_, mp, MemoryKind::kHost));
  RELAYKV_RETURN_IF_ERROR(RestrictSysvToOwner(reg->addr()).WithContext("allocate"));
  return reg;
}

uint64_t UcxTransport::mapped_operations() const { return core_->mapped_ops; }

Result<std::string> UcxTransport::LocalAddress() {
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  ucs_status_t s = ucp_worker_get_address(core_->worker.get(), &addr, &len);
  if (s != UCS_OK) return FromUcs(s, "ucp_worker_get_address");
  std::string out(kAddrMagic, 4);
  const uint32_t n = static_cast<uint32_t>(len);
  out.append(reinterpret_cast<const char*>(&n), sizeof(n));
  out.append(reinterpret_cast<const char*>(addr), len);
  ucp_worker_release_address(core_->worker.get(), addr);
  return out;
}

Result<std::unique_ptr<Endpoint>> UcxTransport::Connect(std::string_view peer_address) {
  // Check our own framing first: UCX trusts address bytes and may crash on garbage.
  if (peer_address.size() < 8 || std::memcmp(peer_address.data(), kAddrMagic, 4) != 0) {
    return InvalidArgument("ucx: not a UcxTransport address blob");
  }
  uint32_t n;
  std::memcpy(&n, peer_address.data() + 4, sizeof(n));
  if (n == 0 || peer_address.size() != 8 + static_cast<size_t>(n)) {
    return InvalidArgument("ucx: address blob length mismatch");
  }
  auto h = std::make_shared<EpHandle>();
  h->core = core_;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(peer_address.data() + 8);
  // A dead peer must fail requests, not leave them pending forever (see
  // UcxTransportOptions::peer_error_handling for the cost).
  ep.err_mode =
      core_->peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  ep.err_handler.cb = &EpHandle::OnError;
  ep.err_handler.arg = h.get();
  ucs_status_t s = ucp_ep_create(core_->worker.get(), &ep, &h->ep);
  if (s != UCS_OK) {
    h->ep = nullptr;
    return FromUcs(s, "ucp_ep_create");
  }
  return std::unique_ptr<Endpoint>(new UcxEndpoint(std::move(h)));
}

Result<std::string> UcxTransport::WaitNotification(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  unsigned idle = 0;
  while (core_->notifications.empty()) {
    if (std::chrono::steady_clock::now() >= deadline) {
      return DeadlineExceeded("no notification within " + std::to_string(timeout.count()) + " ms");
    }
    core_->ProgressOnce(idle);
  }
  std::string msg = std::move(core_->notifications.front());
  core_->notifications.pop_front();
  return msg;
}

bool UcxTransport::Progress() { return ucp_worker_progress(core_->worker.get()) != 0; }

Result<int> UcxTransport::EventFd() {
  int fd = -1;
  const ucs_status_t s = ucp_worker_get_efd(core_->worker.get(), &fd);
  if (s != UCS_OK) return FromUcs(s, "ucp_worker_get_efd (was the transport created with wakeup?)");
  return fd;
}

bool UcxTransport::Arm() { return ucp_worker_arm(core_->worker.get()) == UCS_OK; }

}  // namespace relaykv
