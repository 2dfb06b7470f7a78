// relaykv-store: a store server process. See store_server.h; flags below.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "transfer/server/store_server.h"

namespace {

constexpr const char* kUsage = R"(usage: relaykv-store [flags]

  --name PREFIX             server name prefix (default: hostname); a random suffix is added
  --listen HOST:PORT        control socket (default 0.0.0.0:7600; port 0 picks one)
  --advertise HOST:PORT     control address announced in the directory (default: the bound one)
  --metrics-listen HOST:PORT  HTTP /metrics, /healthz, /readyz (default 0.0.0.0:9600; "" turns it off)
  --capacity SIZE           record memory, e.g. 8GiB, 512MiB, 1000000 (default 1GiB)
  --segments N              split the memory in N registered segments (default 1)
  --high-watermark F        start evicting above this fraction (default 0.9)
  --low-watermark F         evict down to this fraction (default 0.8)
  --record-ttl SECONDS      records expire this long after sealing (default 0: never)
  --directory URL           embedded | redis://host:port[/db] (default embedded)
  --heartbeat-ms N          directory heartbeat (default 1000; the entry lives 3x this)
  --token-file PATH         deployment token (or env RELAYKV_TOKEN); required for any access
  --allow-unauthenticated   run without a token (trusted single-user machines only)
  --ucx-tls LIST            UCX transports, UCX_TLS syntax (default: UCX's choice / UCX_TLS)
  --verify-payload          also verify KV payload checksums at seal (importers always do)
  --no-shared-segments      private memory instead of sysv shared memory (clients on this
                            host then reach records through a cma syscall, not a mapping)
)";

bool ParseSize(std::string_view s, uint64_t* out) {
  size_t i = 0;
  uint64_t v = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9')
    v = v * 10 + static_cast<uint64_t>(s[i++] - '0');
  if (i == 0) return false;
  const std::string_view unit = s.substr(i);
  uint64_t mul = 1;
  if (unit.empty() || unit == "B")
    mul = 1;
  else if (unit == "KiB" || unit == "K")
    mul = 1ull << 10;
  else if (unit == "MiB" || unit == "M")
    mul = 1ull << 20;
  else if (unit == "GiB" || unit == "G")
    mul = 1ull << 30;
  else if (unit == "TiB" || unit == "T")
    mul = 1ull << 40;
  else
    return false;
  *out = v * mul;
  return true;
}

[[noreturn]] void Die(const std::string& msg) {
  std::cerr << "relaykv-store: " << msg << "\n";
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  relaykv::StoreServerOptions o;
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) == 0 && host[0] != '\0') o.name = host;
  o.listen = "0.0.0.0:7600";
  o.metrics_listen = "0.0.0.0:9600";
  o.store.capacity_bytes = 1ull << 30;
  std::string token_file;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) Die(a + " needs a value");
      return args[++i];
    };
    auto number = [&](const std::string& v) {
      char* end = nullptr;
      const double d = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0') Die(a + ": expected a number, got '" + v + "'");
      return d;
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--name") {
      o.name = value();
    } else if (a == "--listen") {
      o.listen = value();
    } else if (a == "--advertise") {
      o.advertise = value();
    } else if (a == "--metrics-listen") {
      o.metrics_listen = value();
    } else if (a == "--capacity") {
      const std::string& v = value();
      if (!ParseSize(v, &o.store.capacity_bytes)) {
        Die("--capacity: expected a size like 8GiB, 512MiB or bytes, got '" + v + "'");
      }
    } else if (a == "--segments") {
      o.store.num_segments = static_cast<uint32_t>(number(value()));
    } else if (a == "--high-watermark") {
      o.store.high_watermark = number(value());
    } else if (a == "--low-watermark") {
      o.store.low_watermark = number(value());
    } else if (a == "--record-ttl") {
      o.store.default_ttl = std::chrono::milliseconds(static_cast<int64_t>(number(value()) * 1000));
    } else if (a == "--directory") {
      o.directory = value();
    } else if (a == "--heartbeat-ms") {
      o.heartbeat = std::chrono::milliseconds(static_cast<int64_t>(number(value())));
    } else if (a == "--token-file") {
      token_file = value();
    } else if (a == "--allow-unauthenticated") {
      o.allow_unauthenticated = true;
    } else if (a == "--no-shared-segments") {
      o.shared_segments = false;
    } else if (a == "--verify-payload") {
      o.verify_payload = true;
    } else if (a == "--ucx-tls") {
      o.ucx_tls = value();
    } else {
      Die("unknown flag '" + a + "'\n" + kUsage);
    }
  }
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    if (!in) Die("--token-file: cannot read '" + token_file + "'");
    std::stringstream ss;
    ss << in.rdbuf();
    o.token = ss.str();
    while (!o.token.empty() &&
           (o.token.back() == '\n' || o.token.back() == '\r' || o.token.back() == ' ')) {
      o.token.pop_back();
    }
    if (o.token.empty()) Die("--token-file: '" + token_file + "' is empty");
  } else if (const char* env = std::getenv("RELAYKV_TOKEN"); env != nullptr && *env != '\0') {
    o.token = env;
  }

  // Signals are taken synchronously below; block them before any thread starts.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  auto server = relaykv::StoreServer::Create(o);
  if (!server.ok()) Die(server.status().ToString());
  if (relaykv::Status s = (*server)->Start(); !s.ok()) Die(s.ToString());
  const auto& info = (*server)->info();
  // One parseable line: tests and launchers wait for it.
  std::cout << "relaykv-store ready name=" << info.name << " control=" << info.control_address
            << " metrics=" << (info.metrics_address.empty() ? "off" : info.metrics_address)
            << " capacity=" << o.store.capacity_bytes << " directory=" << o.directory << std::endl;
  int sig = 0;
  sigwait(&sigs, &sig);
  std::cout << "relaykv-store: signal " << sig << ", shutting down" << std::endl;
  (*server)->Shutdown();
  return 0;
}
