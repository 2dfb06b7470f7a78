// Python face of the export/import data flow: paged caches built from torch
// (or any DLPack) tensors without copying, and the KvRelay around them.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>
#include <xxhash.h>

#include <chrono>
#include <string>
#include <vector>

#include "connector/relay/kv_relay.h"
#include "python_shim/bindings/bindings.h"
#include "python_shim/bindings/status_py.h"

namespace nb = nanobind;

namespace relaykv::python {
namespace {

// Host or CUDA memory: a cache on a GPU is imported into and exported from
// through a device staging buffer (RELAYKV_HAVE_CUDA builds).
using AnyArray = nb::ndarray<>;

template <typename Array>
Result<DType> DTypeOf(const Array& a) {
  const nb::dlpack::dtype t = a.dtype();
  if (t.lanes != 1) return InvalidArgument("vector dtypes are not KV caches");
  if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && t.bits == 32) {
    return DType::kFloat32;
  }
  if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && t.bits == 16) {
    return DType::kFloat16;
  }
  if (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && t.bits == 16) {
    return DType::kBFloat16;
  }
  return InvalidArgument("KV tensors must be float32, float16 or bfloat16");
}

// A PagedKvCache plus references that keep the tensors it points into alive.
struct PyPagedCache {
  PagedKvCache view;
  std::vector<nb::object> keep_alive;
};

// Each tensor is one layer's K (or V) as [num_blocks, block_size, kv_heads,
// head_size] with any strides, e.g. kv_cache[layer][0] of vLLM's
// [2, num_blocks, block_size, kv_heads, head_size]. All layers must share strides.
PyPagedCache MakePagedCache(const std::vector<nb::object>& k_layers,
                            const std::vector<nb::object>& v_layers) {
  if (k_layers.empty() || k_layers.size() != v_layers.size()) {
    ThrowIfError(InvalidArgument("need one K and one V tensor per layer, got " +
                                 std::to_string(k_layers.size()) + " and " +
                                 std::to_string(v_layers.size())));
  }
  PyPagedCache out;
  const auto num_layers = static_cast<int32_t>(k_layers.size());
  int64_t strides[4] = {0, 0, 0, 0};
  int64_t shape[4] = {0, 0, 0, 0};
  DType dtype = DType::kFloat32;
  int32_t device_id = 0;  // one GPU holds every layer
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const nb::object& obj = kv == 0 ? k_layers[l] : v_layers[l];
      AnyArray a = nb::cast<AnyArray>(obj);
      if (a.ndim() != 4) {
        ThrowIfError(InvalidArgument("layer " + std::to_string(l) +
                                     ": expected [num_blocks, block_size, kv_heads, head_size], "
                                     "got a tensor of " +
                                     std::to_string(a.ndim()) + " dims"));
      }
      const DType dt = Unwrap(DTypeOf(a));
      const int32_t dev = a.device_type();
      if (dev != nb::device::cpu::value && dev != nb::device::cuda::value) {
        ThrowIfError(InvalidArgument("layer " + std::to_string(l) +
                                     ": KV tensors must be in CPU or CUDA memory"));
      }
      const bool on_device = dev == nb::device::cuda::value;
      if (l == 0 && kv == 0) {
        out.view.on_device = on_device;
        device_id = a.device_id();
        dtype = dt;
        for (int i = 0; i < 4; ++i) {
          shape[i] = static_cast<int64_t>(a.shape(i));
          strides[i] = a.stride(i);
        }
      } else {
        bool same = dt == dtype && on_device == out.view.on_device && a.device_id() == device_id;
        for (int i = 0; i < 4; ++i) {
          same = same && shape[i] == static_cast<int64_t>(a.shape(i)) && strides[i] == a.stride(i);
        }
        if (!same) {
          ThrowIfError(InvalidArgument("layer " + std::to_string(l) + (kv ? " V" : " K") +
                                       " differs from layer 0 K in shape, strides, dtype or "
                                       "device"));
        }
      }
      (kv == 0 ? out.view.k_base : out.view.v_base).push_back(a.data());
      out.keep_alive.push_back(obj);
    }
  }
  out.view.layout =
      KvLayout{num_layers, static_cast<int32_t>(shape[2]), static_cast<int32_t>(shape[3]), dtype};
  out.view.num_blocks = shape[0];
  out.view.block_size = static_cast<int32_t>(shape[1]);
  out.view.block_stride = strides[0];
  out.view.slot_stride = strides[1];
  out.view.head_stride = strides[2];
  out.view.dim_stride = strides[3];
  ThrowIfError(out.view.Validate());
  return out;
}

nb::dict MetricsDict(const RelayMetrics& m) {
  nb::dict d;
  d["exports"] = m.exports;
  d["export_dedup"] = m.export_dedup;
  d["export_failures"] = m.export_failures;
  d["export_bytes"] = m.export_bytes;
  d["imports"] = m.imports;
  d["import_tokens"] = m.import_tokens;
  d["import_bytes"] = m.import_bytes;
  nb::dict failures;
  for (size_t i = 0; i < kNumImportFailures; ++i) {
    failures[std::string(ImportFailureName(static_cast<ImportFailure>(i))).c_str()] =
        m.import_failures[i];
  }
  d["import_failures"] = failures;
  d["lookups"] = m.lookups;
  d["lookup_tokens_matched"] = m.lookup_tokens_matched;
  d["index_syncs"] = m.index_syncs;
  d["index_sync_failures"] = m.index_sync_failures;
  return d;
}

nb::dict StoreStatsDict(const StoreStats& s) {
  nb::dict d;
  d["capacity_bytes"] = s.capacity_bytes;
  d["bytes_used"] = s.bytes_used;
  d["records"] = s.records;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["evictions"] = s.evictions;
  d["puts"] = s.puts;
  d["deletes"] = s.deletes;
  d["rejected_puts"] = s.rejected_puts;
  d["leases"] = s.leases;
  return d;
}

}  // namespace

void BindRelay(nb::module_& m) {
#if RELAYKV_HAVE_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.def(
      "xxh64", [](nb::bytes data, uint64_t seed) { return XXH64(data.c_str(), data.size(), seed); },
      nb::arg("data"), nb::arg("seed") = 0, "xxhash64 of bytes (model fingerprints, ids).");

  nb::class_<PyPagedCache>(m, "PagedCache",
                           "A view of a paged KV cache over caller-owned tensors (no copy).")
      .def(nb::new_(&MakePagedCache), nb::arg("k_layers"), nb::arg("v_layers"),
           "k_layers[l], v_layers[l]: [num_blocks, block_size, kv_heads, head_size] CPU tensors "
           "with any strides (e.g. kv[l][0] and kv[l][1] of vLLM's per-layer cache).")
      .def_prop_ro("layout", [](const PyPagedCache& c) { return c.view.layout; })
      .def_prop_ro("block_size", [](const PyPagedCache& c) { return c.view.block_size; })
      .def_prop_ro("num_blocks", [](const PyPagedCache& c) { return c.view.num_blocks; })
      .def_prop_ro("strides", [](const PyPagedCache& c) {
        return std::vector<int64_t>{c.view.block_stride, c.view.slot_stride, c.view.head_stride,
                                    c.view.dim_stride};
      });

  nb::class_<Span>(m, "Span", "A run of the prompt that a stored record covers.")
      .def(nb::init<>())
      .def(
          "__init__",
          [](Span* s, uint64_t record_id, int32_t src_offset, int32_t dst_offset, int32_t length) {
            new (s) Span{record_id, src_offset, dst_offset, length};
          },
          nb::arg("record_id"), nb::arg("src_offset"), nb::arg("dst_offset"), nb::arg("length"))
      .def_rw("record_id", &Span::record_id)
      .def_rw("src_offset", &Span::src_offset)
      .def_rw("dst_offset", &Span::dst_offset)
      .def_rw("length", &Span::length)
      .def("__eq__", [](const Span& a, const Span& b) { return a == b; })
      .def("__repr__", [](const Span& s) {
        return "Span(record=" + std::to_string(s.record_id) +
               ", src=" + std::to_string(s.src_offset) + ", dst=" + std::to_string(s.dst_offset) +
               ", length=" + std::to_string(s.length) + ")";
      });

  nb::class_<KvRelay>(m, "KvRelay",
                      "Export/import of KV records on one instance: embedded store + span index.")
      .def(
          nb::new_([](uint64_t model_fingerprint, const KvLayout& layout, const RopeParams& rope,
                      const std::string& tenant, uint64_t capacity_bytes, int32_t min_span_tokens) {
            InstanceIdentity id{model_fingerprint, layout, rope, tenant};
            StoreOptions so;
            so.capacity_bytes = capacity_bytes;
            SpanIndexOptions io;
            io.min_span_tokens = min_span_tokens;
            return Unwrap(KvRelay::Create(std::move(id), std::move(so), std::move(io)));
          }),
          nb::arg("model_fingerprint"), nb::arg("layout"), nb::arg("rope"), nb::arg("tenant") = "",
          nb::arg("capacity_bytes") = uint64_t{1} << 30, nb::arg("min_span_tokens") = 16)
#if RELAYKV_HAVE_SERVER
      .def_static(
          "distributed",
          [](uint64_t model_fingerprint, const KvLayout& layout, const RopeParams& rope,
             const std::string& tenant, const std::string& directory, const std::string& token,
             const std::string& ucx_tls, int32_t min_span_tokens, int64_t timeout_ms,
             int64_t record_ttl_ms, int64_t index_sync_ms, int64_t inline_bytes) {
            InstanceIdentity id{model_fingerprint, layout, rope, tenant};
            DistributedStoreOptions o;
            o.directory = directory;
            o.directory_options.timeout = std::chrono::milliseconds(timeout_ms);
            o.client.token = token;
            o.client.ucx_tls = ucx_tls;
            o.client.timeout = std::chrono::milliseconds(timeout_ms);
            o.client.record_ttl = std::chrono::milliseconds(record_ttl_ms);
            if (inline_bytes >= 0) o.client.inline_bytes = static_cast<uint64_t>(inline_bytes);
            SpanIndexOptions io;
            io.min_span_tokens = min_span_tokens;
            nb::gil_scoped_release release;
            return Unwrap(KvRelay::CreateDistributed(std::move(id), std::move(o), std::move(io),
                                                     std::chrono::milliseconds(index_sync_ms)));
          },
          nb::arg("model_fingerprint"), nb::arg("layout"), nb::arg("rope"), nb::arg("tenant") = "",
          nb::arg("directory"), nb::arg("token") = "", nb::arg("ucx_tls") = "",
          nb::arg("min_span_tokens") = 16, nb::arg("timeout_ms") = 5000,
          nb::arg("record_ttl_ms") = 0, nb::arg("index_sync_ms") = 50,
          nb::arg("inline_bytes") = -1,
          "A relay whose records live on store servers found through `directory` "
          "(redis://host:port/db): exports go to a server, imports read from whichever holds "
          "the record, lookups see every instance's exports. Records up to `inline_bytes` "
          "travel inside the store's control messages (negative: the client's default, 64 KiB).")
#endif
      .def_prop_ro("is_distributed", &KvRelay::distributed)
      .def(
          "sync_index",
          [](KvRelay& r) {
            nb::gil_scoped_release release;
            ThrowIfError(r.SyncIndex(true));
          },
          "Pull the directory's record changes into the span index now (distributed mode).")
      .def(
          "export",
          [](KvRelay& r, const PyPagedCache& cache, const std::vector<int32_t>& block_table,
             const std::vector<int32_t>& tokens, int32_t seq_begin,
             const std::vector<int32_t>& hidden_layers, nb::object hidden) {
            HiddenCheckpoints checkpoints;
            nb::ndarray<nb::device::cpu> rows;  // read on the host, into the record
            if (!hidden_layers.empty()) {
              if (hidden.is_none()) {
                ThrowIfError(InvalidArgument("hidden_layers given without hidden"));
              }
              rows = nb::cast<nb::ndarray<nb::device::cpu>>(hidden);
              if (rows.ndim() != 3 || rows.shape(0) != hidden_layers.size() ||
                  rows.shape(1) != tokens.size() || rows.stride(2) != 1 ||
                  rows.stride(1) != static_cast<int64_t>(rows.shape(2)) ||
                  rows.stride(0) != static_cast<int64_t>(rows.shape(1) * rows.shape(2))) {
                ThrowIfError(InvalidArgument(
                    "hidden must be a contiguous [len(hidden_layers), len(tokens), hidden_size] "
                    "tensor"));
              }
              if (Unwrap(DTypeOf(rows)) != r.identity().layout.dtype) {
                ThrowIfError(InvalidArgument("hidden must have the layout's dtype"));
              }
              checkpoints.layers = hidden_layers;
              checkpoints.hidden_size = static_cast<int32_t>(rows.shape(2));
              checkpoints.data = {static_cast<const uint8_t*>(rows.data()), rows.nbytes()};
            }
            ExportResult res;
            {
              nb::gil_scoped_release release;
              res = Unwrap(r.Export(cache.view, block_table, tokens, seq_begin,
                                    hidden_layers.empty() ? nullptr : &checkpoints));
            }
            nb::dict d;
            d["record_id"] = res.record_id;
            d["bytes"] = res.bytes;
            d["deduplicated"] = res.deduplicated;
            return d;
          },
          nb::arg("cache"), nb::arg("block_table"), nb::arg("tokens"), nb::arg("seq_begin"),
          nb::arg("hidden_layers") = std::vector<int32_t>{}, nb::arg("hidden") = nb::none(),
          "Export tokens[i] at position seq_begin + i; returns record_id, bytes, deduplicated. "
          "Optional hidden-state checkpoints: hidden[c] holds the residual stream entering layer "
          "hidden_layers[c] for every token ([C, len(tokens), hidden_size], the layout's dtype).")
      .def(
          "read_hidden",
          [](KvRelay& r, const Span& span, const std::vector<int32_t>& prompt, int32_t layer) {
            std::vector<uint8_t> rows;
            {
              nb::gil_scoped_release release;
              rows = Unwrap(r.ReadHidden(span, prompt, layer));
            }
            return nb::bytes(reinterpret_cast<const char*>(rows.data()), rows.size());
          },
          nb::arg("span"), nb::arg("prompt"), nb::arg("layer"),
          "The span's hidden-state rows entering `layer` as bytes ([span.length, hidden_size] in "
          "the layout's dtype), verified like import_span; NotFoundError without that checkpoint.")
      .def(
          "lookup",
          [](KvRelay& r, const std::vector<int32_t>& prompt, int32_t begin) {
            nb::gil_scoped_release release;  // may sync with a remote directory
            return r.Lookup(prompt, begin);
          },
          nb::arg("prompt"), nb::arg("begin") = 0)
      .def(
          "import_span",
          [](KvRelay& r, const Span& span, const std::vector<int32_t>& prompt,
             const PyPagedCache& cache, const std::vector<int32_t>& block_table) {
            ImportResult res;
            {
              nb::gil_scoped_release release;
              res = Unwrap(r.Import(span, prompt, cache.view, block_table));
            }
            nb::dict d;
            d["tokens"] = res.tokens;
            d["bytes"] = res.bytes;
            d["position_delta"] = res.position_delta;
            return d;
          },
          nb::arg("span"), nb::arg("prompt"), nb::arg("cache"), nb::arg("block_table"),
          "Scatter a span's KV into the prompt's blocks and re-rotate K; raises on failure "
          "(NotFoundError, DataLossError, FailedPreconditionError, AbortedError, ...).")
      .def("delete",
           [](KvRelay& r, uint64_t id) {
             if (r.store() == nullptr) {
               ThrowIfError(
                   FailedPrecondition("delete: records of a distributed relay are "
                                      "removed by their store server"));
             }
             ThrowIfError(r.store()->Delete(id));
           })
      .def("metrics", [](const KvRelay& r) { return MetricsDict(r.Metrics()); })
      .def("store_stats", [](const KvRelay& r) { return StoreStatsDict(r.store_stats()); });
}

}  // namespace relaykv::python
