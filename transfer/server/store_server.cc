#include "transfer/server/store_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "transfer/common/net.h"
#include "transfer/directory/directory.h"
#include "transfer/record/record.h"
#include "transfer/server/protocol.h"
#include "transfer/transport/ucx_transport.h"

namespace relaykv {
namespace {

using Clock = std::chrono::steady_clock;
using wire::Op;

using net::ListenTcp;
using net::TokenEquals;
using net::UniqueFd;

// Records are kept in the embedded store under a hash of (namespace, id): ids
// are only unique within a namespace. The server also remembers the pair, so a
// hash collision is caught (NotFound), never served.
uint64_t InternalId(std::string_view ns, uint64_t id) { return XXH64(ns.data(), ns.size(), id); }

std::string RandomSuffix() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%012llx",
                static_cast<unsigned long long>(v & 0xffffffffffffULL));
  return buf;
}

struct PendingWrite {
  WriteHandle handle;
  std::string ns;
  uint64_t id = 0;
};

// Largest frame accepted before a connection presented the token.
constexpr uint32_t kMaxHelloFrameBytes = 64 * 1024;

// Received bytes not yet taken as frames. A receive goes straight into it,
// sized for the frame being read, without zero-filling or regrowing as it
// fills: a multi-MB inline record is copied once out of the socket.
class InBuffer {
 public:
  std::string_view view() const { return {data_.get(), size_}; }
  size_t size() const { return size_; }
  // At least `n` writable bytes after the contents.
  std::span<char> Spare(size_t n) {
    if (cap_ - size_ < n) {
      const size_t cap = std::max(size_ + n, cap_ * 2);
      auto grown = std::make_unique_for_overwrite<char[]>(cap);
      if (size_ > 0) std::memcpy(grown.get(), data_.get(), size_);
      data_ = std::move(grown);
      cap_ = cap;
    }
    return {data_.get() + size_, cap_ - size_};
  }
  void Commit(size_t n) { size_ += n; }
  void Consume(size_t n) {
    if (n == 0) return;
    std::memmove(data_.get(), data_.get() + n, size_ - n);
    size_ -= n;
  }
  void Clear() { Consume(size_); }

 private:
  // Kept once grown (at most a frame's worth per connection): freeing it
  // would make the next large frame fault in fresh pages, which measured
  // slower than the copy it saves.
  std::unique_ptr<char[]> data_;
  size_t size_ = 0, cap_ = 0;
};

struct Conn {
  UniqueFd fd;
  uint64_t serial = 0;  // fds are reused; completions find their connection by this
  bool http = false;
  // A seal waits for the directory to list the record before it is answered;
  // the connection's later requests wait behind it, so replies stay in order.
  bool awaiting_publish = false;
  bool authed = false;
  bool closing = false;  // close once `out` is flushed
  std::string client;
  // Bytes received and not yet taken as frames. Replies go out from
  // out[out_sent...]: consumed prefixes are dropped in one go, not per
  // partial send (a multi-MB inline record would be moved over and over).
  InBuffer in;
  std::string out;
  size_t out_sent = 0;
  bool out_pending() const { return out_sent < out.size(); }
  void Reply(std::string frame) {
    if (out.empty()) {
      out = std::move(frame);
    } else {
      out += frame;
    }
  }
  std::unordered_map<uint64_t, PendingWrite> writes;
  std::unordered_map<uint64_t, ReadLease> leases;
};

struct DirOp {
  // kSeal: verify and seal `write`, then publish it (payload checks are a pass
  // over the record, so they run here rather than on the event loop).
  enum class Kind { kPublish, kRemove, kSeal } kind;
  RecordEntry entry;
  uint64_t reply_to = 0;  // connection serial waiting on this publish; 0: none
  std::optional<PendingWrite> write;
};

struct SealCompletion {
  uint64_t conn = 0;
  Status status;
};

}  // namespace

struct StoreServer::Impl {
  StoreServerOptions options;
  StoreServerInfo info;
  std::unique_ptr<EmbeddedStore> store;
  std::unique_ptr<UcxTransport> transport;
  std::vector<std::shared_ptr<MemoryRegistration>> registrations;
  std::string transport_address;
  std::unique_ptr<Directory> directory;

  UniqueFd listen_fd, metrics_fd, wake_fd;
  std::map<int, Conn> conns;
  uint64_t next_handle = 1;
  uint64_t next_serial = 1;
  std::thread loop_thread, dir_thread;
  std::atomic<bool> stop{false};
  bool started = false, shut_down = false;

  // What the directory should list: every sealed record, by internal id.
  // Guarded by published_mu (the removal listener may run on any thread).
  mutable std::mutex published_mu;
  std::unordered_map<uint64_t, RecordEntry> published;

  // Directory thread state.
  std::mutex dir_mu;
  std::condition_variable dir_cv;
  std::deque<DirOp> dir_ops;
  // Publish outcomes for waiting seals, handed back to the event loop.
  std::mutex done_mu;
  std::vector<SealCompletion> done;

  // Metrics (counters the store does not keep itself).
  std::atomic<uint64_t> auth_failures{0}, bytes_written{0}, bytes_read{0};
  std::atomic<uint64_t> directory_errors{0}, clients{0}, rejected_seals{0};
  std::atomic<bool> directory_up{false};

  void EnqueueDir(DirOp op) {
    {
      std::lock_guard<std::mutex> lock(dir_mu);
      dir_ops.push_back(std::move(op));
    }
    dir_cv.notify_one();
  }

  // Directory thread → event loop: answer the seal waiting on connection `conn`.
  void CompleteSeal(uint64_t conn, Status status) {
    if (conn == 0) return;
    {
      std::lock_guard<std::mutex> lock(done_mu);
      done.push_back({conn, std::move(status)});
    }
    const uint64_t one = 1;
    (void)!::write(wake_fd.get(), &one, sizeof(one));
  }
  void DeliverCompletions();

  // Whether the sealed record under `internal` is (ns, id): a hash collision
  // of two names must read as absent, never as the other record.
  bool Holds(uint64_t internal, std::string_view ns, uint64_t id) const {
    std::lock_guard<std::mutex> lock(published_mu);
    auto it = published.find(internal);
    return it != published.end() && it->second.ns == ns && it->second.id == id;
  }

  // Checks a written record (the directory must never point at garbage), seals
  // it and records what the directory should list. Any thread.
  Result<RecordEntry> VerifyAndSeal(PendingWrite pw) {
    ParseOptions parse;
    parse.verify_payload_checksums = options.verify_payload;
    auto view = ParseRecord(pw.handle.data(), pw.handle.size(), parse);
    if (!view.ok()) {
      ++rejected_seals;
      return view.status().WithContext("seal: record rejected");
    }
    if (RecordNamespaceKey(view->meta()) != pw.ns) {
      ++rejected_seals;
      return InvalidArgument("seal: the record's model, layout or tenant do not match namespace '" +
                             pw.ns + "'");
    }
    RecordEntry entry;
    entry.ns = pw.ns;
    entry.id = pw.id;
    entry.server = info.name;
    entry.length = pw.handle.size();
    entry.seq_begin = view->positions().empty() ? 0 : view->positions()[0];
    entry.tokens.assign(view->tokens().begin(), view->tokens().end());
    const uint64_t internal = pw.handle.id();
    const uint64_t bytes = pw.handle.size();
    {
      // Listed before Seal so a removal racing right after finds it.
      std::lock_guard<std::mutex> lock(published_mu);
      published[internal] = entry;
    }
    if (Status s = pw.handle.Seal(); !s.ok()) {
      std::lock_guard<std::mutex> lock(published_mu);
      published.erase(internal);
      return s;
    }
    bytes_written += bytes;
    return entry;
  }

  void OnRemoval(RecordId internal, RemovalReason) {
    RecordEntry entry;
    {
      std::lock_guard<std::mutex> lock(published_mu);
      auto it = published.find(internal);
      if (it == published.end()) return;
      entry = std::move(it->second);
      published.erase(it);
    }
    entry.tokens.clear();
    EnqueueDir({DirOp::Kind::kRemove, std::move(entry), 0, std::nullopt});
  }

  // Space for (ns, id) in the store (kReserve, kPut).
  Result<WriteHandle> Reserve(const std::string& ns, uint64_t id, uint64_t size, uint32_t ttl_ms) {
    const uint64_t internal = InternalId(ns, id);
    return ttl_ms == 0 ? store->Reserve(internal, size)
                       : store->Reserve(internal, size, std::chrono::milliseconds(ttl_ms));
  }
  // Verifies, seals and publishes a written record (kSeal, kPut). The reply
  // waits for the directory to list it (DeliverCompletions): a writer that
  // got OK can tell any reader to look it up. Empty: the reply comes later.
  std::string Seal(Conn& c, PendingWrite pw) {
    if (options.verify_payload) {
      c.awaiting_publish = true;
      EnqueueDir({DirOp::Kind::kSeal, RecordEntry{}, c.serial, std::move(pw)});
      return std::string();
    }
    auto entry = VerifyAndSeal(std::move(pw));
    if (!entry.ok()) return wire::ErrorReply(entry.status());
    c.awaiting_publish = true;
    EnqueueDir({DirOp::Kind::kPublish, std::move(*entry), c.serial, std::nullopt});
    return std::string();
  }

  // ---- event loop -------------------------------------------------------
  void Loop();
  void Accept(int lfd, bool http);
  void OnReadable(Conn& c);
  void ProcessInput(Conn& c);
  void Flush(Conn& c);
  void HandleFrame(Conn& c, std::string_view body);
  void HandleHttp(Conn& c);
  std::string Handle(Conn& c, Op op, wire::Reader& r);

  // ---- directory thread ---------------------------------------------------
  void DirectoryLoop();
  // Carries out queued directory operations in order; ones that could not
  // reach the directory go to `retry`.
  void HandleDirOps(std::deque<DirOp>& ops, std::deque<DirOp>& retry, bool& need_republish);
  ServerInfo AnnouncedInfo() const {
    ServerInfo s;
    s.name = info.name;
    s.control_address = info.control_address;
    s.transport = "ucx";
    s.transport_address = transport_address;
    s.capacity_bytes = store->capacity_bytes();
    s.bytes_used = store->Stats().bytes_used;
    return s;
  }
};

Status StoreServerOptions::Validate() const {
  RELAYKV_RETURN_IF_ERROR(store.Validate().WithContext("store"));
  if (name.empty()) return InvalidArgument("name: must not be empty");
  if (heartbeat.count() <= 0) return InvalidArgument("heartbeat: must be > 0 ms");
  if (token.empty() && !allow_unauthenticated) {
    return InvalidArgument(
        "token: a store server needs the deployment token (--token-file or RELAYKV_TOKEN); "
        "pass --allow-unauthenticated only on a trusted single-user machine");
  }
  if (store.memory_kind != MemoryKind::kHost) {
    return Unimplemented("store: a store server holds host memory only");
  }
  return Status::Ok();
}

Result<std::unique_ptr<StoreServer>> StoreServer::Create(StoreServerOptions options) {
  RELAYKV_RETURN_IF_ERROR(options.Validate());
  auto impl = std::make_unique<Impl>();
  Impl* raw = impl.get();
  options.store.on_removal = [raw](RecordId id, RemovalReason reason) {
    raw->OnRemoval(id, reason);
  };
  // UCX registration wants every page present.
  options.store.prefault = true;

  UcxTransportOptions ucx;
  ucx.tls = options.ucx_tls;
  ucx.wakeup = true;
  if (options.shared_segments && std::getenv("UCX_ALLOC_PRIO") == nullptr) {
    // sysv only: posix shared memory lives in /dev/shm, which containers
    // often cap far below a store's capacity (64 MiB by default), and
    // touching pages past the cap is SIGBUS, not an error. Without sysv,
    // UCX falls back to ordinary page-aligned memory (not the heap, whose
    // blocks would miss the store's alignment).
    ucx.config.emplace_back("ALLOC_PRIO", "md:sysv,thp,mmap");
  }
  RELAYKV_ASSIGN_OR_RETURN(impl->transport, UcxTransport::Create(ucx));
  if (options.shared_segments) {
    const uint64_t alignment = options.store.alignment;
    options.store.segment_factory =
        [raw, alignment](uint64_t bytes, uint32_t index) -> Result<std::unique_ptr<Segment>> {
      RELAYKV_ASSIGN_OR_RETURN(std::shared_ptr<MemoryRegistration> reg,
                               raw->transport->AllocateMemory(bytes));
      auto* base = static_cast<std::byte*>(reg->addr());
      RELAYKV_ASSIGN_OR_RETURN(
          auto segment,
          Segment::Adopt(base, bytes, alignment, MemoryKind::kHost, reg, /*populate=*/true));
      if (raw->registrations.size() != index) return Internal("segments out of order");
      raw->registrations.push_back(std::move(reg));
      return segment;
    };
  }
  impl->options = options;
  RELAYKV_ASSIGN_OR_RETURN(impl->store, EmbeddedStore::Create(options.store));
  if (!options.shared_segments) {
    for (size_t i = 0; i < impl->store->num_segments(); ++i) {
      const Segment& seg = impl->store->segment(i);
      RELAYKV_ASSIGN_OR_RETURN(auto reg,
                               impl->transport->RegisterMemory(seg.base(), seg.size(), seg.kind()));
      impl->registrations.push_back(std::move(reg));
    }
  }
  RELAYKV_ASSIGN_OR_RETURN(impl->transport_address, impl->transport->LocalAddress());

  std::string bound;
  RELAYKV_ASSIGN_OR_RETURN(impl->listen_fd, ListenTcp(options.listen, &bound));
  if (!options.advertise.empty()) {
    impl->info.control_address = options.advertise;
  } else if (bound.rfind("0.0.0.0:", 0) == 0) {
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    impl->info.control_address = std::string(host) + bound.substr(bound.find(':'));
  } else {
    impl->info.control_address = bound;
  }
  if (!options.metrics_listen.empty()) {
    RELAYKV_ASSIGN_OR_RETURN(impl->metrics_fd,
                             ListenTcp(options.metrics_listen, &impl->info.metrics_address));
  }
  impl->wake_fd = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (impl->wake_fd.get() < 0) return Internal(std::string("eventfd: ") + std::strerror(errno));

  DirectoryOptions dopts;
  dopts.timeout = options.directory_timeout;
  RELAYKV_ASSIGN_OR_RETURN(impl->directory, OpenDirectory(options.directory, dopts));
  impl->info.name = options.name + "-" + RandomSuffix();
  return std::unique_ptr<StoreServer>(new StoreServer(std::move(impl)));
}

StoreServer::StoreServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StoreServer::~StoreServer() { Shutdown(); }

const StoreServerInfo& StoreServer::info() const { return impl_->info; }
StoreStats StoreServer::Stats() const { return impl_->store->Stats(); }

Status StoreServer::Start() {
  if (impl_->started) return FailedPrecondition("store server already started");
  impl_->started = true;
  impl_->dir_thread = std::thread([this] { impl_->DirectoryLoop(); });
  impl_->loop_thread = std::thread([this] { impl_->Loop(); });
  return Status::Ok();
}

void StoreServer::Shutdown() {
  if (impl_ == nullptr || impl_->shut_down) return;
  impl_->shut_down = true;
  impl_->stop = true;
  const uint64_t one = 1;
  if (impl_->wake_fd.get() >= 0) (void)!::write(impl_->wake_fd.get(), &one, sizeof(one));
  impl_->dir_cv.notify_all();
  if (impl_->loop_thread.joinable()) impl_->loop_thread.join();
  if (impl_->dir_thread.joinable()) impl_->dir_thread.join();
  // Connections hold write handles and leases into the store: drop them first.
  impl_->conns.clear();
}

// ---- event loop ------------------------------------------------------------

void StoreServer::Impl::Loop() {
  auto efd_or = transport->EventFd();
  const int efd = efd_or.ok() ? *efd_or : -1;
  auto next_sweep = Clock::now() + std::chrono::seconds(1);
  std::vector<pollfd> fds;
  std::vector<int> conn_fds;
  while (!stop) {
    while (transport->Progress()) {
    }
    // Without a wakeup fd, fall back to polling the transport every ms.
    const bool armed = efd >= 0 && transport->Arm();
    fds.clear();
    conn_fds.clear();
    fds.push_back({wake_fd.get(), POLLIN, 0});
    fds.push_back({listen_fd.get(), POLLIN, 0});
    fds.push_back({metrics_fd.get(), static_cast<short>(metrics_fd.get() >= 0 ? POLLIN : 0), 0});
    fds.push_back({efd, static_cast<short>(efd >= 0 ? POLLIN : 0), 0});
    for (auto& [fd, c] : conns) {
      // A connection waiting on a seal's answer is not read meanwhile: its next
      // requests stay in the socket (and a flooding client in its own buffers).
      const short in = c.awaiting_publish ? 0 : POLLIN;
      fds.push_back({fd, static_cast<short>(in | (c.out_pending() ? POLLOUT : 0)), 0});
      conn_fds.push_back(fd);
    }
    const int timeout_ms = efd >= 0 ? (armed ? 200 : 0) : 1;
    const int n = ::poll(fds.data(), fds.size(), timeout_ms);
    if (n < 0 && errno != EINTR) break;
    if (n > 0) {
      if (fds[0].revents & POLLIN) {
        uint64_t count;
        (void)!::read(wake_fd.get(), &count, sizeof(count));
      }
      if (fds[1].revents & POLLIN) Accept(listen_fd.get(), false);
      if (fds[2].revents & POLLIN) Accept(metrics_fd.get(), true);
      for (size_t i = 0; i < conn_fds.size(); ++i) {
        const short ev = fds[4 + i].revents;
        if (ev == 0) continue;
        auto it = conns.find(conn_fds[i]);
        if (it == conns.end()) continue;
        Conn& c = it->second;
        if (ev & (POLLIN | POLLHUP | POLLERR)) OnReadable(c);
        Flush(c);
        const bool dead = c.fd.get() < 0 || (c.closing && !c.out_pending());
        if (dead) {
          if (!c.http) --clients;
          conns.erase(it);  // aborts its reservations, releases its leases
        }
      }
    }
    // After the poll results are used: a connection it closes frees an fd that
    // the next accept may reuse, which must not meet this round's revents.
    DeliverCompletions();
    if (Clock::now() >= next_sweep) {
      store->ReclaimExpired();
      next_sweep = Clock::now() + std::chrono::seconds(1);
    }
  }
}

void StoreServer::Impl::DeliverCompletions() {
  std::vector<SealCompletion> ready;
  {
    std::lock_guard<std::mutex> lock(done_mu);
    ready.swap(done);
  }
  for (SealCompletion& d : ready) {
    // A connection that closed meanwhile has nobody to tell; the record stays.
    auto it = std::find_if(conns.begin(), conns.end(),
                           [&](const auto& kv) { return kv.second.serial == d.conn; });
    if (it == conns.end()) continue;
    Conn& c = it->second;
    c.awaiting_publish = false;
    c.Reply(d.status.ok() ? wire::OkReply().Frame() : wire::ErrorReply(d.status));
    ProcessInput(c);  // requests that queued up behind the seal
    Flush(c);
    if (c.fd.get() < 0 || (c.closing && !c.out_pending())) {
      --clients;
      conns.erase(it);
    }
  }
}

void StoreServer::Impl::Accept(int lfd, bool http) {
  for (;;) {
    const int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    Conn& c = conns[fd];
    c.fd = UniqueFd(fd);
    c.serial = next_serial++;
    c.http = http;
    if (!http) ++clients;
  }
}

void StoreServer::Impl::OnReadable(Conn& c) {
  for (;;) {
    // Room for the rest of the frame being read (its length is known once
    // its first four bytes are in), and at least 64 KB. Only for a client
    // that presented the token: anyone else gets room for what they sent,
    // so announcing a large frame costs them as much memory as it costs us.
    size_t want = 64 * 1024;
    if (!c.http && c.authed && c.in.size() >= sizeof(uint32_t)) {
      uint32_t len;
      std::memcpy(&len, c.in.view().data(), sizeof(len));
      if (len <= wire::kMaxFrameBytes && sizeof(len) + len > c.in.size()) {
        want = std::max(want, sizeof(len) + len - c.in.size());
      }
    }
    const std::span<char> spare = c.in.Spare(want);
    const ssize_t n = ::recv(c.fd.get(), spare.data(), spare.size(), 0);
    if (n > 0) {
      c.in.Commit(static_cast<size_t>(n));
      if (static_cast<size_t>(n) < spare.size()) break;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    c.fd.reset();  // closed or reset
    return;
  }
  if (c.http) {
    HandleHttp(c);
    return;
  }
  ProcessInput(c);
}

void StoreServer::Impl::ProcessInput(Conn& c) {
  const std::string_view in = c.in.view();
  size_t at = 0;
  while (!c.closing && !c.awaiting_publish && in.size() - at >= sizeof(uint32_t)) {
    uint32_t len;
    std::memcpy(&len, in.data() + at, sizeof(len));
    // Before the token, only a hello is expected, and a hello is small.
    if (len > (c.authed ? wire::kMaxFrameBytes : kMaxHelloFrameBytes)) {
      c.Reply(wire::ErrorReply(InvalidArgument("frame too large")));
      c.closing = true;
      break;
    }
    if (in.size() - at < sizeof(len) + len) break;
    HandleFrame(c, in.substr(at + sizeof(len), len));
    at += sizeof(len) + len;
  }
  c.in.Consume(at);
}

void StoreServer::Impl::Flush(Conn& c) {
  while (c.out_pending() && c.fd.get() >= 0) {
    const ssize_t n =
        ::send(c.fd.get(), c.out.data() + c.out_sent, c.out.size() - c.out_sent, MSG_NOSIGNAL);
    if (n > 0) {
      c.out_sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    c.fd.reset();
    return;
  }
  c.out.clear();
  c.out_sent = 0;
}

void StoreServer::Impl::HandleFrame(Conn& c, std::string_view body) {
  if (body.empty()) {
    c.Reply(wire::ErrorReply(InvalidArgument("empty request")));
    return;
  }
  const auto op = static_cast<Op>(static_cast<uint8_t>(body[0]));
  wire::Reader r(body.substr(1));
  if (op != Op::kHello && !c.authed) {
    ++auth_failures;
    c.Reply(wire::ErrorReply(PermissionDenied("hello with the deployment token first")));
    c.closing = true;
    return;
  }
  c.Reply(Handle(c, op, r));
}

std::string StoreServer::Impl::Handle(Conn& c, Op op, wire::Reader& r) {
  switch (op) {
    case Op::kHello: {
      const uint32_t version = r.U32();
      const std::string token = r.Str();
      c.client = r.Str();
      if (Status s = r.Finish("hello"); !s.ok()) return wire::ErrorReply(s);
      if (version < wire::kMinProtocolVersion || version > wire::kProtocolVersion) {
        c.closing = true;
        return wire::ErrorReply(FailedPrecondition(
            "protocol version " + std::to_string(version) + " not supported (server speaks " +
            std::to_string(wire::kMinProtocolVersion) + " to " +
            std::to_string(wire::kProtocolVersion) + ")"));
      }
      if (!options.token.empty() && !TokenEquals(token, options.token)) {
        ++auth_failures;
        c.closing = true;
        return wire::ErrorReply(PermissionDenied("bad token"));
      }
      c.authed = true;
      wire::Writer w = wire::OkReply();
      w.Str(info.name).Str("ucx").Str(transport_address);
      w.U32(static_cast<uint32_t>(registrations.size()));
      for (const auto& reg : registrations) w.Str(reg->descriptor());
      w.U64(store->capacity_bytes());
      return std::move(w).Frame();
    }
    case Op::kReserve: {
      const std::string ns = r.Str();
      const uint64_t id = r.U64();
      const uint64_t size = r.U64();
      const uint32_t ttl_ms = r.U32();
      if (Status s = r.Finish("reserve"); !s.ok()) return wire::ErrorReply(s);
      if (ns.empty()) return wire::ErrorReply(InvalidArgument("reserve: empty namespace"));
      auto handle = Reserve(ns, id, size, ttl_ms);
      if (!handle.ok()) return wire::ErrorReply(handle.status());
      const uint64_t h = next_handle++;
      wire::Writer w = wire::OkReply();
      w.U64(h).U32(handle->segment()).U64(handle->offset());
      c.writes.emplace(h, PendingWrite{std::move(*handle), ns, id});
      return std::move(w).Frame();
    }
    case Op::kSeal: {
      const uint64_t h = r.U64();
      if (Status s = r.Finish("seal"); !s.ok()) return wire::ErrorReply(s);
      auto it = c.writes.find(h);
      if (it == c.writes.end()) return wire::ErrorReply(NotFound("seal: unknown handle"));
      PendingWrite pw = std::move(it->second);
      c.writes.erase(it);
      return Seal(c, std::move(pw));
    }
    case Op::kPut: {
      const std::string ns = r.Str();
      const uint64_t id = r.U64();
      const uint32_t ttl_ms = r.U32();
      const std::string_view record = r.View();
      if (Status s = r.Finish("put"); !s.ok()) return wire::ErrorReply(s);
      if (ns.empty()) return wire::ErrorReply(InvalidArgument("put: empty namespace"));
      if (record.empty()) return wire::ErrorReply(InvalidArgument("put: empty record"));
      auto handle = Reserve(ns, id, record.size(), ttl_ms);
      if (!handle.ok()) return wire::ErrorReply(handle.status());
      std::memcpy(handle->data(), record.data(), record.size());
      return Seal(c, PendingWrite{std::move(*handle), ns, id});
    }
    case Op::kAbort: {
      const uint64_t h = r.U64();
      if (Status s = r.Finish("abort"); !s.ok()) return wire::ErrorReply(s);
      c.writes.erase(h);
      return wire::OkReply().Frame();
    }
    case Op::kLease:
    case Op::kRead: {
      const std::string ns = r.Str();
      const uint64_t id = r.U64();
      const uint64_t inline_limit = op == Op::kRead ? r.U64() : 0;
      if (Status s = r.Finish(wire::OpName(op)); !s.ok()) return wire::ErrorReply(s);
      const uint64_t internal = InternalId(ns, id);
      if (!Holds(internal, ns, id)) return wire::ErrorReply(NotFound("record not stored here"));
      auto lease = store->Get(internal);
      if (!lease.ok()) return wire::ErrorReply(lease.status());
      bytes_read += lease->size();
      wire::Writer w = wire::OkReply();
      if (op == Op::kRead) {
        if (lease->size() <= std::min<uint64_t>(inline_limit, wire::kMaxInlineBytes)) {
          // Copied into the reply under the lease, which ends here.
          w.U8(wire::kReadInline)
              .Str({reinterpret_cast<const char*>(lease->data()), lease->size()});
          return std::move(w).Frame();
        }
        w.U8(wire::kReadLeased);
      }
      const uint64_t h = next_handle++;
      w.U64(h).U32(lease->segment()).U64(lease->offset()).U64(lease->size());
      c.leases.emplace(h, std::move(*lease));
      return std::move(w).Frame();
    }
    case Op::kRelease: {
      const uint64_t h = r.U64();
      if (Status s = r.Finish("release"); !s.ok()) return wire::ErrorReply(s);
      c.leases.erase(h);
      return wire::OkReply().Frame();
    }
    case Op::kDelete: {
      const std::string ns = r.Str();
      const uint64_t id = r.U64();
      if (Status s = r.Finish("delete"); !s.ok()) return wire::ErrorReply(s);
      const uint64_t internal = InternalId(ns, id);
      if (!Holds(internal, ns, id)) return wire::ErrorReply(NotFound("record not stored here"));
      if (Status s = store->Delete(internal); !s.ok()) return wire::ErrorReply(s);
      return wire::OkReply().Frame();
    }
    case Op::kStats: {
      if (Status s = r.Finish("stats"); !s.ok()) return wire::ErrorReply(s);
      wire::Writer w = wire::OkReply();
      const StoreStats st = store->Stats();
      std::ostringstream o;
      o << "records " << st.records << "\nbytes_used " << st.bytes_used << "\ncapacity_bytes "
        << st.capacity_bytes << "\nleases " << st.leases << "\npending " << st.pending
        << "\nevictions " << st.evictions << "\n";
      w.Str(o.str());
      return std::move(w).Frame();
    }
  }
  c.closing = true;
  return wire::ErrorReply(InvalidArgument("unknown op " + std::to_string(static_cast<int>(op))));
}

namespace {

void Metric(std::ostringstream& o, const char* name, const char* type, const char* help,
            uint64_t value, const char* labels = nullptr) {
  o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n' << name;
  if (labels != nullptr) o << '{' << labels << '}';
  o << ' ' << value << '\n';
}

}  // namespace

std::string RenderMetrics(const StoreServer::Impl& s) {
  const StoreStats st = s.store->Stats();
  std::ostringstream o;
  Metric(o, "relaykv_store_capacity_bytes", "gauge", "Bytes of record memory this server owns.",
         st.capacity_bytes);
  Metric(o, "relaykv_store_used_bytes", "gauge", "Bytes allocated to records (any state).",
         st.bytes_used);
  Metric(o, "relaykv_store_records", "gauge", "Sealed records held.", st.records);
  Metric(o, "relaykv_store_leases", "gauge", "Outstanding read leases.", st.leases);
  Metric(o, "relaykv_store_clients", "gauge", "Connected control clients.", s.clients.load());
  Metric(o, "relaykv_store_puts_total", "counter", "Records sealed.", st.puts);
  o << "# HELP relaykv_store_gets_total Lease requests by result.\n"
       "# TYPE relaykv_store_gets_total counter\n"
    << "relaykv_store_gets_total{result=\"hit\"} " << st.hits << '\n'
    << "relaykv_store_gets_total{result=\"miss\"} " << st.misses << '\n';
  Metric(o, "relaykv_store_evictions_total", "counter", "Records evicted to make room.",
         st.evictions);
  Metric(o, "relaykv_store_expirations_total", "counter", "Records whose TTL ran out.",
         st.expirations);
  Metric(o, "relaykv_store_rejected_puts_total", "counter",
         "Reservations refused (full, too large, duplicate) and records refused at seal.",
         st.rejected_puts + s.rejected_seals.load());
  Metric(o, "relaykv_store_auth_failures_total", "counter",
         "Connections refused for a bad or missing token.", s.auth_failures.load());
  Metric(o, "relaykv_store_bytes_written_total", "counter", "Record bytes sealed.",
         s.bytes_written.load());
  Metric(o, "relaykv_store_bytes_read_total", "counter", "Record bytes leased to readers.",
         s.bytes_read.load());
  Metric(o, "relaykv_store_directory_up", "gauge", "1 when the last directory heartbeat succeeded.",
         s.directory_up.load() ? 1 : 0);
  Metric(o, "relaykv_store_directory_errors_total", "counter", "Failed directory operations.",
         s.directory_errors.load());
  return o.str();
}

std::string StoreServer::MetricsText() const { return RenderMetrics(*impl_); }

void StoreServer::Impl::HandleHttp(Conn& c) {
  const std::string_view in = c.in.view();
  const size_t end = in.find("\r\n\r\n");
  if (end == std::string::npos) {
    if (in.size() > 8192) c.fd.reset();
    return;
  }
  const size_t sp1 = in.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? sp1 : in.find(' ', sp1 + 1);
  const std::string method(in.substr(0, sp1));
  const std::string path(sp2 == std::string::npos ? "" : in.substr(sp1 + 1, sp2 - sp1 - 1));
  int code = 200;
  std::string body, type = "text/plain; charset=utf-8";
  if (method != "GET") {
    code = 405;
    body = "method not allowed\n";
  } else if (path == "/metrics") {
    body = RenderMetrics(*this);
    type = "text/plain; version=0.0.4; charset=utf-8";
  } else if (path == "/healthz") {
    body = "ok\n";
  } else if (path == "/readyz") {
    if (directory_up) {
      body = "ready\n";
    } else {
      code = 503;
      body = "not announced in the directory\n";
    }
  } else {
    code = 404;
    body = "not found\n";
  }
  const char* reason = code == 200   ? "OK"
                       : code == 404 ? "Not Found"
                       : code == 405 ? "Method Not Allowed"
                                     : "Service Unavailable";
  c.out += "HTTP/1.1 " + std::to_string(code) + " " + reason + "\r\nContent-Type: " + type +
           "\r\nContent-Length: " + std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
           body;
  c.in.Clear();
  c.closing = true;
}

// ---- directory thread -----------------------------------------------------------

void StoreServer::Impl::HandleDirOps(std::deque<DirOp>& ops, std::deque<DirOp>& retry,
                                     bool& need_republish) {
  // A seal whose record the directory cannot list yet is answered
  // Unavailable: the record stays and is published once the directory is
  // back, but its writer must not announce it as readable now.
  auto not_listed = [](const Status& why) {
    return Unavailable(std::string("record stored but the directory cannot list it yet (") +
                       std::string(why.message()) +
                       "); it is published when the directory is back");
  };
  for (DirOp& op : ops) {
    if (op.kind == DirOp::Kind::kSeal) {
      auto entry = VerifyAndSeal(std::move(*op.write));
      op.write.reset();
      if (!entry.ok()) {
        CompleteSeal(op.reply_to, entry.status());
        continue;
      }
      op.kind = DirOp::Kind::kPublish;
      op.entry = std::move(*entry);
    }
    if (!directory_up) {
      CompleteSeal(std::exchange(op.reply_to, 0), not_listed(Unavailable("directory down")));
      retry.push_back(std::move(op));
      continue;
    }
    Status s = op.kind == DirOp::Kind::kPublish
                   ? directory->PublishRecord(op.entry)
                   : directory->RemoveRecord(op.entry.ns, op.entry.id, op.entry.server);
    if (!s.ok()) {
      ++directory_errors;
      if (s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kDeadlineExceeded) {
        directory_up = false;
        need_republish = true;
        CompleteSeal(std::exchange(op.reply_to, 0), not_listed(s));
        retry.push_back(std::move(op));
        continue;
      }
    }
    CompleteSeal(op.reply_to, s);
  }
  ops.clear();
}

void StoreServer::Impl::DirectoryLoop() {
  const auto ttl = options.heartbeat * 3;
  auto next_beat = Clock::now();
  std::deque<DirOp> retry;
  bool need_republish = true;
  // What queued up since the last look. Also run between republish batches, so
  // a seal's answer never waits for a whole republish of a full server.
  auto drain = [&] {
    std::deque<DirOp> ops;
    {
      std::lock_guard<std::mutex> lock(dir_mu);
      ops.swap(dir_ops);
    }
    HandleDirOps(ops, retry, need_republish);
  };
  constexpr size_t kRepublishBatch = 64;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(dir_mu);
      dir_cv.wait_until(lock, next_beat, [&] { return stop.load() || !dir_ops.empty(); });
    }
    if (stop) break;
    if (Clock::now() >= next_beat) {
      next_beat = Clock::now() + options.heartbeat;
      // A server key that vanished (expired during an outage, or a restarted
      // Redis) means the directory lost our records too.
      auto found = directory->FindServer(info.name);
      Status s = found.ok() ? directory->AnnounceServer(AnnouncedInfo(), ttl) : found.status();
      if (s.ok()) {
        directory_up = true;
        if (!found->has_value()) need_republish = true;
        if (need_republish) {
          std::vector<RecordEntry> all;
          {
            std::lock_guard<std::mutex> lock(published_mu);
            all.reserve(published.size());
            for (const auto& [k, e] : published) all.push_back(e);
          }
          for (size_t n = 0; n < all.size() && s.ok(); ++n) {
            s = directory->PublishRecord(all[n]);
            if (s.ok() && (n + 1) % kRepublishBatch == 0) {
              drain();
              if (!directory_up) s = Unavailable("directory lost during the republish");
            }
          }
          // What the retry queue would publish is part of the republish.
          if (s.ok()) {
            need_republish = false;
            std::erase_if(retry, [](const DirOp& op) { return op.kind == DirOp::Kind::kPublish; });
          }
        }
      }
      if (!s.ok()) {
        ++directory_errors;
        directory_up = false;
        need_republish = true;
      } else if (!retry.empty()) {
        std::deque<DirOp> again;
        again.swap(retry);
        HandleDirOps(again, retry, need_republish);
      }
    }
    drain();
  }
  // Graceful exit: readers stop being sent here at once rather than after the TTL.
  (void)directory->WithdrawServer(info.name);
  directory_up = false;
}

}  // namespace relaykv
