// RELAYKV_CHECK: for invariants only (a bug in relaykv, never bad input).
// Bad input returns a Status; a failed check aborts naming file and line.
#pragma once

#include <cstdio>
#include <cstdlib>

#define RELAYKV_CHECK(cond)                                                          \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "relaykv: check failed: %s at %s:%d\n", #cond, __FILE__, \
                   __LINE__);                                                        \
      std::abort();                                                                  \
    }                                                                                \
  } while (0)

#define RELAYKV_CHECK_MSG(cond, msg)                                                       \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "relaykv: check failed: %s (%s) at %s:%d\n", #cond, msg, __FILE__, \
                   __LINE__);                                                              \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)
