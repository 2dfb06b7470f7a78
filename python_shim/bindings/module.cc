#include "python_shim/bindings/bindings.h"

NB_MODULE(_relaykv, m) {
  m.doc() = "relaykv C++ core: records, store, span index, paged KV ops, executor";
  relaykv::python::BindCore(m);
}
