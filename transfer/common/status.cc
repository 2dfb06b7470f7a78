#include "transfer/common/status.h"

#include <cstring>

namespace relaykv {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kAlreadyExists: return "ALREADY_EXISTS";
    case StatusCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kPermissionDenied: return "PERMISSION_DENIED";
    case StatusCode::kUnimplemented: return "UNIMPLEMENTED";
    case StatusCode::kInternal: return "INTERNAL";
    case StatusCode::kAborted: return "ABORTED";
  }
  return "UNKNOWN";
}

namespace {
// Paths in __FILE__ are absolute; keep the part from the project's top folders.
const char* TrimPath(const char* file) {
  for (const char* top : {"transfer/", "connector/", "rectify/", "python_shim/", "tests/"}) {
    if (const char* p = std::strstr(file, top)) return p;
  }
  return file;
}
}  // namespace

Status::Status(StatusCode code, std::string message, std::source_location loc) {
  if (code == StatusCode::kOk) return;
  rep_ = std::make_shared<const Rep>(
      Rep{code, std::move(message), TrimPath(loc.file_name()), static_cast<int>(loc.line())});
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(StatusCodeName(rep_->code));
  out += ": ";
  out += rep_->message;
  out += " [";
  out += rep_->file;
  out += ":";
  out += std::to_string(rep_->line);
  out += "]";
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  Status s;
  std::string msg(context);
  msg += ": ";
  msg += rep_->message;
  s.rep_ = std::make_shared<const Rep>(Rep{rep_->code, std::move(msg), rep_->file, rep_->line});
  return s;
}

}  // namespace relaykv
