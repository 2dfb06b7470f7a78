// KvRelay: the export and import halves of the data flow, on one instance.
//
// Export gathers a sequence's KV from the paged cache straight into space
// reserved in the store (no staging copy), seals the record and indexes its
// tokens. Import verifies a stored record against this instance (checksums,
// model, layout, RoPE, tenant, the tokens themselves), scatters the span into
// the destination blocks and re-rotates K to the span's new positions.
//
// Caches may live on a GPU (PagedKvCache::on_device, builds with CUDA): the
// record stays in host memory and the span moves through a staging buffer on
// the cache's device (kv_ops_cuda.h: ImportToDeviceCache/ExportFromDeviceCache).
//
// Every failure comes back as a Status and is counted by reason; the caller
// recomputes the affected tokens. Nothing half-imported is reported as done:
// on failure the destination blocks hold unspecified bytes the caller must
// overwrite by computing those tokens.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include "connector/kv_ops/paged_kv.h"
#include "connector/span_index/span_index.h"
#include "transfer/common/status.h"
#include "transfer/record/kv_layout.h"
#include "transfer/record/record.h"
#include "transfer/record/rope_params.h"
#include "transfer/store/embedded_store.h"
#if RELAYKV_HAVE_SERVER
#include "transfer/server/store_client.h"
#endif

namespace relaykv {

// What an instance is: records cross between instances only when all of it agrees.
struct InstanceIdentity {
  uint64_t model_fingerprint = 0;
  KvLayout layout;
  RopeParams rope;
  std::string tenant;

  Status Validate() const;
  SpanNamespace Namespace() const {
    return SpanNamespace{model_fingerprint, layout.Fingerprint(), tenant};
  }
};

// Why an import fell back to recompute; indexes RelayMetrics::import_failures.
enum class ImportFailure : uint8_t {
  kNotFound = 0,   // evicted or never stored
  kCorrupt,        // checksum or format error
  kMismatch,       // model, layout, RoPE or tenant differ
  kTokenMismatch,  // the record no longer holds the tokens the index promised
  kInvalid,        // bad request (destination out of range, ...)
  kOther,
  kUnavailable,  // store server or directory unreachable, or a remote wait timed out
};
inline constexpr size_t kNumImportFailures = 7;
std::string_view ImportFailureName(ImportFailure f);
ImportFailure ClassifyImportFailure(const Status& s);

struct RelayMetrics {
  uint64_t exports = 0;
  uint64_t export_dedup = 0;  // same content already stored
  uint64_t export_failures = 0;
  uint64_t export_bytes = 0;
  uint64_t imports = 0;
  uint64_t import_tokens = 0;
  uint64_t import_bytes = 0;
  std::array<uint64_t, kNumImportFailures> import_failures{};
  uint64_t lookups = 0;
  uint64_t lookup_tokens_matched = 0;
  // Distributed mode: directory syncs of the span index, and failed ones
  // (lookups then answer from what the index already knows).
  uint64_t index_syncs = 0;
  uint64_t index_sync_failures = 0;
};

// Hidden-state checkpoints exported with a record (optional): checkpoint c
// holds, for every exported token, the residual stream entering layer
// layers[c] (layers[c] == num_layers: the last layer's output), in the layout's
// dtype, laid out [checkpoint][token][hidden_size] contiguously in `data`.
// A rectifier restarts a span token at layer layers[c] from these rows instead
// of recomputing it from the embedding.
struct HiddenCheckpoints {
  std::vector<int32_t> layers;  // strictly increasing, in [0, num_layers]
  int32_t hidden_size = 0;
  std::span<const uint8_t> data;
};

struct ExportResult {
  uint64_t record_id = 0;
  uint64_t bytes = 0;
  bool deduplicated = false;  // an identical record was already stored
};

struct ImportResult {
  int32_t tokens = 0;
  uint64_t bytes = 0;
  int64_t position_delta = 0;  // of the first token; per-token deltas may differ
};

class KvRelay {
 public:
  // Owns an embedded store and a span index wired together: whatever the
  // store evicts disappears from the index.
  static Result<std::unique_ptr<KvRelay>> Create(InstanceIdentity identity,
                                                 StoreOptions store_options,
                                                 SpanIndexOptions index_options = {});

#if RELAYKV_HAVE_SERVER
  // Records live on store servers found through a directory, shared by every
  // instance of the deployment. Export builds the record in a staging buffer
  // and puts it on a server; import reads it back into a staging buffer; the
  // span index follows the directory's events for this instance's namespace
  // (at most every `index_sync_interval`, at lookup time), so it finds what
  // other instances exported.
  static Result<std::unique_ptr<KvRelay>> CreateDistributed(
      InstanceIdentity identity, DistributedStoreOptions store_options,
      SpanIndexOptions index_options = {},
      std::chrono::milliseconds index_sync_interval = std::chrono::milliseconds(50));
#endif
  bool distributed() const { return store_ == nullptr; }

  // Exports sequence tokens [seq_begin, seq_begin + tokens.size()) whose KV sits
  // in `cache` under `block_table`; `tokens[i]` is the id at position
  // seq_begin + i. The record id is derived from the content (hidden
  // checkpoint layers included, so a record with checkpoints never dedups
  // against one without). `hidden`, when given, is stored in the record.
  Result<ExportResult> Export(const PagedKvCache& cache, std::span<const int32_t> block_table,
                              std::span<const int32_t> tokens, int32_t seq_begin,
                              const HiddenCheckpoints* hidden = nullptr);

  // Spans of `prompt` (from `begin` on) that stored records cover.
  std::vector<Span> Lookup(std::span<const int32_t> prompt, int32_t begin = 0);

  // Imports one span into prompt positions [span.dst_offset, +span.length).
  Result<ImportResult> Import(const Span& span, std::span<const int32_t> prompt,
                              const PagedKvCache& cache, std::span<const int32_t> block_table);

  // The hidden-state rows of a span's tokens at checkpoint `layer` (the
  // residual stream entering that layer), after the same verification as
  // Import (record checksums, identity, the prompt's tokens): span.length rows
  // of hidden_size elements in the layout's dtype. NotFound when the record
  // has no checkpoint at `layer`.
  Result<std::vector<uint8_t>> ReadHidden(const Span& span, std::span<const int32_t> prompt,
                                          int32_t layer);

  RelayMetrics Metrics() const;
  // Embedded mode only (a distributed relay's store lives in other processes:
  // zeros here).
  StoreStats store_stats() const { return store_ ? store_->Stats() : StoreStats{}; }
  const InstanceIdentity& identity() const { return identity_; }
  // Embedded mode: the store; nullptr when distributed.
  EmbeddedStore* store() { return store_.get(); }
  // Pulls the directory's changes into the span index now (distributed mode;
  // a no-op otherwise). Lookup does this on its own, rate-limited.
  Status SyncIndex(bool force = true);
  SpanIndex& index() { return *index_; }

 private:
  explicit KvRelay(InstanceIdentity identity) : identity_(std::move(identity)) {}
  Status CheckCache(const PagedKvCache& cache) const;
  // The stored record of `span`, verified against this instance and `prompt`.
  // `lease` keeps the record's memory while the view is used.
  struct RecordHold;
  Result<RecordView> OpenSpan(const Span& span, std::span<const int32_t> prompt, RecordHold* hold);
  Result<ImportResult> ImportLocked(const Span& span, std::span<const int32_t> prompt,
                                    const PagedKvCache& cache,
                                    std::span<const int32_t> block_table);

  InstanceIdentity identity_;
  // The store's removal listener points at the index: the index is declared
  // first so it is destroyed last.
  std::unique_ptr<SpanIndex> index_;
  std::unique_ptr<EmbeddedStore> store_;  // embedded mode
#if RELAYKV_HAVE_SERVER
  std::unique_ptr<DistributedStore> remote_;  // distributed mode
#endif
  std::string ns_;  // this instance's record namespace key
  // Directory sync state (distributed mode).
  std::mutex sync_mu_;
  uint64_t synced_seq_ = 0;
  std::chrono::steady_clock::time_point synced_at_{};
  std::chrono::milliseconds sync_interval_{50};
  std::unordered_set<uint64_t> synced_ids_;

  struct AtomicMetrics {
    std::atomic<uint64_t> exports{0}, export_dedup{0}, export_failures{0}, export_bytes{0};
    std::atomic<uint64_t> imports{0}, import_tokens{0}, import_bytes{0};
    std::array<std::atomic<uint64_t>, kNumImportFailures> import_failures{};
    std::atomic<uint64_t> lookups{0}, lookup_tokens_matched{0};
    std::atomic<uint64_t> index_syncs{0}, index_sync_failures{0};
  };
  AtomicMetrics m_;
};

// Content-derived record id: namespace and tokens and positions.
uint64_t RecordIdFor(const InstanceIdentity& identity, std::span<const int32_t> tokens,
                     int32_t seq_begin);

}  // namespace relaykv
