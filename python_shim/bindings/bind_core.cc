#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>

#include "python_shim/bindings/bindings.h"
#include "python_shim/bindings/status_py.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/rope_params.h"

namespace nb = nanobind;

namespace relaykv::python {
namespace {

struct CodeClass {
  StatusCode code;
  const char* name;
  PyObject* extra_base;  // a builtin the class also derives from, so callers can catch either
};

PyObject* g_base_error = nullptr;
std::array<PyObject*, 16> g_errors{};

}  // namespace

void RegisterStatusExceptions(nb::module_& m) {
  g_base_error =
      PyErr_NewExceptionWithDoc("relaykv._relaykv.RelayKVError",
                                "Error raised by the relaykv core; .code names the status code.",
                                PyExc_RuntimeError, nullptr);
  m.attr("RelayKVError") = nb::borrow(g_base_error);
  const CodeClass classes[] = {
      {StatusCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError},
      {StatusCode::kNotFound, "NotFoundError", PyExc_KeyError},
      {StatusCode::kAlreadyExists, "AlreadyExistsError", nullptr},
      {StatusCode::kResourceExhausted, "ResourceExhaustedError", nullptr},
      {StatusCode::kDataLoss, "DataLossError", nullptr},
      {StatusCode::kFailedPrecondition, "FailedPreconditionError", nullptr},
      {StatusCode::kUnavailable, "UnavailableError", nullptr},
      {StatusCode::kDeadlineExceeded, "DeadlineExceededError", PyExc_TimeoutError},
      {StatusCode::kPermissionDenied, "PermissionDeniedError", PyExc_PermissionError},
      {StatusCode::kUnimplemented, "UnimplementedError", PyExc_NotImplementedError},
      {StatusCode::kInternal, "InternalError", nullptr},
      {StatusCode::kAborted, "AbortedError", nullptr},
  };
  for (const CodeClass& c : classes) {
    const std::string qualified = std::string("relaykv._relaykv.") + c.name;
    PyObject* bases =
        c.extra_base ? PyTuple_Pack(2, g_base_error, c.extra_base) : PyTuple_Pack(1, g_base_error);
    PyObject* cls = PyErr_NewException(qualified.c_str(), bases, nullptr);
    Py_DECREF(bases);
    g_errors[static_cast<size_t>(c.code)] = cls;
    m.attr(c.name) = nb::borrow(cls);
  }
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      PyObject* cls = g_errors[static_cast<size_t>(e.status().code())];
      if (cls == nullptr) cls = g_base_error;
      PyObject* exc = PyObject_CallFunction(cls, "s", e.what());
      if (exc == nullptr) return;  // the call set its own error
      PyObject* code = PyUnicode_FromString(std::string(StatusCodeName(e.status().code())).c_str());
      PyObject_SetAttrString(exc, "code", code);
      Py_DECREF(code);
      PyErr_SetObject(cls, exc);
      Py_DECREF(exc);
    }
  });
}

void BindCore(nb::module_& m) {
  RegisterStatusExceptions(m);

  m.def(
      "dtype_names",
      [] {
        return std::vector<std::string>{"float32", "float16", "bfloat16"};
      },
      "The KV element types relaykv moves.");

  nb::class_<KvLayout>(m, "KvLayout", "Logical KV layout carried by every record.")
      .def(
          "__init__",
          [](KvLayout* self, int32_t num_layers, int32_t num_kv_heads, int32_t head_size,
             const std::string& dtype) {
            KvLayout l{num_layers, num_kv_heads, head_size, Unwrap(ParseDType(dtype))};
            ThrowIfError(l.Validate());
            new (self) KvLayout(l);
          },
          nb::arg("num_layers"), nb::arg("num_kv_heads"), nb::arg("head_size"),
          nb::arg("dtype") = "float16")
      .def_ro("num_layers", &KvLayout::num_layers)
      .def_ro("num_kv_heads", &KvLayout::num_kv_heads)
      .def_ro("head_size", &KvLayout::head_size)
      .def_prop_ro("dtype", [](const KvLayout& l) { return std::string(DTypeName(l.dtype)); })
      .def_prop_ro("fingerprint", &KvLayout::Fingerprint)
      .def("__eq__", [](const KvLayout& a, const KvLayout& b) { return a == b; })
      .def("__repr__", &KvLayout::ToString);

  nb::class_<RopeParams>(m, "RopeParams", "Rotary embedding parameters carried by every record.")
      .def(
          "__init__",
          [](RopeParams* self, float theta, int32_t rotary_dim, const std::string& style,
             const std::string& scaling, float factor, float low_freq_factor,
             float high_freq_factor, int32_t original_max_position, float beta_fast,
             float beta_slow, float attention_factor, bool truncate) {
            RopeParams p;
            p.theta = theta;
            p.rotary_dim = rotary_dim;
            if (style == "neox") {
              p.style = RopeStyle::kNeox;
            } else if (style == "interleaved") {
              p.style = RopeStyle::kInterleaved;
            } else {
              ThrowIfError(InvalidArgument("rope style must be 'neox' or 'interleaved', got '" +
                                           style + "'"));
            }
            if (scaling == "none") {
              p.scaling = RopeScaling::kNone;
            } else if (scaling == "linear") {
              p.scaling = RopeScaling::kLinear;
            } else if (scaling == "llama3") {
              p.scaling = RopeScaling::kLlama3;
            } else if (scaling == "yarn") {
              p.scaling = RopeScaling::kYarn;
            } else {
              ThrowIfError(InvalidArgument(
                  "rope scaling must be 'none', 'linear', 'llama3' or 'yarn', got '" + scaling +
                  "'"));
            }
            p.factor = factor;
            p.low_freq_factor = low_freq_factor;
            p.high_freq_factor = high_freq_factor;
            p.original_max_position = original_max_position;
            p.beta_fast = beta_fast;
            p.beta_slow = beta_slow;
            p.attention_factor = attention_factor;
            p.truncate = truncate;
            new (self) RopeParams(p);
          },
          nb::arg("theta") = 10000.f, nb::arg("rotary_dim") = 0, nb::arg("style") = "neox",
          nb::arg("scaling") = "none", nb::arg("factor") = 1.f, nb::arg("low_freq_factor") = 1.f,
          nb::arg("high_freq_factor") = 4.f, nb::arg("original_max_position") = 8192,
          nb::arg("beta_fast") = 32.f, nb::arg("beta_slow") = 1.f,
          nb::arg("attention_factor") = 1.f, nb::arg("truncate") = true)
      .def_ro("theta", &RopeParams::theta)
      .def_ro("rotary_dim", &RopeParams::rotary_dim)
      .def_prop_ro("style", [](const RopeParams& p) { return std::string(RopeStyleName(p.style)); })
      .def_prop_ro("scaling",
                   [](const RopeParams& p) { return std::string(RopeScalingName(p.scaling)); })
      .def_ro("factor", &RopeParams::factor)
      .def_ro("attention_factor", &RopeParams::attention_factor)
      .def("validate",
           [](const RopeParams& p, int32_t head_size) { ThrowIfError(p.Validate(head_size)); })
      .def("inverse_frequencies", &RopeParams::InverseFrequencies, nb::arg("head_size"))
      .def_prop_ro("fingerprint", &RopeParams::Fingerprint)
      .def("__eq__", [](const RopeParams& a, const RopeParams& b) { return a == b; })
      .def("__repr__", &RopeParams::ToString);
}

}  // namespace relaykv::python
