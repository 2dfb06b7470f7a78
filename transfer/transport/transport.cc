#include "transfer/transport/transport.h"

#include <cstring>

namespace relaykv {
namespace {

constexpr char kMagic[4] = {'R', 'K', 'V', 'D'};
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderBytes = 4 + 2 + 1 + 1 + 8 + 8 + 4;

template <typename T>
void PutLe(std::string& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
template <typename T>
T GetLe(const char* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

}  // namespace

std::string RemoteDescriptor::Pack() const {
  std::string out;
  out.reserve(kHeaderBytes + access_key.size());
  out.append(kMagic, 4);
  PutLe<uint16_t>(out, kVersion);
  out.push_back(static_cast<char>(kind));
  out.push_back(0);
  PutLe<uint64_t>(out, addr);
  PutLe<uint64_t>(out, length);
  PutLe<uint32_t>(out, static_cast<uint32_t>(access_key.size()));
  out += access_key;
  return out;
}

Result<RemoteDescriptor> RemoteDescriptor::Parse(std::string_view blob) {
  if (blob.size() < kHeaderBytes) {
    return InvalidArgument("remote descriptor: " + std::to_string(blob.size()) +
                           " bytes, shorter than the " + std::to_string(kHeaderBytes) +
                           "-byte header");
  }
  const char* p = blob.data();
  if (std::memcmp(p, kMagic, 4) != 0) return InvalidArgument("remote descriptor: bad magic");
  if (GetLe<uint16_t>(p + 4) != kVersion) {
    return InvalidArgument("remote descriptor: unsupported version " +
                           std::to_string(GetLe<uint16_t>(p + 4)));
  }
  const uint8_t kind = static_cast<uint8_t>(p[6]);
  if (kind > static_cast<uint8_t>(MemoryKind::kCudaDevice)) {
    return InvalidArgument("remote descriptor: unknown memory kind " + std::to_string(kind));
  }
  RemoteDescriptor d;
  d.kind = static_cast<MemoryKind>(kind);
  d.addr = GetLe<uint64_t>(p + 8);
  d.length = GetLe<uint64_t>(p + 16);
  const uint32_t key_len = GetLe<uint32_t>(p + 24);
  if (blob.size() != kHeaderBytes + key_len) {
    return InvalidArgument("remote descriptor: key length " + std::to_string(key_len) +
                           " does not match blob size " + std::to_string(blob.size()));
  }
  if (d.length == 0) return InvalidArgument("remote descriptor: zero-length region");
  if (d.addr + d.length < d.addr) return InvalidArgument("remote descriptor: region wraps");
  d.access_key.assign(p + kHeaderBytes, key_len);
  return d;
}

}  // namespace relaykv
