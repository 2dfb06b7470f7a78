#include "transfer/directory/redis_directory.h"

#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

namespace relaykv {

namespace {

// Lua scripts, indexed by RedisDirectory::Script. Each runs atomically in
// Redis. Names, namespaces and blobs travel as ARGV/KEYS strings, which Lua
// keeps byte-exact.

// Forgets every record a dead or withdrawn server `name` held (the ones it
// still holds: a record republished by another server stays). Records a
// server holds are listed in P:held:{name} as "<id>:<ns>" (the id has no
// ':'). No events are written: readers already stopped seeing these records
// when the holder died, and instances drop them from their span index at the
// first NotFound. Expects `name` and `prefix` ("P:") as Lua locals.
#define RELAYKV_REAP_HELD_LUA                                        \
  "local held = prefix .. 'held:' .. name\n"                         \
  "for _, m in ipairs(redis.call('SMEMBERS', held)) do\n"            \
  "  local c = string.find(m, ':', 1, true)\n"                       \
  "  local id, ns = string.sub(m, 1, c - 1), string.sub(m, c + 1)\n" \
  "  local rk = prefix .. 'rec:' .. ns .. ':' .. id\n"               \
  "  if redis.call('HGET', rk, 'server') == name then\n"             \
  "    redis.call('DEL', rk)\n"                                      \
  "    redis.call('SREM', prefix .. 'ids:' .. ns, id)\n"             \
  "  end\n"                                                          \
  "end\n"                                                            \
  "redis.call('DEL', held)\n"

// KEYS: server hash, servers set. ARGV: name, control_address, transport,
// transport_address, capacity_bytes, bytes_used, ttl_ms.
constexpr char kAnnounceLua[] = R"lua(
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'control_address', ARGV[2], 'transport', ARGV[3],
           'transport_address', ARGV[4], 'capacity_bytes', ARGV[5], 'bytes_used', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
)lua";

// KEYS: server hash, servers set. ARGV: name, key prefix ("P:").
constexpr char kWithdrawLua[] =
    "local name, prefix = ARGV[1], ARGV[2]\n" RELAYKV_REAP_HELD_LUA R"lua(
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
)lua";

// KEYS: servers set. ARGV: server key prefix ("P:server:"), key prefix ("P:").
// Returns a flat array of 6 fields per live server; forgets expired names and
// the records they held.
constexpr char kLiveServersLua[] = R"lua(
local out = {}
local prefix = ARGV[2]
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. name, 'control_address', 'transport',
                       'transport_address', 'capacity_bytes', 'bytes_used')
  if v[1] then
    out[#out + 1] = name
    for i = 1, 5 do out[#out + 1] = v[i] end
  else
    redis.call('SREM', KEYS[1], name)
)lua" RELAYKV_REAP_HELD_LUA R"lua(
  end
end
return out
)lua";

// KEYS: holder's server hash, record hash, seq counter, events zset, ids set,
// holder's held set. ARGV: server, length, seq_begin, tokens, packed event,
// trim stop ('' = keep all), id, ns. Returns the new seq, or -1 when the
// holder is not alive.
constexpr char kPublishLua[] = R"lua(
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local seq = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[2])
redis.call('SADD', KEYS[6], ARGV[7] .. ':' .. ARGV[8])
redis.call('HSET', KEYS[2], 'server', ARGV[1], 'length', ARGV[2], 'seq_begin', ARGV[3],
           'tokens', ARGV[4])
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('ZADD', KEYS[4], seq, string.format('%d', seq) .. ':' .. ARGV[5])
if ARGV[6] ~= '' then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, ARGV[6]) end
return seq
)lua";

// KEYS: record hash, seq counter, events zset, ids set, holder's held set.
// ARGV: server, packed event, trim stop, id, ns. Returns the new seq, or 0
// when `server` does not hold the record (nothing changes then).
constexpr char kRemoveLua[] = R"lua(
redis.call('SREM', KEYS[5], ARGV[4] .. ':' .. ARGV[5])
if redis.call('HGET', KEYS[1], 'server') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[4])
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[3], seq, string.format('%d', seq) .. ':' .. ARGV[2])
if ARGV[3] ~= '' then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, ARGV[3]) end
return seq
)lua";

// KEYS: record hash. ARGV: server key prefix. Returns {server, length,
// seq_begin, tokens}, or nil when missing or its holder is gone.
constexpr char kFindRecordLua[] = R"lua(
local v = redis.call('HMGET', KEYS[1], 'server', 'length', 'seq_begin', 'tokens')
if not v[1] then return false end
if redis.call('EXISTS', ARGV[1] .. v[1]) == 0 then return false end
return v
)lua";

// KEYS: ids set. ARGV: record key prefix ("P:rec:{ns}:"), server key prefix.
// Returns 5 fields per record whose holder is alive: id, server, length,
// seq_begin, tokens.
constexpr char kListRecordsLua[] = R"lua(
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'server', 'length', 'seq_begin', 'tokens')
  if not v[1] then
    redis.call('SREM', KEYS[1], id)
  elseif redis.call('EXISTS', ARGV[2] .. v[1]) == 1 then
    out[#out + 1] = id
    for i = 1, 4 do out[#out + 1] = v[i] end
  end
end
return out
)lua";

// KEYS: seq counter, events zset. ARGV: after_seq, limit.
// Returns {last_seq, oldest kept member or '', members after after_seq...}.
constexpr char kEventsSinceLua[] = R"lua(
local last = redis.call('GET', KEYS[1]) or '0'
local first = redis.call('ZRANGE', KEYS[2], 0, 0)
local out = {last, first[1] or ''}
if tonumber(ARGV[2]) > 0 then
  local evs = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
  for i = 1, #evs do out[#out + 1] = evs[i] end
end
return out
)lua";

constexpr std::array<const char*, 8> kScripts = {
    kAnnounceLua, kWithdrawLua,   kLiveServersLua, kPublishLua,
    kRemoveLua,   kFindRecordLua, kListRecordsLua, kEventsSinceLua,
};

constexpr char kAcceptedForms[] =
    "accepted forms: \"redis://host:port[/db]\" (port defaults to "
    "6379, db to 0; IPv6 hosts in brackets)";

timeval ToTimeval(std::chrono::milliseconds ms) {
  if (ms <= std::chrono::milliseconds::zero()) ms = std::chrono::milliseconds(1);
  timeval tv;
  tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((ms.count() % 1000) * 1000);
  return tv;
}

template <typename T>
bool ParseInt(std::string_view s, T& out) {
  if (s.empty()) return false;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && ptr == s.data() + s.size();
}

// hiredis writes with write(2): a peer that reset the connection would raise
// SIGPIPE and kill the process. Block it on this thread for the duration of a
// call and swallow one that arrives meanwhile, leaving the process's signal
// disposition alone.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~ScopedSigpipeBlock() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{0, 0};
        sigtimedwait(&pipe_, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t pipe_;
  sigset_t old_;
  bool was_pending_ = false;
};

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetLe(std::string_view s, size_t pos, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(s[pos + i])) << (8 * i);
  }
  return v;
}

std::string PackTokens(const std::vector<int32_t>& tokens) {
  std::string out;
  out.reserve(tokens.size() * 4);
  for (int32_t t : tokens) PutU32(out, static_cast<uint32_t>(t));
  return out;
}

bool UnpackTokens(std::string_view blob, std::vector<int32_t>& tokens) {
  if (blob.size() % 4 != 0) return false;
  tokens.resize(blob.size() / 4);
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(static_cast<uint32_t>(GetLe(blob, 4 * i, 4)));
  }
  return true;
}

// Event payload (after the "<seq>:" that the script puts in front):
// kind u8 | id u64 | length u64 | seq_begin i32 | server_len u32 | server |
// tokens (int32 LE). ns is implied by the key.
std::string PackEvent(DirectoryEvent::Kind kind, const RecordEntry& e) {
  std::string out;
  out.push_back(static_cast<char>(kind));
  PutU64(out, e.id);
  PutU64(out, e.length);
  PutU32(out, static_cast<uint32_t>(e.seq_begin));
  PutU32(out, static_cast<uint32_t>(e.server.size()));
  out += e.server;
  out += PackTokens(e.tokens);
  return out;
}

bool UnpackEvent(std::string_view member, std::string_view ns, DirectoryEvent& ev) {
  const size_t colon = member.find(':');
  if (colon == std::string_view::npos || !ParseInt(member.substr(0, colon), ev.seq)) return false;
  std::string_view p = member.substr(colon + 1);
  constexpr size_t kFixed = 1 + 8 + 8 + 4 + 4;
  if (p.size() < kFixed) return false;
  const uint8_t kind = static_cast<uint8_t>(p[0]);
  if (kind > static_cast<uint8_t>(DirectoryEvent::Kind::kRemoved)) return false;
  ev.kind = static_cast<DirectoryEvent::Kind>(kind);
  ev.entry.ns = std::string(ns);
  ev.entry.id = GetLe(p, 1, 8);
  ev.entry.length = GetLe(p, 9, 8);
  ev.entry.seq_begin = static_cast<int32_t>(static_cast<uint32_t>(GetLe(p, 17, 4)));
  const uint64_t server_len = GetLe(p, 21, 4);
  if (p.size() < kFixed + server_len) return false;
  ev.entry.server = std::string(p.substr(kFixed, server_len));
  return UnpackTokens(p.substr(kFixed + server_len), ev.entry.tokens);
}

std::string_view Str(const redisReply* r) {
  if (r == nullptr || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_STATUS &&
                       r->type != REDIS_REPLY_ERROR)) {
    return {};
  }
  return std::string_view(r->str, r->len);
}

bool IsString(const redisReply* r) { return r != nullptr && r->type == REDIS_REPLY_STRING; }

// Fills `e` (ns and id already set) from {server, length, seq_begin, tokens}.
bool ParseRecordFields(redisReply* const* f, RecordEntry& e) {
  for (int i = 0; i < 4; ++i) {
    if (!IsString(f[i])) return false;
  }
  e.server = std::string(Str(f[0]));
  return ParseInt(Str(f[1]), e.length) && ParseInt(Str(f[2]), e.seq_begin) &&
         UnpackTokens(Str(f[3]), e.tokens);
}

}  // namespace

Result<std::unique_ptr<RedisDirectory>> RedisDirectory::Open(std::string_view url,
                                                             const DirectoryOptions& options) {
  auto bad = [&](std::string_view why) {
    return InvalidArgument("directory url '" + std::string(url) + "': " + std::string(why) + "; " +
                           kAcceptedForms);
  };
  constexpr std::string_view kScheme = "redis://";
  if (!url.starts_with(kScheme)) return bad("scheme must be redis://");
  std::string_view rest = url.substr(kScheme.size());
  std::string_view authority = rest;
  int db = 0;
  if (const size_t slash = rest.find('/'); slash != std::string_view::npos) {
    authority = rest.substr(0, slash);
    const std::string_view db_str = rest.substr(slash + 1);
    if (!db_str.empty() && (!ParseInt(db_str, db) || db < 0)) {
      return bad("database must be a non-negative integer, got '" + std::string(db_str) + "'");
    }
  }
  if (authority.find('@') != std::string_view::npos) {
    return bad("credentials in the url are not supported");
  }
  std::string_view host = authority;
  std::string_view port_str;
  if (authority.starts_with('[')) {
    const size_t close = authority.find(']');
    if (close == std::string_view::npos) return bad("unterminated '[' in IPv6 host");
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return bad("expected ':port' after ']'");
      port_str = after.substr(1);
    }
  } else if (const size_t colon = authority.rfind(':'); colon != std::string_view::npos) {
    host = authority.substr(0, colon);
    port_str = authority.substr(colon + 1);
  }
  if (host.empty()) return bad("missing host");
  int port = 6379;
  if (!port_str.empty() || authority.ends_with(':')) {
    if (!ParseInt(port_str, port) || port <= 0 || port > 65535) {
      return bad("port must be 1..65535, got '" + std::string(port_str) + "'");
    }
  }
  if (options.key_prefix.empty()) {
    return InvalidArgument("DirectoryOptions.key_prefix must not be empty for Redis");
  }
  return std::unique_ptr<RedisDirectory>(
      new RedisDirectory(std::string(url), std::string(host), port, db, options));
}

RedisDirectory::RedisDirectory(std::string url, std::string host, int port, int db,
                               const DirectoryOptions& options)
    : url_(std::move(url)), host_(std::move(host)), port_(port), db_(db), options_(options) {}

Status RedisDirectory::Fail(std::string_view what) const {
  return Unavailable("directory " + url_ + ": " + std::string(what));
}

Status RedisDirectory::ConnectLocked() {
  if (ctx_) return Status::Ok();
  const timeval tv = ToTimeval(options_.timeout);
  ContextPtr ctx(redisConnectWithTimeout(host_.c_str(), port_, tv));
  if (!ctx) return Fail("cannot allocate a hiredis context");
  if (ctx->err) return Fail(std::string("cannot connect: ") + ctx->errstr);
  if (redisSetTimeout(ctx.get(), tv) != REDIS_OK) {
    return Fail(std::string("cannot set the command timeout: ") + ctx->errstr);
  }
  ctx_ = std::move(ctx);
  // Any failure below leaves ctx_ null, so the next call starts over.
  auto fail_setup = [&](Status s) {
    ctx_.reset();
    return s;
  };
  if (db_ != 0) {
    auto r = CommandLocked({"SELECT", std::to_string(db_)});
    if (!r.ok()) return fail_setup(r.status());
    if ((*r)->type == REDIS_REPLY_ERROR) {
      return fail_setup(Fail("SELECT " + std::to_string(db_) + ": " + std::string(Str(r->get()))));
    }
  }
  static_assert(kScripts.size() == kNumScripts, "one script text per Script value");
  shas_.assign(kNumScripts, std::string());
  for (size_t i = 0; i < kNumScripts; ++i) {
    auto r = CommandLocked({"SCRIPT", "LOAD", kScripts[i]});
    if (!r.ok()) return fail_setup(r.status());
    if (!IsString(r->get())) {
      return fail_setup(Fail("SCRIPT LOAD failed: " + std::string(Str(r->get()))));
    }
    shas_[i] = std::string(Str(r->get()));
  }
  return Status::Ok();
}

Result<RedisDirectory::ReplyPtr> RedisDirectory::CommandLocked(
    const std::vector<std::string>& argv) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  ptrs.reserve(argv.size());
  lens.reserve(argv.size());
  for (const std::string& a : argv) {
    ptrs.push_back(a.data());
    lens.push_back(a.size());
  }
  ReplyPtr reply;
  int err = 0;  // errno of a failed read, before signal calls can clobber it
  {
    ScopedSigpipeBlock no_sigpipe;
    reply.reset(static_cast<redisReply*>(
        redisCommandArgv(ctx_.get(), static_cast<int>(argv.size()), ptrs.data(), lens.data())));
    err = errno;
  }
  if (!reply || ctx_->err) {
    std::string why = ctx_->err ? std::string(ctx_->errstr) : "no reply";
    if (ctx_->err == REDIS_ERR_IO && (err == EAGAIN || err == EWOULDBLOCK)) {
      why = "no reply within the " + std::to_string(options_.timeout.count()) + " ms timeout";
    }
    // The stream is in an unknown state (a reply may still be on its way):
    // never reuse it.
    ctx_.reset();
    return Fail(why);
  }
  return reply;
}

Result<RedisDirectory::ReplyPtr> RedisDirectory::Eval(Script s,
                                                      const std::vector<std::string>& keys,
                                                      const std::vector<std::string>& args) {
  RELAYKV_RETURN_IF_ERROR(ConnectLocked());
  std::vector<std::string> argv;
  argv.reserve(3 + keys.size() + args.size());
  argv.push_back("EVALSHA");
  argv.push_back(shas_[s]);
  argv.push_back(std::to_string(keys.size()));
  argv.insert(argv.end(), keys.begin(), keys.end());
  argv.insert(argv.end(), args.begin(), args.end());
  RELAYKV_ASSIGN_OR_RETURN(ReplyPtr reply, CommandLocked(argv));
  if (reply->type == REDIS_REPLY_ERROR && Str(reply.get()).starts_with("NOSCRIPT")) {
    // The script cache was flushed (SCRIPT FLUSH, failover): send the text.
    argv[0] = "EVAL";
    argv[1] = kScripts[s];
    RELAYKV_ASSIGN_OR_RETURN(reply, CommandLocked(argv));
  }
  if (reply->type == REDIS_REPLY_ERROR) {
    return Fail("Redis error: " + std::string(Str(reply.get())));
  }
  return reply;
}

std::string RedisDirectory::Key(std::string_view kind, std::string_view rest) const {
  std::string key = options_.key_prefix;
  key += ':';
  key += kind;
  key += ':';
  key += rest;
  return key;
}

std::string RedisDirectory::RecordKey(std::string_view ns, uint64_t id) const {
  // ns may contain ':', but the id after the last ':' is all digits, so
  // (ns, id) -> key stays one-to-one.
  return Key("rec", std::string(ns) + ":" + std::to_string(id));
}

std::string RedisDirectory::TrimStop() const {
  if (options_.max_events == 0) return "-1";
  if (options_.max_events >= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return "";
  return std::to_string(-static_cast<int64_t>(options_.max_events) - 1);
}

Status RedisDirectory::AnnounceServer(const ServerInfo& info, std::chrono::milliseconds ttl) {
  if (info.name.empty()) return InvalidArgument("AnnounceServer: empty server name");
  if (ttl <= std::chrono::milliseconds::zero()) {
    return InvalidArgument("AnnounceServer: ttl must be > 0, got " + std::to_string(ttl.count()) +
                           " ms");
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto r = Eval(kAnnounce, {Key("server", info.name), options_.key_prefix + ":servers"},
                {info.name, info.control_address, info.transport, info.transport_address,
                 std::to_string(info.capacity_bytes), std::to_string(info.bytes_used),
                 std::to_string(ttl.count())});
  return r.ok() ? Status::Ok() : r.status();
}

Status RedisDirectory::WithdrawServer(std::string_view name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto r = Eval(kWithdraw, {Key("server", name), options_.key_prefix + ":servers"},
                {std::string(name), options_.key_prefix + ":"});
  return r.ok() ? Status::Ok() : r.status();
}

Result<std::vector<ServerInfo>> RedisDirectory::LiveServers() {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_ASSIGN_OR_RETURN(ReplyPtr r, Eval(kLiveServers, {options_.key_prefix + ":servers"},
                                            {Key("server", ""), options_.key_prefix + ":"}));
  if (r->type != REDIS_REPLY_ARRAY || r->elements % 6 != 0) {
    return Fail("unexpected reply to LiveServers");
  }
  std::vector<ServerInfo> out;
  for (size_t i = 0; i < r->elements; i += 6) {
    redisReply* const* f = r->element + i;
    ServerInfo info;
    info.name = std::string(Str(f[0]));
    info.control_address = std::string(Str(f[1]));
    info.transport = std::string(Str(f[2]));
    info.transport_address = std::string(Str(f[3]));
    if (!ParseInt(Str(f[4]), info.capacity_bytes) || !ParseInt(Str(f[5]), info.bytes_used)) {
      return Fail("malformed server entry '" + info.name + "'");
    }
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(),
            [](const ServerInfo& a, const ServerInfo& b) { return a.name < b.name; });
  return out;
}

Result<std::optional<ServerInfo>> RedisDirectory::FindServer(std::string_view name) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_RETURN_IF_ERROR(ConnectLocked());
  RELAYKV_ASSIGN_OR_RETURN(
      ReplyPtr r, CommandLocked({"HMGET", Key("server", name), "control_address", "transport",
                                 "transport_address", "capacity_bytes", "bytes_used"}));
  if (r->type == REDIS_REPLY_ERROR) return Fail("Redis error: " + std::string(Str(r.get())));
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 5) return Fail("unexpected reply to HMGET");
  if (!IsString(r->element[0])) return std::optional<ServerInfo>();
  ServerInfo info;
  info.name = std::string(name);
  info.control_address = std::string(Str(r->element[0]));
  info.transport = std::string(Str(r->element[1]));
  info.transport_address = std::string(Str(r->element[2]));
  if (!ParseInt(Str(r->element[3]), info.capacity_bytes) ||
      !ParseInt(Str(r->element[4]), info.bytes_used)) {
    return Fail("malformed server entry '" + info.name + "'");
  }
  return std::optional<ServerInfo>(std::move(info));
}

Status RedisDirectory::PublishRecord(const RecordEntry& entry) {
  if (entry.ns.empty()) return InvalidArgument("PublishRecord: empty namespace");
  if (entry.server.empty()) return InvalidArgument("PublishRecord: empty server name");
  const std::string id = std::to_string(entry.id);
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_ASSIGN_OR_RETURN(
      ReplyPtr r,
      Eval(kPublish,
           {Key("server", entry.server), RecordKey(entry.ns, entry.id), Key("seq", entry.ns),
            Key("events", entry.ns), Key("ids", entry.ns), Key("held", entry.server)},
           {entry.server, std::to_string(entry.length), std::to_string(entry.seq_begin),
            PackTokens(entry.tokens), PackEvent(DirectoryEvent::Kind::kAdded, entry), TrimStop(),
            id, entry.ns}));
  if (r->type != REDIS_REPLY_INTEGER) return Fail("unexpected reply to PublishRecord");
  if (r->integer < 0) {
    return FailedPrecondition("PublishRecord: holder '" + entry.server +
                              "' is not a live server (never announced, withdrawn or expired)");
  }
  return Status::Ok();
}

Status RedisDirectory::RemoveRecord(std::string_view ns, uint64_t id, std::string_view server) {
  RecordEntry removed;
  removed.ns = std::string(ns);
  removed.id = id;
  removed.server = std::string(server);
  std::lock_guard<std::mutex> lock(mu_);
  auto r = Eval(
      kRemove,
      {RecordKey(ns, id), Key("seq", ns), Key("events", ns), Key("ids", ns), Key("held", server)},
      {removed.server, PackEvent(DirectoryEvent::Kind::kRemoved, removed), TrimStop(),
       std::to_string(id), removed.ns});
  return r.ok() ? Status::Ok() : r.status();
}

Result<std::optional<RecordEntry>> RedisDirectory::FindRecord(std::string_view ns, uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_ASSIGN_OR_RETURN(ReplyPtr r, Eval(kFindRecord, {RecordKey(ns, id)}, {Key("server", "")}));
  if (r->type == REDIS_REPLY_NIL) return std::optional<RecordEntry>();
  if (r->type != REDIS_REPLY_ARRAY || r->elements != 4) {
    return Fail("unexpected reply to FindRecord");
  }
  RecordEntry e;
  e.ns = std::string(ns);
  e.id = id;
  if (!ParseRecordFields(r->element, e)) {
    return Fail("malformed record " + std::to_string(id));
  }
  return std::optional<RecordEntry>(std::move(e));
}

Result<std::vector<RecordEntry>> RedisDirectory::ListRecords(std::string_view ns) {
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_ASSIGN_OR_RETURN(
      ReplyPtr r,
      Eval(kListRecords, {Key("ids", ns)}, {Key("rec", std::string(ns) + ":"), Key("server", "")}));
  if (r->type != REDIS_REPLY_ARRAY || r->elements % 5 != 0) {
    return Fail("unexpected reply to ListRecords");
  }
  std::vector<RecordEntry> out;
  out.reserve(r->elements / 5);
  for (size_t i = 0; i < r->elements; i += 5) {
    RecordEntry e;
    e.ns = std::string(ns);
    if (!ParseInt(Str(r->element[i]), e.id) || !ParseRecordFields(r->element + i + 1, e)) {
      return Fail("malformed record '" + std::string(Str(r->element[i])) + "'");
    }
    out.push_back(std::move(e));
  }
  std::sort(out.begin(), out.end(),
            [](const RecordEntry& a, const RecordEntry& b) { return a.id < b.id; });
  return out;
}

Result<EventBatch> RedisDirectory::EventsSince(std::string_view ns, uint64_t after_seq,
                                               size_t max_events) {
  const uint64_t limit =
      std::min<uint64_t>(max_events, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
  std::lock_guard<std::mutex> lock(mu_);
  RELAYKV_ASSIGN_OR_RETURN(ReplyPtr r, Eval(kEventsSince, {Key("seq", ns), Key("events", ns)},
                                            {std::to_string(after_seq), std::to_string(limit)}));
  if (r->type != REDIS_REPLY_ARRAY || r->elements < 2) {
    return Fail("unexpected reply to EventsSince");
  }
  EventBatch batch;
  if (!ParseInt(Str(r->element[0]), batch.last_seq)) return Fail("malformed event counter");
  uint64_t first_kept = batch.last_seq + 1;
  if (const std::string_view first = Str(r->element[1]); !first.empty()) {
    const size_t colon = first.find(':');
    if (colon == std::string_view::npos || !ParseInt(first.substr(0, colon), first_kept)) {
      return Fail("malformed event");
    }
  }
  // A reader ahead of last_seq saw history that Redis has since lost (it
  // restarted without persistence): it must resynchronise too.
  batch.truncated = after_seq + 1 < first_kept || after_seq > batch.last_seq;
  if (batch.truncated) return batch;
  batch.events.reserve(r->elements - 2);
  for (size_t i = 2; i < r->elements; ++i) {
    DirectoryEvent ev;
    if (!UnpackEvent(Str(r->element[i]), ns, ev)) return Fail("malformed event");
    batch.events.push_back(std::move(ev));
  }
  return batch;
}

}  // namespace relaykv
