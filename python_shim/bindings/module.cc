#include "python_shim/bindings/bindings.h"

NB_MODULE(_relaykv, m) {
  m.doc() = "relaykv C++ core: records, store, span index, paged KV ops, executor";
  relaykv::python::BindCore(m);
#ifdef RELAYKV_HAVE_RELAY
  relaykv::python::BindRelay(m);
#endif
#ifdef RELAYKV_HAVE_EXECUTOR
  relaykv::python::BindExecutor(m);
#endif
}
