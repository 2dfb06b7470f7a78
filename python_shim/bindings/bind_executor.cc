// The model executor in Python: relaykv._relaykv.ModelConfig, TorchKvCache,
// ModelExecutor.
//
// Tensors cross the boundary through DLPack, without copies: a torch tensor
// becomes an at::Tensor over the same memory (holding the torch tensor alive
// through torch's own DLPack deleter, which needs no GIL), and results go back
// as torch tensors over the executor's memory. The GIL is released while the
// executor runs, so other Python threads keep going.
//
// Compiled only when relaykv_executor is part of the build (python_shim/CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/DLConvertor.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <utility>
#include <vector>

#include "python_shim/bindings/bindings.h"
#include "python_shim/bindings/status_py.h"
#include "rectify/executor/executor.h"
#include "rectify/executor/model_config.h"

namespace nb = nanobind;

namespace relaykv::python {
namespace {

using rectify::ForwardInput;
using rectify::ForwardOutput;
using rectify::LayerKvCache;
using rectify::ModelConfig;
using rectify::ModelExecutor;

// torch.utils.dlpack's converters, looked up once. Leaked on purpose: they
// must not be released after the interpreter has shut down.
const nb::object& TorchDlpack(const char* name) {
  static nb::object* to = nullptr;
  static nb::object* from = nullptr;
  if (to == nullptr) {
    nb::module_ mod = nb::module_::import_("torch.utils.dlpack");
    to = new nb::object(mod.attr("to_dlpack"));
    from = new nb::object(mod.attr("from_dlpack"));
  }
  return std::string_view(name) == "to" ? *to : *from;
}

// A torch.Tensor (or None) as an at::Tensor over the same memory.
at::Tensor ToAten(nb::handle obj, const char* what) {
  if (obj.is_none()) return at::Tensor();
  if (!nb::hasattr(obj, "__dlpack__") || !nb::hasattr(obj, "requires_grad")) {
    ThrowIfError(InvalidArgument(std::string(what) + " must be a torch.Tensor, got " +
                                 nb::cast<std::string>(nb::str(obj.type()))));
  }
  nb::object t = nb::borrow(obj);
  // Parameters require grad; DLPack refuses those, and the executor never needs it.
  if (nb::cast<bool>(t.attr("requires_grad"))) t = t.attr("detach")();
  nb::object capsule = TorchDlpack("to")(t);
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    ThrowIfError(Internal(std::string(what) + ": torch returned no DLPack tensor"));
  }
  at::Tensor out;
  try {
    out = at::fromDLPack(managed);
  } catch (const c10::Error& e) {
    ThrowIfError(InvalidArgument(std::string(what) + ": " + e.what_without_backtrace()));
  }
  // The at::Tensor owns the DLPack tensor now; the capsule must not free it.
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  return out;
}

std::string DtypeName(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return c10::toString(t);
  }
}

void DeleteUnconsumedCapsule(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
}

// An at::Tensor as a torch.Tensor over the same memory (None when undefined).
nb::object ToTorch(const at::Tensor& t) {
  if (!t.defined()) return nb::none();
  DLManagedTensor* managed = at::toDLPack(t);
  nb::object capsule = nb::steal(PyCapsule_New(managed, "dltensor", DeleteUnconsumedCapsule));
  if (!capsule.is_valid()) {
    managed->deleter(managed);
    throw nb::python_error();
  }
  return TorchDlpack("from")(capsule);
}

std::vector<LayerKvCache> ToKvCache(nb::handle layers) {
  std::vector<LayerKvCache> out;
  size_t i = 0;
  for (nb::handle item : layers) {
    const std::string what = "kv_cache[" + std::to_string(i++) + "]";
    if (nb::isinstance<nb::tuple>(item) || nb::isinstance<nb::list>(item)) {
      if (nb::len(item) != 2) {
        ThrowIfError(InvalidArgument(what + " must be a (K, V) pair or one vLLM tensor"));
      }
      out.push_back(LayerKvCache{ToAten(item[0], (what + " K").c_str()),
                                 ToAten(item[1], (what + " V").c_str())});
    } else {
      out.push_back(Unwrap(rectify::SplitVllmLayerCache(ToAten(item, what.c_str()))));
    }
  }
  return out;
}

// The cache's per-layer K/V views, converted once and reused by every call.
struct TorchKvCache {
  std::vector<LayerKvCache> layers;
  nb::list originals;  // what the caller passed, for introspection
};

nb::dict ToDict(const ForwardOutput& out) {
  nb::dict d;
  d["hidden_states"] = ToTorch(out.hidden_states);
  d["logits"] = ToTorch(out.logits);
  nb::dict kv, attention, attention_mass, hidden;
  for (const auto& o : out.kv) {
    kv[nb::int_(o.layer)] = nb::make_tuple(ToTorch(o.fresh_k), ToTorch(o.fresh_v),
                                           ToTorch(o.cached_k), ToTorch(o.cached_v));
  }
  for (const auto& o : out.attention) {
    if (o.probs.defined()) attention[nb::int_(o.layer)] = ToTorch(o.probs);
    if (o.key_mass.defined()) {
      attention_mass[nb::int_(o.layer)] =
          nb::make_tuple(ToTorch(o.key_mass), ToTorch(o.key_followers));
    }
  }
  for (const auto& o : out.hidden) hidden[nb::int_(o.layer)] = ToTorch(o.hidden);
  d["kv"] = kv;
  d["attention"] = attention;
  d["attention_mass"] = attention_mass;
  d["hidden"] = hidden;
  return d;
}

}  // namespace

void BindExecutor(nb::module_& m) {
  m.def("supported_architectures", &rectify::SupportedArchitectures,
        "Architectures the executor runs, as 'model_type (ClassName), ...'.");

  nb::class_<ModelConfig>(m, "ModelConfig",
                          "Shape of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3).")
      .def(nb::init<>())
      .def_prop_rw(
          "architecture",
          [](const ModelConfig& c) {
            return std::string(rectify::ArchitectureName(c.architecture));
          },
          [](ModelConfig& c, const std::string& name) {
            c.architecture = Unwrap(rectify::ParseArchitecture(name));
          },
          "'llama', 'mistral', 'qwen2' or 'qwen3' (transformers class names are accepted)")
      .def_rw("vocab_size", &ModelConfig::vocab_size)
      .def_rw("hidden_size", &ModelConfig::hidden_size)
      .def_rw("intermediate_size", &ModelConfig::intermediate_size)
      .def_rw("num_layers", &ModelConfig::num_layers)
      .def_rw("num_heads", &ModelConfig::num_heads)
      .def_rw("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_rw("head_size", &ModelConfig::head_size)
      .def_rw("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_rw("rope", &ModelConfig::rope)
      .def_rw("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_rw("qkv_bias", &ModelConfig::qkv_bias)
      .def_rw("o_bias", &ModelConfig::o_bias)
      .def_rw("mlp_bias", &ModelConfig::mlp_bias)
      .def_rw("qk_norm", &ModelConfig::qk_norm)
      .def_rw("sliding_window", &ModelConfig::sliding_window)
      .def_rw("sliding_window_layers", &ModelConfig::sliding_window_layers)
      .def("validate", [](const ModelConfig& c) { ThrowIfError(c.Validate()); })
      .def("layer_window", &ModelConfig::LayerWindow, nb::arg("layer"))
      .def("__repr__", &ModelConfig::ToString);

  nb::class_<TorchKvCache>(m, "TorchKvCache",
                           "A paged KV cache as torch tensors: per layer, vLLM's [2, num_blocks, "
                           "block_size, kv_heads, head_size] tensor or a (K, V) pair of "
                           "[num_blocks, block_size, kv_heads, head_size] views (any strides). "
                           "Shares memory with them.")
      .def(
          "__init__",
          [](TorchKvCache* self, nb::list layers) {
            new (self) TorchKvCache{ToKvCache(layers), layers};
          },
          nb::arg("layers"))
      .def("__len__", [](const TorchKvCache& c) { return c.layers.size(); })
      .def_ro("layers", &TorchKvCache::originals);

  nb::class_<ModelExecutor>(m, "ModelExecutor",
                            "Llama-family forward over any tokens × layers of a paged KV cache.")
      .def_static(
          "create",
          [](const ModelConfig& config, nb::dict weights) {
            rectify::WeightMap map;
            for (auto [key, value] : weights) {
              const std::string name = nb::cast<std::string>(key);
              map.emplace(name, ToAten(value, ("weight '" + name + "'").c_str()));
            }
            return Unwrap(ModelExecutor::Create(config, map));
          },
          nb::arg("config"), nb::arg("weights"),
          "Wraps weights (HF parameter names → torch tensors) without copying them.")
      .def_prop_ro("config", &ModelExecutor::config)
      .def_prop_ro("device", [](const ModelExecutor& e) { return e.device().str(); })
      .def_prop_ro("dtype", [](const ModelExecutor& e) { return DtypeName(e.dtype()); })
      .def(
          "forward",
          [](const ModelExecutor& e, const TorchKvCache& cache,
             const std::vector<int64_t>& query_lens, const std::vector<int64_t>& context_lens,
             nb::handle block_tables, nb::handle positions, nb::handle token_ids,
             nb::handle hidden_states, int32_t first_layer, int32_t last_layer, bool write_kv,
             const std::vector<int32_t>& skip_write_layers, nb::handle logits_rows,
             const std::vector<int32_t>& observe_kv_layers,
             const std::vector<int32_t>& observe_attention_layers, nb::handle attention_rows,
             bool attention_key_mass, const std::vector<int32_t>& observe_hidden_layers) {
            ForwardInput in;
            in.query_lens = query_lens;
            in.context_lens = context_lens;
            in.block_tables = ToAten(block_tables, "block_tables");
            in.positions = ToAten(positions, "positions");
            in.token_ids = ToAten(token_ids, "token_ids");
            in.hidden_states = ToAten(hidden_states, "hidden_states");
            in.first_layer = first_layer;
            in.last_layer = last_layer;
            in.write_kv = write_kv;
            in.skip_write_layers = skip_write_layers;
            in.logits_rows = ToAten(logits_rows, "logits_rows");
            in.observe.kv_layers = observe_kv_layers;
            in.observe.attention_layers = observe_attention_layers;
            in.observe.attention_rows = ToAten(attention_rows, "attention_rows");
            in.observe.attention_key_mass = attention_key_mass;
            in.observe.hidden_layers = observe_hidden_layers;
            Result<ForwardOutput> out = [&] {
              nb::gil_scoped_release release;
              return e.Forward(in, cache.layers);
            }();
            return ToDict(Unwrap(std::move(out)));
          },
          nb::arg("kv_cache"), nb::kw_only(), nb::arg("query_lens"), nb::arg("context_lens"),
          nb::arg("block_tables"), nb::arg("positions"), nb::arg("token_ids") = nb::none(),
          nb::arg("hidden_states") = nb::none(), nb::arg("first_layer") = 0,
          nb::arg("last_layer") = -1, nb::arg("write_kv") = true,
          nb::arg("skip_write_layers") = std::vector<int32_t>{},
          nb::arg("logits_rows") = nb::none(),
          nb::arg("observe_kv_layers") = std::vector<int32_t>{},
          nb::arg("observe_attention_layers") = std::vector<int32_t>{},
          nb::arg("attention_rows") = nb::none(), nb::arg("attention_key_mass") = false,
          nb::arg("observe_hidden_layers") = std::vector<int32_t>{},
          "Computes the given tokens over layers [first_layer, last_layer]; returns a dict with "
          "hidden_states, logits, and the observations kv {layer: (fresh_k, fresh_v, cached_k, "
          "cached_v)}, attention {layer: probs}, hidden {layer: hidden}.")
      .def(
          "embed",
          [](const ModelExecutor& e, nb::handle token_ids) {
            at::Tensor ids = ToAten(token_ids, "token_ids");
            Result<at::Tensor> out = [&] {
              nb::gil_scoped_release release;
              return e.Embed(ids);
            }();
            return ToTorch(Unwrap(std::move(out)));
          },
          nb::arg("token_ids"))
      .def(
          "logits",
          [](const ModelExecutor& e, nb::handle hidden_states) {
            at::Tensor h = ToAten(hidden_states, "hidden_states");
            Result<at::Tensor> out = [&] {
              nb::gil_scoped_release release;
              return e.Logits(h);
            }();
            return ToTorch(Unwrap(std::move(out)));
          },
          nb::arg("hidden_states"));
}

}  // namespace relaykv::python
