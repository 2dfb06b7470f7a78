// Turns a Status into a Python exception: relaykv.RelayKVError, or the
// subclass named after its code (DataLossError, NotFoundError, ...).
#pragma once

#include <nanobind/nanobind.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "transfer/common/status.h"

namespace relaykv::python {

class StatusError : public std::runtime_error {
 public:
  explicit StatusError(Status s) : std::runtime_error(s.ToString()), status_(std::move(s)) {}
  const Status& status() const { return status_; }

 private:
  Status status_;
};

inline void ThrowIfError(const Status& s) {
  if (!s.ok()) throw StatusError(s);
}

template <typename T>
T Unwrap(Result<T>&& r) {
  if (!r.ok()) throw StatusError(r.status());
  return std::move(r).value();
}

// Creates the exception classes on the module and installs the translator.
void RegisterStatusExceptions(nanobind::module_& m);

}  // namespace relaykv::python
