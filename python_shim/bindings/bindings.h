// One Bind* function per module; module.cc calls them all.
#pragma once

#include <nanobind/nanobind.h>

namespace relaykv::python {

void BindCore(nanobind::module_& m);  // Status → exceptions, layout, RoPE parameters
void BindRelay(nanobind::module_& m);     // PagedCache over tensors, Span, KvRelay
void BindExecutor(nanobind::module_& m);  // ModelConfig, TorchKvCache, ModelExecutor (needs BindCore)

}  // namespace relaykv::python
