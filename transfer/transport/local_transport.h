// LocalTransport: the Transport interface inside one process, by memcpy.
//
// For the embedded store and for tests of code above the transport. Every
// LocalTransport in the process is reachable by Connect() through a
// process-wide table, so two instances behave like two peers. Operations
// complete before Write/Read return; Notify delivers at once. A descriptor
// whose registration was destroyed is rejected (NotFound), never copied to.
// Host memory only.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "transfer/transport/transport.h"

namespace relaykv {

class LocalTransport final : public Transport {
 public:
  LocalTransport();
  ~LocalTransport() override;
  LocalTransport(const LocalTransport&) = delete;
  LocalTransport& operator=(const LocalTransport&) = delete;

  std::string_view name() const override { return "local"; }
  Result<std::unique_ptr<MemoryRegistration>> RegisterMemory(void* addr, size_t length,
                                                             MemoryKind kind) override;
  Result<std::string> LocalAddress() override;
  Result<std::unique_ptr<Endpoint>> Connect(std::string_view peer_address) override;
  Result<std::string> WaitNotification(std::chrono::milliseconds timeout) override;
  bool Progress() override { return false; }

  // Shared with endpoints and registrations, which may outlive this object.
  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace relaykv
