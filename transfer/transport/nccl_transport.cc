#include "transfer/transport/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "transfer/common/net.h"

namespace relaykv {
namespace {

using Clock = std::chrono::steady_clock;
using net::UniqueFd;

constexpr char kAddrMagic[4] = {'R', 'K', 'V', 'N'};
constexpr uint32_t kAddrVersion = 3;
constexpr size_t kUniqueIdBytes = 128;
constexpr size_t kAddrFixedBytes = 4 + 4 + 2 + 1;
constexpr uint32_t kHeaderMagic = 0x484e4b52;  // "RKNH"
constexpr uint32_t kHelloMagic = 0x4f4c4548;   // "HELO"
// The initiator makes the communicator's unique id, so it is rank 0.
constexpr int kInitiatorRank = 0;
constexpr int kTargetRank = 1;

enum class Op : uint32_t { kWrite = 1, kRead = 2, kFlush = 3, kNotify = 4, kClose = 5, kAck = 6 };

// One control message; a notification's bytes follow its header.
struct Header {
  uint32_t magic;
  uint32_t op;
  uint64_t reg_id;
  uint64_t addr;  // base of the registration, as the initiator's descriptor names it
  uint64_t offset;
  uint64_t length;
  uint64_t seq;
  uint8_t pad[16];
};
static_assert(sizeof(Header) == 64 && std::is_trivially_copyable_v<Header>);

// The initiator's first bytes on a control connection.
struct Hello {
  uint32_t magic;
  uint32_t token_length;
  char unique_id[kUniqueIdBytes];
  char token[kMaxNcclTokenBytes];
};

bool HelloTokenMatches(const Hello& h, const std::string& token) {
  return h.token_length <= kMaxNcclTokenBytes &&
         net::TokenEquals(std::string_view(h.token, h.token_length), token);
}

Status CudaError(cudaError_t e, std::string_view what,
                 std::source_location loc = std::source_location::current()) {
  cudaGetLastError();  // not sticky for the next check
  return Status(StatusCode::kInternal,
                "nccl transport: " + std::string(what) + ": " + cudaGetErrorString(e), loc);
}

Status NcclError(ncclResult_t r, std::string_view what,
                 std::source_location loc = std::source_location::current()) {
  std::string msg = "nccl: " + std::string(what) + ": " + ncclGetErrorString(r);
  // Process-wide (the argument is ignored), so it may name another communicator.
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') msg += std::string(" (last NCCL error: ") + last + ")";
  StatusCode code = StatusCode::kInternal;
  if (r == ncclRemoteError || r == ncclSystemError) code = StatusCode::kUnavailable;
  if (r == ncclInvalidArgument || r == ncclInvalidUsage) code = StatusCode::kInvalidArgument;
  return Status(code, std::move(msg), loc);
}

struct CommAbort {
  // Blocking even for non-blocking communicators; cancels kernels in flight.
  void operator()(ncclComm_t c) const { ncclCommAbort(c); }
};
struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using CommPtr = std::unique_ptr<std::remove_pointer_t<ncclComm_t>, CommAbort>;
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;
using EventPtr = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;

// Makes `device` current for the call and puts the caller's device back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) {
      const cudaError_t e = cudaSetDevice(device);
      if (e != cudaSuccess) status_ = CudaError(e, "cudaSetDevice(" + std::to_string(device) + ")");
    }
  }
  ~DeviceScope() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) {
      cudaSetDevice(previous_);
    }
  }
  const Status& status() const { return status_; }

 private:
  int previous_ = -1;
  Status status_;
};

// One connection: a two-rank communicator, its stream and its control
// socket. The communicator is declared last so it is aborted first.
struct Channel {
  int device = 0;
  std::chrono::milliseconds op_timeout{30000};
  UniqueFd sock;
  StreamPtr stream;
  CommPtr comm;
  bool broken = false;
  bool aborted = false;  // Close() ran: events may complete without their transfer
  std::string why;
  std::string inbuf;  // control bytes read, not yet parsed

  static Result<std::unique_ptr<Channel>> Make(int device, std::chrono::milliseconds op_timeout) {
    auto ch = std::make_unique<Channel>();
    ch->device = device;
    ch->op_timeout = op_timeout;
    cudaStream_t s = nullptr;
    if (cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking); e != cudaSuccess) {
      return CudaError(e, "cudaStreamCreate");
    }
    ch->stream.reset(s);
    return ch;
  }

  // Marks the connection unusable and shuts the control socket down, so the
  // other side drops it too (and aborts whatever it had posted for it).
  Status Broken(Status s) {
    if (!broken) {
      broken = true;
      why = s.ToString();
      if (sock.get() >= 0) ::shutdown(sock.get(), SHUT_RDWR);
    }
    return s;
  }
  // Ends the connection now: aborts the communicator (cancelling what is in
  // flight, so no buffer of the caller is touched later) and closes the socket.
  void Close(std::string reason) {
    (void)Broken(Unavailable(std::move(reason)));
    aborted = true;
    comm.reset();
    sock.reset();
  }

  // The communicator's asynchronous state: OK, still in progress (*busy), or
  // an error that breaks the connection.
  Status Poll(bool* busy) {
    *busy = false;
    if (broken) return Unavailable("nccl: connection is closed: " + why);
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm.get(), &state);
    if (r != ncclSuccess) return Broken(NcclError(r, "ncclCommGetAsyncError"));
    if (state == ncclInProgress) {
      *busy = true;
      return Status::Ok();
    }
    if (state != ncclSuccess) return Broken(NcclError(state, "asynchronous error"));
    return Status::Ok();
  }

  // Reads what the socket has without waiting. EOF or an error breaks the
  // connection (that is how a dead peer shows up first).
  Status ReadSocket() {
    if (broken) return Unavailable("nccl: connection is closed: " + why);
    char buf[16384];
    for (;;) {
      const ssize_t n = ::recv(sock.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0) {
        inbuf.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) return Broken(Unavailable("nccl: the peer closed the control connection"));
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::Ok();
      return Broken(Unavailable(std::string("nccl: control connection: ") + std::strerror(errno)));
    }
  }

  Status SendControl(std::string_view bytes) {
    if (broken) return Unavailable("nccl: connection is closed: " + why);
    Status s = net::SendAll(sock.get(), bytes, Clock::now() + op_timeout);
    return s.ok() ? s : Broken(s.WithContext("nccl: control connection"));
  }
};

std::string HeaderBytes(Op op, uint64_t reg, uint64_t addr, uint64_t offset, uint64_t length,
                        uint64_t seq) {
  Header h{};
  h.magic = kHeaderMagic;
  h.op = static_cast<uint32_t>(op);
  h.reg_id = reg;
  h.addr = addr;
  h.offset = offset;
  h.length = length;
  h.seq = seq;
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

Result<EventPtr> Record(Channel& ch) {
  cudaEvent_t e = nullptr;
  if (cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming); err != cudaSuccess) {
    return ch.Broken(CudaError(err, "cudaEventCreate"));
  }
  EventPtr ev(e, EventDestroy());
  if (cudaError_t err = cudaEventRecord(e, ch.stream.get()); err != cudaSuccess) {
    return ch.Broken(CudaError(err, "cudaEventRecord"));
  }
  return ev;
}

// True when `ev` completed; an error when it cannot any more.
Result<bool> EventDone(Channel& ch, const EventPtr& ev) {
  const cudaError_t q = cudaEventQuery(ev.get());
  if (q == cudaSuccess) return true;
  if (q != cudaErrorNotReady) return ch.Broken(CudaError(q, "cudaEventQuery"));
  return false;
}

// Starts a non-blocking ncclCommInitRankConfig as `rank` of 2.
Status StartInit(Channel* ch, const std::string& unique_id, int rank) {
  ncclUniqueId id;
  static_assert(sizeof(id.internal) == kUniqueIdBytes);
  std::memcpy(id.internal, unique_id.data(), kUniqueIdBytes);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, 2, id, rank, &config);
  if (comm != nullptr) ch->comm.reset(comm);
  if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclCommInitRankConfig");
  if (comm == nullptr) return Internal("nccl: ncclCommInitRankConfig returned no communicator");
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// Target side: registrations, connections being set up, connections served.

struct NcclTransport::Core {
  struct Region {
    uint64_t addr;
    uint64_t length;
  };
  struct Greeting {  // an accepted control socket that has not said hello yet
    UniqueFd sock;
    std::string in;
    Clock::time_point expires;
  };
  // A served connection works through its headers one at a time:
  // kReady -> (post recv/send) kSettling -> kReady, or (flush/notify)
  // kWaiting until everything before completed -> kReady.
  enum class Phase { kReady, kSettling, kWaiting };
  struct Peer {
    std::unique_ptr<Channel> ch;
    bool comm_ready = false;
    Phase phase = Phase::kReady;
    EventPtr ev;
    Header cur{};
    std::string note;
  };

  NcclTransportOptions options;
  UniqueFd listen_fd;
  std::string advertise;
  uint16_t port = 0;
  uint64_t next_reg = 1;
  std::unordered_map<uint64_t, Region> regions;
  std::vector<Greeting> greetings;
  std::vector<Peer> peers;
  std::deque<std::string> notes;

  bool Accept() {
    bool did = false;
    for (;;) {
      const int fd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) break;
      greetings.push_back(Greeting{UniqueFd(fd), {}, Clock::now() + options.connect_timeout});
      did = true;
    }
    for (size_t i = 0; i < greetings.size();) {
      Greeting& g = greetings[i];
      char buf[sizeof(Hello)];
      const ssize_t n = ::recv(g.sock.get(), buf, sizeof(Hello) - g.in.size(), MSG_DONTWAIT);
      if (n > 0) g.in.append(buf, static_cast<size_t>(n));
      const bool dead =
          n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
      if (g.in.size() == sizeof(Hello)) {
        Hello h;
        std::memcpy(&h, g.in.data(), sizeof(h));
        // Anything else (a stray connection, a wrong token) is closed below.
        if (h.magic == kHelloMagic && HelloTokenMatches(h, options.token)) {
          auto ch = Channel::Make(options.device, options.op_timeout);
          if (ch.ok() &&
              StartInit(ch->get(), std::string(h.unique_id, kUniqueIdBytes), kTargetRank).ok()) {
            Peer p;
            p.ch = std::move(*ch);
            p.ch->sock = std::move(g.sock);
            peers.push_back(std::move(p));
          }
        }
        greetings.erase(greetings.begin() + static_cast<std::ptrdiff_t>(i));
        did = true;
      } else if (dead || Clock::now() >= g.expires) {
        greetings.erase(greetings.begin() + static_cast<std::ptrdiff_t>(i));
        did = true;
      } else {
        ++i;
      }
    }
    return did;
  }

  // The bytes a header addresses lie inside a registration of ours, or the
  // connection ends: nothing is ever received outside registered memory.
  uint8_t* Resolve(const Header& h) const {
    auto it = regions.find(h.reg_id);
    if (it == regions.end() || it->second.addr != h.addr) return nullptr;
    if (h.offset > it->second.length || h.length > it->second.length - h.offset) return nullptr;
    return reinterpret_cast<uint8_t*>(it->second.addr) + h.offset;
  }

  // One step of `p`. false: the connection is over (closed, broken or misbehaving).
  bool Step(Peer& p, bool* did) {
    Channel& ch = *p.ch;
    bool busy = false;
    if (!p.comm_ready) {
      if (!ch.Poll(&busy).ok()) return false;
      if (busy) return ch.ReadSocket().ok();  // still notice a peer that went away
      p.comm_ready = true;
      *did = true;
    }
    if (!ch.ReadSocket().ok()) return false;
    switch (p.phase) {
      case Phase::kSettling:
        if (!ch.Poll(&busy).ok()) return false;
        if (busy) return true;
        p.phase = Phase::kReady;
        *did = true;
        return true;
      case Phase::kWaiting: {
        auto done = EventDone(ch, p.ev);
        if (!done.ok()) return false;
        if (!*done) return true;
        p.phase = Phase::kReady;
        *did = true;
        if (static_cast<Op>(p.cur.op) == Op::kNotify) {
          notes.push_back(std::move(p.note));
          p.note.clear();
        }
        // Flush and Notify complete at the initiator with this acknowledgement.
        return ch.SendControl(HeaderBytes(Op::kAck, 0, 0, 0, 0, p.cur.seq)).ok();
      }
      case Phase::kReady:
        break;
    }
    if (ch.inbuf.size() < sizeof(Header)) return true;
    Header h;
    std::memcpy(&h, ch.inbuf.data(), sizeof(h));
    if (h.magic != kHeaderMagic) return false;
    const Op op = static_cast<Op>(h.op);
    size_t consumed = sizeof(Header);
    if (op == Op::kNotify) {
      if (h.length > kMaxNotificationBytes) return false;
      if (ch.inbuf.size() < sizeof(Header) + h.length) return true;  // the rest is coming
      p.note.assign(ch.inbuf, sizeof(Header), h.length);
      consumed += h.length;
    }
    ch.inbuf.erase(0, consumed);
    p.cur = h;
    *did = true;
    ncclResult_t r = ncclSuccess;
    switch (op) {
      case Op::kWrite:
      case Op::kRead: {
        uint8_t* at = Resolve(h);
        if (at == nullptr) return false;
        if (h.length == 0) return true;
        r = op == Op::kWrite
                ? ncclRecv(at, h.length, ncclUint8, kInitiatorRank, ch.comm.get(), ch.stream.get())
                : ncclSend(at, h.length, ncclUint8, kInitiatorRank, ch.comm.get(), ch.stream.get());
        // The first one in each direction waits for NCCL's lazy connection
        // set-up, which needs the initiator: polled, never waited for here.
        if (r != ncclSuccess && r != ncclInProgress) return false;
        p.phase = Phase::kSettling;
        return true;
      }
      case Op::kFlush:
      case Op::kNotify: {
        auto ev = Record(ch);
        if (!ev.ok()) return false;
        p.ev = std::move(*ev);
        p.phase = Phase::kWaiting;
        return true;
      }
      case Op::kClose:
      case Op::kAck:
        return false;
    }
    return false;
  }

  bool Progress() {
    bool did = Accept();
    for (size_t i = 0; i < peers.size();) {
      bool alive = true;
      for (int n = 0; n < 256 && alive; ++n) {  // drain what is ready, then move on
        bool step = false;
        alive = Step(peers[i], &step);
        did |= step;
        if (!step) break;
      }
      if (alive) {
        ++i;
      } else {
        peers.erase(peers.begin() + static_cast<std::ptrdiff_t>(i));  // aborts its communicator
        did = true;
      }
    }
    return did;
  }
};

namespace {

// ---------------------------------------------------------------------------
// Initiator side.

// What an endpoint and its requests share.
struct Conn {
  std::unique_ptr<Channel> ch;
  std::shared_ptr<NcclTransport::Core> core;  // progressed while waiting
  uint64_t next_seq = 0;
  uint64_t acked = 0;  // highest flush sequence the target acknowledged

  // One round: the target side of this transport, acknowledgements, NCCL
  // errors; *busy (optional) tells whether the communicator is still settling.
  Status Poll(bool* busy = nullptr) {
    core->Progress();
    // Acknowledgements that arrived just before the socket closed still count.
    const Status socket = ch->ReadSocket();
    while (ch->inbuf.size() >= sizeof(Header)) {
      Header h;
      std::memcpy(&h, ch->inbuf.data(), sizeof(h));
      ch->inbuf.erase(0, sizeof(h));
      if (h.magic != kHeaderMagic || static_cast<Op>(h.op) != Op::kAck) {
        return ch->Broken(DataLoss("nccl: unexpected control message from the target"));
      }
      acked = std::max(acked, h.seq);
    }
    RELAYKV_RETURN_IF_ERROR(socket);
    bool settling = false;
    RELAYKV_RETURN_IF_ERROR(ch->Poll(&settling));
    if (busy != nullptr) *busy = settling;
    return Status::Ok();
  }

  // Enqueues an NCCL call and waits for a non-blocking communicator to settle
  // (the first call in each direction includes NCCL's connection set-up).
  Status Settle(ncclResult_t r, std::string_view what) {
    if (r != ncclSuccess && r != ncclInProgress) return ch->Broken(NcclError(r, what));
    const auto deadline = Clock::now() + ch->op_timeout;
    for (;;) {
      bool busy = false;
      RELAYKV_RETURN_IF_ERROR(Poll(&busy));
      if (!busy) return Status::Ok();
      if (Clock::now() >= deadline) {
        return ch->Broken(DeadlineExceeded("nccl: " + std::string(what) + " did not settle"));
      }
      std::this_thread::yield();
    }
  }
};

class NcclRequest final : public TransferRequest {
 public:
  // Completes when `ev` did (data ops), or when the target acknowledged
  // `ack_seq` (flush, notify).
  NcclRequest(std::shared_ptr<Conn> conn, EventPtr ev, uint64_t ack_seq)
      : conn_(std::move(conn)), ev_(std::move(ev)), ack_seq_(ack_seq) {}

  Status Wait(std::chrono::milliseconds timeout) override {
    DeviceScope scope(conn_->ch->device);
    RELAYKV_RETURN_IF_ERROR(scope.status());
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      RELAYKV_ASSIGN_OR_RETURN(bool done, Check());
      if (done) return Status::Ok();
      if (Clock::now() >= deadline) return DeadlineExceeded("nccl: operation still in flight");
      std::this_thread::yield();
    }
  }
  bool Test() override {
    DeviceScope scope(conn_->ch->device);
    auto done = Check();
    return !done.ok() || *done;
  }

 private:
  Result<bool> Check() {
    if (done_) return true;
    // An aborted communicator cancelled what was in flight; its events may
    // still complete, without the data.
    if (conn_->ch->aborted) return Unavailable("nccl: connection is closed: " + conn_->ch->why);
    RELAYKV_ASSIGN_OR_RETURN(done_, Finished());
    if (done_) return true;
    RELAYKV_RETURN_IF_ERROR(conn_->Poll());
    RELAYKV_ASSIGN_OR_RETURN(done_, Finished());
    return done_;
  }
  Result<bool> Finished() {
    if (ev_) return EventDone(*conn_->ch, ev_);
    return conn_->acked >= ack_seq_;
  }

  std::shared_ptr<Conn> conn_;
  EventPtr ev_;
  uint64_t ack_seq_;
  bool done_ = false;
};

class NcclEndpoint final : public Endpoint {
 public:
  explicit NcclEndpoint(std::shared_ptr<Conn> conn) : conn_(std::move(conn)) {}

  ~NcclEndpoint() override {
    DeviceScope scope(conn_->ch->device);
    if (!conn_->ch->broken) {
      (void)conn_->ch->SendControl(HeaderBytes(Op::kClose, 0, 0, 0, 0, ++conn_->next_seq));
    }
    conn_->ch->Close("nccl: endpoint destroyed");
  }

  Result<std::unique_ptr<TransferRequest>> Write(const void* local, size_t length,
                                                 const RemoteDescriptor& remote,
                                                 uint64_t offset) override {
    return Data(Op::kWrite, const_cast<void*>(local), length, remote, offset);
  }
  Result<std::unique_ptr<TransferRequest>> Read(void* local, size_t length,
                                                const RemoteDescriptor& remote,
                                                uint64_t offset) override {
    return Data(Op::kRead, local, length, remote, offset);
  }
  Result<std::unique_ptr<TransferRequest>> Flush() override {
    DeviceScope scope(conn_->ch->device);
    RELAYKV_RETURN_IF_ERROR(scope.status());
    const uint64_t seq = ++conn_->next_seq;
    RELAYKV_RETURN_IF_ERROR(conn_->ch->SendControl(HeaderBytes(Op::kFlush, 0, 0, 0, 0, seq)));
    return std::unique_ptr<TransferRequest>(new NcclRequest(conn_, nullptr, seq));
  }
  Result<std::unique_ptr<TransferRequest>> Notify(std::string_view message) override {
    if (message.size() > kMaxNotificationBytes) {
      return InvalidArgument("nccl: notification longer than " +
                             std::to_string(kMaxNotificationBytes) + " bytes");
    }
    // The target delivers it only after everything before it completed, then
    // acknowledges: completion means delivered, so closing after it loses nothing.
    DeviceScope scope(conn_->ch->device);
    RELAYKV_RETURN_IF_ERROR(scope.status());
    const uint64_t seq = ++conn_->next_seq;
    std::string bytes = HeaderBytes(Op::kNotify, 0, 0, 0, message.size(), seq);
    bytes.append(message);
    RELAYKV_RETURN_IF_ERROR(conn_->ch->SendControl(bytes));
    return std::unique_ptr<TransferRequest>(new NcclRequest(conn_, nullptr, seq));
  }
  bool healthy() const override { return !conn_->ch->broken; }

 private:
  Result<std::unique_ptr<TransferRequest>> Data(Op op, void* local, size_t length,
                                                const RemoteDescriptor& remote, uint64_t offset) {
    if (remote.kind != MemoryKind::kCudaDevice) {
      return InvalidArgument("nccl: the remote region is not GPU memory");
    }
    if (remote.access_key.size() != sizeof(uint64_t)) {
      return InvalidArgument("nccl: descriptor does not come from an NcclTransport");
    }
    if (offset > remote.length || length > remote.length - offset) {
      return InvalidArgument("nccl: [" + std::to_string(offset) + ", +" + std::to_string(length) +
                             ") is outside the remote region of " + std::to_string(remote.length) +
                             " bytes");
    }
    DeviceScope scope(conn_->ch->device);
    RELAYKV_RETURN_IF_ERROR(scope.status());
    if (length > 0) {  // checked before the header goes: the target would post its side
      cudaPointerAttributes attr{};
      if (local == nullptr || cudaPointerGetAttributes(&attr, local) != cudaSuccess ||
          attr.type != cudaMemoryTypeDevice || attr.device != conn_->ch->device) {
        cudaGetLastError();
        return InvalidArgument("nccl: the local buffer is not device memory of CUDA device " +
                               std::to_string(conn_->ch->device));
      }
    }
    uint64_t reg = 0;
    std::memcpy(&reg, remote.access_key.data(), sizeof(reg));
    Channel& ch = *conn_->ch;
    RELAYKV_RETURN_IF_ERROR(
        ch.SendControl(HeaderBytes(op, reg, remote.addr, offset, length, ++conn_->next_seq)));
    if (length > 0) {
      const ncclResult_t r =
          op == Op::kWrite
              ? ncclSend(local, length, ncclUint8, kTargetRank, ch.comm.get(), ch.stream.get())
              : ncclRecv(local, length, ncclUint8, kTargetRank, ch.comm.get(), ch.stream.get());
      RELAYKV_RETURN_IF_ERROR(conn_->Settle(r, op == Op::kWrite ? "ncclSend" : "ncclRecv"));
    }
    RELAYKV_ASSIGN_OR_RETURN(EventPtr ev, Record(ch));
    return std::unique_ptr<TransferRequest>(new NcclRequest(conn_, std::move(ev), 0));
  }

  std::shared_ptr<Conn> conn_;
};

class NcclRegistration final : public MemoryRegistration {
 public:
  NcclRegistration(std::shared_ptr<NcclTransport::Core> core, uint64_t id, void* addr,
                   size_t length, std::string descriptor)
      : MemoryRegistration(addr, length, MemoryKind::kCudaDevice, std::move(descriptor)),
        core_(std::move(core)),
        id_(id) {}
  ~NcclRegistration() override { core_->regions.erase(id_); }

 private:
  std::shared_ptr<NcclTransport::Core> core_;
  uint64_t id_;
};

}  // namespace

std::string NcclAddress::Pack() const {
  std::string out(kAddrMagic, 4);
  out.append(reinterpret_cast<const char*>(&kAddrVersion), sizeof(kAddrVersion));
  out.append(reinterpret_cast<const char*>(&port), sizeof(port));
  out.push_back(static_cast<char>(static_cast<uint8_t>(host.size())));
  out.append(host);
  return out;
}

Result<NcclAddress> NcclAddress::Parse(std::string_view blob) {
  if (blob.size() < kAddrFixedBytes || std::memcmp(blob.data(), kAddrMagic, 4) != 0) {
    return InvalidArgument("nccl: not an NcclTransport address blob");
  }
  uint32_t version = 0;
  std::memcpy(&version, blob.data() + 4, sizeof(version));
  if (version != kAddrVersion) {
    return InvalidArgument("nccl: address blob version " + std::to_string(version) +
                           ", this build reads " + std::to_string(kAddrVersion));
  }
  NcclAddress a;
  size_t at = 8;
  std::memcpy(&a.port, blob.data() + at, sizeof(a.port));
  at += sizeof(a.port);
  const size_t host_len = static_cast<uint8_t>(blob[at++]);
  if (blob.size() != at + host_len || host_len == 0 || a.port == 0) {
    return InvalidArgument("nccl: address blob has a bad host or port");
  }
  a.host.assign(blob.data() + at, host_len);
  return a;
}

Result<std::unique_ptr<NcclTransport>> NcclTransport::Create(const NcclTransportOptions& options) {
  int n = 0;
  if (cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess) {
    cudaGetLastError();
    return Unavailable(std::string("nccl: no CUDA device: ") + cudaGetErrorString(e));
  }
  if (options.device < 0 || options.device >= n) {
    return Unavailable("nccl: CUDA device " + std::to_string(options.device) + " of " +
                       std::to_string(n) + " requested");
  }
  if (options.token.size() > kMaxNcclTokenBytes) {
    return InvalidArgument("nccl: token longer than " + std::to_string(kMaxNcclTokenBytes) +
                           " bytes");
  }
  auto core = std::make_shared<Core>();
  core->options = options;
  std::string bound;
  RELAYKV_ASSIGN_OR_RETURN(core->listen_fd, net::ListenTcp(options.listen_host + ":0", &bound));
  const size_t colon = bound.rfind(':');
  core->port = static_cast<uint16_t>(std::stoul(bound.substr(colon + 1)));
  core->advertise = options.advertise_host.empty() ? net::PrimaryIpv4() : options.advertise_host;
  if (core->advertise.size() > 255) return InvalidArgument("nccl: advertise_host too long");
  return std::unique_ptr<NcclTransport>(new NcclTransport(std::move(core)));
}

NcclTransport::~NcclTransport() {
  DeviceScope scope(core_->options.device);
  core_->peers.clear();
}

Result<std::unique_ptr<MemoryRegistration>> NcclTransport::RegisterMemory(void* addr, size_t length,
                                                                          MemoryKind kind) {
  if (addr == nullptr || length == 0) return InvalidArgument("register: null address or length 0");
  if (kind != MemoryKind::kCudaDevice) {
    return Unimplemented("nccl moves GPU memory only; register host memory with UCX");
  }
  cudaPointerAttributes attr{};
  if (cudaError_t e = cudaPointerGetAttributes(&attr, addr); e != cudaSuccess) {
    return CudaError(e, "cudaPointerGetAttributes");
  }
  if (attr.type != cudaMemoryTypeDevice || attr.device != core_->options.device) {
    return InvalidArgument("nccl: register: not device memory of CUDA device " +
                           std::to_string(core_->options.device));
  }
  const uint64_t id = core_->next_reg++;
  core_->regions[id] = Core::Region{reinterpret_cast<uint64_t>(addr), length};
  RemoteDescriptor d;
  d.addr = reinterpret_cast<uint64_t>(addr);
  d.length = length;
  d.kind = MemoryKind::kCudaDevice;
  d.access_key.assign(reinterpret_cast<const char*>(&id), sizeof(id));
  return std::unique_ptr<MemoryRegistration>(
      new NcclRegistration(core_, id, addr, length, d.Pack()));
}

Result<std::string> NcclTransport::LocalAddress() {
  NcclAddress a;
  a.port = core_->port;
  a.host = core_->advertise;
  return a.Pack();
}

Result<std::unique_ptr<Endpoint>> NcclTransport::Connect(std::string_view peer_address) {
  RELAYKV_ASSIGN_OR_RETURN(NcclAddress a, NcclAddress::Parse(peer_address));
  DeviceScope scope(core_->options.device);
  RELAYKV_RETURN_IF_ERROR(scope.status());
  const auto deadline = Clock::now() + core_->options.connect_timeout;
  RELAYKV_ASSIGN_OR_RETURN(auto ch,
                           Channel::Make(core_->options.device, core_->options.op_timeout));
  auto fd = net::ConnectTcp(a.host + ":" + std::to_string(a.port), core_->options.connect_timeout);
  if (!fd.ok()) return fd.status().WithContext("nccl: connect: control socket");
  ch->sock = UniqueFd(*fd);
  // A fresh communicator per connection, rooted here; the target joins it
  // when the hello arrives.
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
    return NcclError(r, "ncclGetUniqueId");
  }
  Hello hello{};
  hello.magic = kHelloMagic;
  std::memcpy(hello.unique_id, id.internal, kUniqueIdBytes);
  hello.token_length = static_cast<uint32_t>(core_->options.token.size());
  std::memcpy(hello.token, core_->options.token.data(), core_->options.token.size());
  RELAYKV_RETURN_IF_ERROR(net::SendAll(
      ch->sock.get(), std::string_view(reinterpret_cast<const char*>(&hello), sizeof(hello)),
      deadline));
  if (Status s = StartInit(ch.get(), std::string(id.internal, kUniqueIdBytes), kInitiatorRank);
      !s.ok()) {
    return Unavailable("nccl: connect: " + s.ToString());
  }
  for (;;) {
    core_->Progress();  // this transport may be the other side's target too
    bool busy = false;
    if (Status s = ch->Poll(&busy); !s.ok()) return Unavailable("nccl: connect: " + s.ToString());
    // A target that cannot join closes the control socket.
    if (Status s = ch->ReadSocket(); !s.ok()) return Unavailable("nccl: connect: " + s.ToString());
    if (!busy) break;
    if (Clock::now() >= deadline) {
      return Unavailable("nccl: the target did not complete the communicator within " +
                         std::to_string(core_->options.connect_timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  auto conn = std::make_shared<Conn>();
  conn->ch = std::move(ch);
  conn->core = core_;
  return std::unique_ptr<Endpoint>(new NcclEndpoint(std::move(conn)));
}

Result<std::string> NcclTransport::WaitNotification(std::chrono::milliseconds timeout) {
  DeviceScope scope(core_->options.device);
  RELAYKV_RETURN_IF_ERROR(scope.status());
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (!core_->notes.empty()) {
      std::string out = std::move(core_->notes.front());
      core_->notes.pop_front();
      return out;
    }
    if (Clock::now() >= deadline) return DeadlineExceeded("nccl: no notification arrived");
    if (!core_->Progress()) std::this_thread::yield();
  }
}

bool NcclTransport::Progress() {
  DeviceScope scope(core_->options.device);
  return scope.status().ok() && core_->Progress();
}

size_t NcclTransport::served_peers() const { return core_->peers.size(); }

}  // namespace relaykv
