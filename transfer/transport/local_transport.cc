#include "transfer/transport/local_transport.h"

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>

namespace relaykv {

struct LocalTransport::State {
  uint64_t id = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> notifications;
  // Live registrations: key -> (addr, length). Writes look the key up so a
  // stale descriptor (region unregistered) cannot reach freed memory.
  std::map<uint64_t, std::pair<uint64_t, uint64_t>> regions;
  uint64_t next_key = 1;
};

namespace {

constexpr char kAddrMagic[4] = {'R', 'K', 'V', 'L'};

struct Registry {
  std::mutex mu;
  std::unordered_map<uint64_t, std::weak_ptr<LocalTransport::State>> transports;
  uint64_t next_id = 1;
};
Registry& GlobalRegistry() {
  static Registry* r = new Registry();  // never destroyed: used from destructors
  return *r;
}

class DoneRequest final : public TransferRequest {
 public:
  explicit DoneRequest(Status s) : status_(std::move(s)) {}
  Status Wait(std::chrono::milliseconds) override { return status_; }
  bool Test() override { return true; }

 private:
  Status status_;
};

class LocalRegistration final : public MemoryRegistration {
 public:
  LocalRegistration(std::shared_ptr<LocalTransport::State> state, uint64_t key, void* addr,
                    size_t length, std::string desc)
      : MemoryRegistration(addr, length, MemoryKind::kHost, std::move(desc)),
        state_(std::move(state)),
        key_(key) {}
  ~LocalRegistration() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->regions.erase(key_);
  }

 private:
  std::shared_ptr<LocalTransport::State> state_;
  uint64_t key_;
};

class LocalEndpoint final : public Endpoint {
 public:
  explicit LocalEndpoint(std::weak_ptr<LocalTransport::State> peer) : peer_(std::move(peer)) {}

  Result<std::unique_ptr<TransferRequest>> Write(const void* local, size_t length,
                                                 const RemoteDescriptor& remote,
                                                 uint64_t offset) override {
    return Copy(const_cast<void*>(local), length, remote, offset, /*write=*/true);
  }
  Result<std::unique_ptr<TransferRequest>> Read(void* local, size_t length,
                                                const RemoteDescriptor& remote,
                                                uint64_t offset) override {
    return Copy(local, length, remote, offset, /*write=*/false);
  }
  Result<std::unique_ptr<TransferRequest>> Flush() override {
    if (!healthy()) return Unavailable("local peer transport is gone");
    return std::unique_ptr<TransferRequest>(new DoneRequest(Status::Ok()));
  }
  Result<std::unique_ptr<TransferRequest>> Notify(std::string_view message) override {
    if (message.size() > kMaxNotificationBytes) {
      return InvalidArgument("notification of " + std::to_string(message.size()) +
                             " bytes exceeds the " + std::to_string(kMaxNotificationBytes) +
                             "-byte limit");
    }
    auto peer = peer_.lock();
    if (!peer) return Unavailable("local peer transport is gone");
    {
      std::lock_guard<std::mutex> lock(peer->mu);
      peer->notifications.emplace_back(message);
    }
    peer->cv.notify_all();
    return std::unique_ptr<TransferRequest>(new DoneRequest(Status::Ok()));
  }
  bool healthy() const override { return !peer_.expired(); }

 private:
  Result<std::unique_ptr<TransferRequest>> Copy(void* local, size_t length,
                                                const RemoteDescriptor& remote, uint64_t offset,
                                                bool write) {
    if (remote.kind != MemoryKind::kHost) return Unimplemented("local transport: host memory only");
    if (local == nullptr && length > 0) return InvalidArgument("null local buffer");
    if (offset > remote.length || length > remote.length - offset) {
      return InvalidArgument("range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                             ") outside the " + std::to_string(remote.length) +
                             "-byte remote region");
    }
    if (remote.access_key.size() != sizeof(uint64_t)) {
      return InvalidArgument("local transport: access key is not a registration id");
    }
    uint64_t key;
    std::memcpy(&key, remote.access_key.data(), sizeof(key));
    auto peer = peer_.lock();
    if (!peer) return Unavailable("local peer transport is gone");
    // The lock keeps the region registered while the bytes move.
    std::lock_guard<std::mutex> lock(peer->mu);
    auto it = peer->regions.find(key);
    if (it == peer->regions.end() || it->second.first != remote.addr ||
        it->second.second != remote.length) {
      return NotFound("local transport: remote region is not registered (stale descriptor?)");
    }
    auto* base = reinterpret_cast<std::byte*>(remote.addr) + offset;
    if (length > 0) {
      if (write) {
        std::memmove(base, local, length);
      } else {
        std::memmove(local, base, length);
      }
    }
    return std::unique_ptr<TransferRequest>(new DoneRequest(Status::Ok()));
  }

  std::weak_ptr<LocalTransport::State> peer_;
};

}  // namespace

LocalTransport::LocalTransport() : state_(std::make_shared<State>()) {
  Registry& r = GlobalRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  state_->id = r.next_id++;
  r.transports[state_->id] = state_;
}

LocalTransport::~LocalTransport() {
  Registry& r = GlobalRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.transports.erase(state_->id);
}

Result<std::unique_ptr<MemoryRegistration>> LocalTransport::RegisterMemory(void* addr,
                                                                           size_t length,
                                                                           MemoryKind kind) {
  if (addr == nullptr || length == 0) return InvalidArgument("register: null address or length 0");
  if (kind != MemoryKind::kHost) return Unimplemented("local transport: host memory only");
  uint64_t key;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    key = state_->next_key++;
    state_->regions[key] = {reinterpret_cast<uint64_t>(addr), length};
  }
  RemoteDescriptor d;
  d.addr = reinterpret_cast<uint64_t>(addr);
  d.length = length;
  d.kind = kind;
  d.access_key.assign(reinterpret_cast<const char*>(&key), sizeof(key));
  return std::unique_ptr<MemoryRegistration>(
      new LocalRegistration(state_, key, addr, length, d.Pack()));
}

Result<std::string> LocalTransport::LocalAddress() {
  std::string out(kAddrMagic, 4);
  out.append(reinterpret_cast<const char*>(&state_->id), sizeof(state_->id));
  return out;
}

Result<std::unique_ptr<Endpoint>> LocalTransport::Connect(std::string_view peer_address) {
  if (peer_address.size() != 4 + sizeof(uint64_t) ||
      std::memcmp(peer_address.data(), kAddrMagic, 4) != 0) {
    return InvalidArgument("local transport: not a local transport address");
  }
  uint64_t id;
  std::memcpy(&id, peer_address.data() + 4, sizeof(id));
  Registry& r = GlobalRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.transports.find(id);
  if (it == r.transports.end() || it->second.expired()) {
    return Unavailable("local transport " + std::to_string(id) + " does not exist");
  }
  return std::unique_ptr<Endpoint>(new LocalEndpoint(it->second));
}

Result<std::string> LocalTransport::WaitNotification(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(state_->mu);
  if (!state_->cv.wait_for(lock, timeout, [&] { return !state_->notifications.empty(); })) {
    return DeadlineExceeded("no notification within " + std::to_string(timeout.count()) + " ms");
  }
  std::string msg = std::move(state_->notifications.front());
  state_->notifications.pop_front();
  return msg;
}

}  // namespace relaykv
