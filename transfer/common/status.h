// Status and Result<T>: the error type at every module boundary.
//
// A Status carries a code, a message and the file:line that created it, so an
// error that travels up through several layers still names where it started.
#pragma once

#include <cstdint>
#include <memory>
#include <source_location>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace relaykv {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,    // caller passed something malformed
  kNotFound,           // key, record or peer does not exist (or was evicted)
  kAlreadyExists,
  kResourceExhausted,  // capacity, memory
  kDataLoss,           // checksum mismatch, truncated or corrupt bytes
  kFailedPrecondition, // object in the wrong state for the call
  kUnavailable,        // peer or directory unreachable
  kDeadlineExceeded,   // a remote wait timed out
  kPermissionDenied,   // bad token, wrong tenant
  kUnimplemented,
  kInternal,
  kAborted,            // the data changed under the caller (e.g. a record replaced); retry or recompute
};

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message,
         std::source_location loc = std::source_location::current());

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : ""; }
  const char* file() const { return rep_ ? rep_->file : ""; }
  int line() const { return rep_ ? rep_->line : 0; }

  // "DATA_LOSS: layer 3 K checksum mismatch [transfer/record/record.cc:212]"
  std::string ToString() const;

  // Adds context in front of the message, keeping code and origin.
  Status WithContext(std::string_view context) const;

 private:
  struct Rep {
    StatusCode code;
    std::string message;
    const char* file;
    int line;
  };
  // Shared so copying a Status is cheap; the OK status allocates nothing.
  std::shared_ptr<const Rep> rep_;
};

inline Status InvalidArgument(std::string msg,
                              std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kInvalidArgument, std::move(msg), loc);
}
inline Status NotFound(std::string msg,
                       std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kNotFound, std::move(msg), loc);
}
inline Status AlreadyExists(std::string msg,
                            std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kAlreadyExists, std::move(msg), loc);
}
inline Status ResourceExhausted(std::string msg,
                                std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kResourceExhausted, std::move(msg), loc);
}
inline Status DataLoss(std::string msg,
                       std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kDataLoss, std::move(msg), loc);
}
inline Status FailedPrecondition(std::string msg,
                                 std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kFailedPrecondition, std::move(msg), loc);
}
inline Status Unavailable(std::string msg,
                          std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kUnavailable, std::move(msg), loc);
}
inline Status DeadlineExceeded(std::string msg,
                               std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kDeadlineExceeded, std::move(msg), loc);
}
inline Status PermissionDenied(std::string msg,
                               std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kPermissionDenied, std::move(msg), loc);
}
inline Status Unimplemented(std::string msg,
                            std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kUnimplemented, std::move(msg), loc);
}
inline Status Internal(std::string msg,
                       std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kInternal, std::move(msg), loc);
}

inline Status Aborted(std::string msg,
                      std::source_location loc = std::source_location::current()) {
  return Status(StatusCode::kAborted, std::move(msg), loc);
}

// Result<T>: a value or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(runtime/explicit)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(runtime/explicit)
    if (std::get<Status>(v_).ok()) {
      v_ = Status(StatusCode::kInternal, "Result constructed from an OK status");
    }
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace relaykv

#define RELAYKV_CONCAT_INNER_(a, b) a##b
#define RELAYKV_CONCAT_(a, b) RELAYKV_CONCAT_INNER_(a, b)

#define RELAYKV_RETURN_IF_ERROR(expr)             \
  do {                                            \
    ::relaykv::Status relaykv_status_ = (expr);   \
    if (!relaykv_status_.ok()) return relaykv_status_; \
  } while (0)

#define RELAYKV_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  lhs = std::move(tmp).value()

#define RELAYKV_ASSIGN_OR_RETURN(lhs, expr) \
  RELAYKV_ASSIGN_OR_RETURN_IMPL_(RELAYKV_CONCAT_(relaykv_result_, __LINE__), lhs, expr)
