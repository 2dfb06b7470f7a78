// One Bind* function per module; module.cc calls them all.
#pragma once

#include <nanobind/nanobind.h>

namespace relaykv::python {

void BindCore(nanobind::module_& m);  // Status → exceptions, layout, RoPE parameters

}  // namespace relaykv::python
