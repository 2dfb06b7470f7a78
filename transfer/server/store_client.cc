#include "transfer/server/store_client.h"

#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "transfer/server/protocol.h"
#include "transfer/transport/ucx_transport.h"

namespace relaykv {

void RecordBuffer::Free::operator()(uint8_t* p) const { std::free(p); }

void RecordBuffer::Resize(size_t size) {
  if (size > capacity_) {
    const size_t cap = (size + 4095) & ~size_t{4095};
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, cap));
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(p);
    capacity_ = cap;
  }
  size_ = size;
}

struct StoreClient::Impl {
  StoreClientOptions options;
  std::string address;
  int fd = -1;
  std::unique_ptr<UcxTransport> transport;
  std::unique_ptr<Endpoint> endpoint;
  std::string server_name;
  std::vector<RemoteDescriptor> segments;
  uint64_t capacity = 0;
  bool healthy = true;
  // Requests sent whose replies were not read yet (releases): their replies
  // come first on the socket, in order, and are read with the next call's.
  int unanswered = 0;
  uint64_t inline_ops = 0;
  std::mutex mu;

  ~Impl() {
    endpoint.reset();
    if (fd >= 0) ::close(fd);
  }

  // After a failure nothing more goes to this server: the endpoint goes now,
  // and with it any mapping of the server's segments, which would otherwise
  // keep a dead server's memory alive for as long as this client lingers.
  void MarkBroken() {
    healthy = false;
    endpoint.reset();
  }
  Status CheckUsable() const {
    if (healthy) return Status::Ok();
    return Unavailable("store client for " + address + ": broken by an earlier failure");
  }

  // A request whose reply is read later (with the next Call's).
  Status Send(wire::Writer&& request, std::string_view what) {
    Status s = wire::SendFrame(fd, std::move(request).Frame(), options.timeout);
    if (!s.ok()) {
      MarkBroken();
      return s.WithContext(std::string(what) + " to " + address);
    }
    ++unanswered;
    return Status::Ok();
  }

  // One request/response on the control socket: the OK response body (its
  // fields start at wire::ReplyFields), or the error it carried.
  Result<std::string> Call(wire::Writer&& request, std::string_view what) {
    RELAYKV_RETURN_IF_ERROR(Send(std::move(request), what));
    // Replies come in order: the earlier unanswered ones, then this one. The
    // earlier outcomes are not wanted: a release cannot fail in a way its
    // sender could act on (the server drops every lease of a connection
    // when it closes).
    std::string body;
    for (; unanswered > 0; --unanswered) {
      auto reply = wire::RecvFrame(fd, options.timeout, options.reply_spin);
      if (!reply.ok()) {
        MarkBroken();
        return reply.status().WithContext(std::string(what) + " to " + address);
      }
      body = std::move(*reply);
    }
    RELAYKV_RETURN_IF_ERROR(wire::ReplyStatus(body, std::string(what) + " (" + address + ")"));
    return body;
  }

  Result<const RemoteDescriptor*> Segment(uint32_t index) {
    if (index >= segments.size()) {
      MarkBroken();
      return Internal("server named segment " + std::to_string(index) + " of " +
                      std::to_string(segments.size()));
    }
    return &segments[index];
  }

  Status Transfer(Result<std::unique_ptr<TransferRequest>> req, std::string_view what) {
    if (!req.ok()) {
      if (req.status().code() != StatusCode::kInvalidArgument) MarkBroken();
      return req.status().WithContext(what);
    }
    Status s = (*req)->Wait(options.timeout);
    if (!s.ok()) {
      // A transfer that timed out or failed leaves the endpoint unusable.
      MarkBroken();
      return s.WithContext(what);
    }
    return Status::Ok();
  }
};

StoreClient::StoreClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StoreClient::~StoreClient() = default;

const std::string& StoreClient::server_name() const { return impl_->server_name; }
uint64_t StoreClient::capacity_bytes() const { return impl_->capacity; }
bool StoreClient::healthy() const { return impl_->healthy; }

uint64_t StoreClient::inline_transfers() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->inline_ops;
}

uint64_t StoreClient::mapped_transfers() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->transport->mapped_operations();
}

Result<std::unique_ptr<StoreClient>> StoreClient::Connect(std::string_view control_address,
                                                          const StoreClientOptions& options) {
  if (options.inline_bytes > wire::kMaxInlineBytes) {
    return InvalidArgument("store client: inline_bytes " + std::to_string(options.inline_bytes) +
                           " exceeds " + std::to_string(wire::kMaxInlineBytes));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->address = std::string(control_address);
  RELAYKV_ASSIGN_OR_RETURN(impl->fd, wire::ConnectTcp(control_address, options.timeout));
  wire::Writer hello;
  hello.U8(static_cast<uint8_t>(wire::Op::kHello))
      .U32(wire::kProtocolVersion)
      .Str(options.token)
      .Str(options.client_name);
  RELAYKV_ASSIGN_OR_RETURN(std::string reply, impl->Call(std::move(hello), "hello"));
  wire::Reader r(wire::ReplyFields(reply));
  impl->server_name = r.Str();
  const std::string transport = r.Str();
  const std::string address = r.Str();
  const uint32_t n = r.U32();
  std::vector<std::string> blobs;
  for (uint32_t i = 0; i < n && r.ok(); ++i) blobs.push_back(r.Str());
  impl->capacity = r.U64();
  RELAYKV_RETURN_IF_ERROR(r.Finish("hello reply"));
  if (transport != "ucx") {
    return Unimplemented("server " + impl->server_name + " speaks transport '" + transport + "'");
  }
  for (const std::string& blob : blobs) {
    RELAYKV_ASSIGN_OR_RETURN(RemoteDescriptor d, RemoteDescriptor::Parse(blob));
    impl->segments.push_back(std::move(d));
  }
  UcxTransportOptions ucx;
  ucx.tls = options.ucx_tls;
  ucx.peer_error_handling = options.ucx_peer_error_handling;
  // Record bytes are always in host buffers here, so a server's shared
  // segments can be copied through a mapping on the same host.
  ucx.map_peer_memory = true;
  RELAYKV_ASSIGN_OR_RETURN(impl->transport, UcxTransport::Create(ucx));
  RELAYKV_ASSIGN_OR_RETURN(impl->endpoint, impl->transport->Connect(address));
  return std::unique_ptr<StoreClient>(new StoreClient(std::move(impl)));
}

Status StoreClient::Put(std::string_view ns, uint64_t id, std::span<const std::byte> record) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  if (record.empty()) return InvalidArgument("put: empty record");
  RELAYKV_RETURN_IF_ERROR(m.CheckUsable());
  if (record.size() <= m.options.inline_bytes) {
    wire::Writer put;
    put.U8(static_cast<uint8_t>(wire::Op::kPut))
        .Str(ns)
        .U64(id)
        .U32(static_cast<uint32_t>(m.options.record_ttl.count()))
        .Str({reinterpret_cast<const char*>(record.data()), record.size()});
    RELAYKV_RETURN_IF_ERROR(m.Call(std::move(put), "put").status());
    ++m.inline_ops;
    return Status::Ok();
  }
  wire::Writer req;
  req.U8(static_cast<uint8_t>(wire::Op::kReserve))
      .Str(ns)
      .U64(id)
      .U64(record.size())
      .U32(static_cast<uint32_t>(m.options.record_ttl.count()));
  RELAYKV_ASSIGN_OR_RETURN(std::string reply, m.Call(std::move(req), "reserve"));
  wire::Reader r(wire::ReplyFields(reply));
  const uint64_t handle = r.U64();
  const uint32_t segment = r.U32();
  const uint64_t offset = r.U64();
  RELAYKV_RETURN_IF_ERROR(r.Finish("reserve reply"));
  auto abort = [&](Status s) {
    wire::Writer a;
    a.U8(static_cast<uint8_t>(wire::Op::kAbort)).U64(handle);
    if (m.healthy) (void)m.Call(std::move(a), "abort");
    return s;
  };
  auto seg = m.Segment(segment);
  if (!seg.ok()) return abort(seg.status());
  Status s =
      m.Transfer(m.endpoint->Write(record.data(), record.size(), **seg, offset), "put write");
  if (s.ok()) s = m.Transfer(m.endpoint->Flush(), "put flush");
  if (!s.ok()) return abort(s);
  wire::Writer seal;
  seal.U8(static_cast<uint8_t>(wire::Op::kSeal)).U64(handle);
  return m.Call(std::move(seal), "seal").status();
}

Status StoreClient::Get(std::string_view ns, uint64_t id, RecordBuffer* out) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  RELAYKV_RETURN_IF_ERROR(m.CheckUsable());
  wire::Writer req;
  req.U8(static_cast<uint8_t>(wire::Op::kRead)).Str(ns).U64(id).U64(m.options.inline_bytes);
  RELAYKV_ASSIGN_OR_RETURN(std::string reply, m.Call(std::move(req), "read"));
  wire::Reader r(wire::ReplyFields(reply));
  if (r.U8() == wire::kReadInline) {
    const std::string_view record = r.View();
    RELAYKV_RETURN_IF_ERROR(r.Finish("read reply"));
    out->Resize(record.size());
    std::memcpy(out->data(), record.data(), record.size());
    ++m.inline_ops;
    return Status::Ok();
  }
  const uint64_t lease = r.U64();
  const uint32_t segment = r.U32();
  const uint64_t offset = r.U64();
  const uint64_t size = r.U64();
  RELAYKV_RETURN_IF_ERROR(r.Finish("read reply"));
  out->Resize(size);
  auto seg = m.Segment(segment);
  Status s = seg.ok() ? m.Transfer(m.endpoint->Read(out->data(), size, **seg, offset), "get read")
                      : seg.status();
  // The bytes are ours now (or the read failed): give the lease back either
  // way, without waiting for the answer.
  wire::Writer rel;
  rel.U8(static_cast<uint8_t>(wire::Op::kRelease)).U64(lease);
  if (m.healthy) {
    Status rs = m.Send(std::move(rel), "release");
    if (s.ok()) s = rs;
  }
  return s;
}

Status StoreClient::Delete(std::string_view ns, uint64_t id) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  RELAYKV_RETURN_IF_ERROR(m.CheckUsable());
  wire::Writer req;
  req.U8(static_cast<uint8_t>(wire::Op::kDelete)).Str(ns).U64(id);
  return m.Call(std::move(req), "delete").status();
}

Result<std::string> StoreClient::Stats() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  RELAYKV_RETURN_IF_ERROR(m.CheckUsable());
  wire::Writer req;
  req.U8(static_cast<uint8_t>(wire::Op::kStats));
  RELAYKV_ASSIGN_OR_RETURN(std::string reply, m.Call(std::move(req), "stats"));
  wire::Reader r(wire::ReplyFields(reply));
  std::string text = r.Str();
  RELAYKV_RETURN_IF_ERROR(r.Finish("stats reply"));
  return text;
}

// ---- DistributedStore ----------------------------------------------------------

Result<std::unique_ptr<DistributedStore>> DistributedStore::Open(
    const DistributedStoreOptions& options) {
  auto store = std::unique_ptr<DistributedStore>(new DistributedStore(options));
  RELAYKV_ASSIGN_OR_RETURN(store->directory_,
                           OpenDirectory(options.directory, options.directory_options));
  return store;
}

DistributedStore::~DistributedStore() = default;

Result<std::vector<ServerInfo>> DistributedStore::Servers() {
  const auto now = std::chrono::steady_clock::now();
  if (servers_.empty() || now - servers_at_ >= options_.server_refresh) {
    RELAYKV_ASSIGN_OR_RETURN(servers_, directory_->LiveServers());
    servers_at_ = now;
  }
  return servers_;
}

Result<std::shared_ptr<StoreClient>> DistributedStore::ClientFor(const ServerInfo& server) {
  auto it = clients_.find(server.name);
  if (it != clients_.end() && it->second->healthy()) return it->second;
  RELAYKV_ASSIGN_OR_RETURN(auto client,
                           StoreClient::Connect(server.control_address, options_.client));
  if (client->server_name() != server.name) {
    // The address now belongs to another incarnation: the directory is stale.
    return NotFound("server " + server.name + " is gone (" + server.control_address + " is now " +
                    client->server_name() + ")");
  }
  std::shared_ptr<StoreClient> shared = std::move(client);
  clients_[server.name] = shared;
  return shared;
}

void DistributedStore::DropClient(const std::string& name) { clients_.erase(name); }

Status DistributedStore::Put(std::string_view ns, uint64_t id, std::span<const std::byte> record) {
  std::shared_ptr<StoreClient> client;
  {
    std::lock_guard<std::mutex> lock(mu_);
    RELAYKV_ASSIGN_OR_RETURN(std::vector<ServerInfo> servers, Servers());
    if (servers.empty()) return Unavailable("no live store server in " + directory_->url());
    // Rendezvous hashing: highest hash of (record, server) wins.
    const uint64_t key = XXH64(ns.data(), ns.size(), id);
    const ServerInfo* best = nullptr;
    uint64_t best_score = 0;
    for (const ServerInfo& s : servers) {
      const uint64_t score = XXH64(s.name.data(), s.name.size(), key);
      if (best == nullptr || score > best_score) {
        best = &s;
        best_score = score;
      }
    }
    auto c = ClientFor(*best);
    if (!c.ok()) {
      servers_.clear();  // refresh the server list next time
      return c.status();
    }
    client = *c;
  }
  Status s = client->Put(ns, id, record);
  if (!client->healthy()) {
    std::lock_guard<std::mutex> lock(mu_);
    DropClient(client->server_name());
    servers_.clear();
  }
  return s;
}

Status DistributedStore::Get(std::string_view ns, uint64_t id, RecordBuffer* out) {
  std::shared_ptr<StoreClient> client;
  {
    std::lock_guard<std::mutex> lock(mu_);
    RELAYKV_ASSIGN_OR_RETURN(std::optional<RecordEntry> entry, directory_->FindRecord(ns, id));
    if (!entry.has_value()) return NotFound("record not in the directory (evicted or holder gone)");
    RELAYKV_ASSIGN_OR_RETURN(std::optional<ServerInfo> server,
                             directory_->FindServer(entry->server));
    if (!server.has_value()) return NotFound("holder " + entry->server + " is gone");
    RELAYKV_ASSIGN_OR_RETURN(client, ClientFor(*server));
  }
  Status s = client->Get(ns, id, out);
  if (!client->healthy()) {
    std::lock_guard<std::mutex> lock(mu_);
    DropClient(client->server_name());
  }
  return s;
}

}  // namespace relaykv
