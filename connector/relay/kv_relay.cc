#include "connector/relay/kv_relay.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "connector/kv_ops/rope.h"
#if RELAYKV_HAVE_CUDA
#include "connector/kv_ops/kv_ops_cuda.h"
#endif
#include "transfer/record/record.h"

namespace relaykv {

Status InstanceIdentity::Validate() const {
  RELAYKV_RETURN_IF_ERROR(layout.Validate());
  RELAYKV_RETURN_IF_ERROR(rope.Validate(layout.head_size));
  if (tenant.size() > kRecordMaxTenantSize) {
    return InvalidArgument("tenant must be at most " + std::to_string(kRecordMaxTenantSize) +
                           " bytes, got " + std::to_string(tenant.size()));
  }
  return Status::Ok();
}

std::string_view ImportFailureName(ImportFailure f) {
  switch (f) {
    case ImportFailure::kNotFound:
      return "not_found";
    case ImportFailure::kCorrupt:
      return "corrupt";
    case ImportFailure::kMismatch:
      return "mismatch";
    case ImportFailure::kTokenMismatch:
      return "token_mismatch";
    case ImportFailure::kInvalid:
      return "invalid";
    case ImportFailure::kOther:
      return "other";
    case ImportFailure::kUnavailable:
      return "unavailable";
  }
  return "other";
}

ImportFailure ClassifyImportFailure(const Status& s) {
  switch (s.code()) {
    case StatusCode::kNotFound:
      return ImportFailure::kNotFound;
    case StatusCode::kDataLoss:
      return ImportFailure::kCorrupt;
    case StatusCode::kFailedPrecondition:
    case StatusCode::kPermissionDenied:
      return ImportFailure::kMismatch;
    case StatusCode::kAborted:
      return ImportFailure::kTokenMismatch;
    case StatusCode::kInvalidArgument:
      return ImportFailure::kInvalid;
    case StatusCode::kUnavailable:
    case StatusCode::kDeadlineExceeded:
      return ImportFailure::kUnavailable;
    default:
      return ImportFailure::kOther;
  }
}

uint64_t RecordIdFor(const InstanceIdentity& identity, std::span<const int32_t> tokens,
                     int32_t seq_begin) {
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, identity.model_fingerprint);
  const uint64_t layout_fp = identity.layout.Fingerprint();
  const uint64_t rope_fp = identity.rope.Fingerprint();
  XXH64_update(st, &layout_fp, sizeof(layout_fp));
  XXH64_update(st, &rope_fp, sizeof(rope_fp));
  XXH64_update(st, identity.tenant.data(), identity.tenant.size());
  XXH64_update(st, &seq_begin, sizeof(seq_begin));
  XXH64_update(st, tokens.data(), tokens.size_bytes());
  const uint64_t id = XXH64_digest(st);
  XXH64_freeState(st);
  return id;
}

Result<std::unique_ptr<KvRelay>> KvRelay::Create(InstanceIdentity identity,
                                                 StoreOptions store_options,
                                                 SpanIndexOptions index_options) {
  RELAYKV_RETURN_IF_ERROR(identity.Validate());
  std::unique_ptr<KvRelay> relay(new KvRelay(std::move(identity)));
  RELAYKV_ASSIGN_OR_RETURN(relay->index_, SpanIndex::Create(std::move(index_options)));
  // SpanIndex::Remove is thread-safe and ignores ids it does not hold.
  SpanIndex* index = relay->index_.get();
  RemovalListener user_listener = std::move(store_options.on_removal);
  store_options.on_removal = [index, user_listener](RecordId id, RemovalReason reason) {
    index->Remove(id);
    if (user_listener) user_listener(id, reason);
  };
  RELAYKV_ASSIGN_OR_RETURN(relay->store_, EmbeddedStore::Create(std::move(store_options)));
  return relay;
}

Status KvRelay::CheckCache(const PagedKvCache& cache) const {
  RELAYKV_RETURN_IF_ERROR(cache.Validate());
  if (!(cache.layout == identity_.layout)) {
    return InvalidArgument("paged cache layout " + cache.layout.ToString() +
                           " differs from this instance's " + identity_.layout.ToString());
  }
#if !RELAYKV_HAVE_CUDA
  if (cache.on_device) {
    return Unimplemented("device-resident caches: relaykv was built without CUDA");
  }
#endif
  return Status::Ok();
}

namespace {

// Checks `hidden` against a record of `count` tokens and copies its layer list into `meta`.
Status AttachHidden(const HiddenCheckpoints& hidden, int32_t count, RecordMeta& meta) {
  if (hidden.layers.empty()) return Status::Ok();
  meta.hidden_layers = hidden.layers;
  meta.hidden_size = hidden.hidden_size;
  RELAYKV_RETURN_IF_ERROR(meta.Validate());
  const uint64_t want = static_cast<uint64_t>(hidden.layers.size()) * static_cast<uint64_t>(count) *
                        static_cast<uint64_t>(hidden.hidden_size) *
                        static_cast<uint64_t>(DTypeSize(meta.layout.dtype));
  if (hidden.data.size() != want) {
    return InvalidArgument(
        "hidden checkpoints hold " + std::to_string(hidden.data.size()) + " bytes, expected " +
        std::to_string(want) + " (" + std::to_string(hidden.layers.size()) + " checkpoints x " +
        std::to_string(count) + " tokens x " + std::to_string(hidden.hidden_size) + " elements)");
  }
  return Status::Ok();
}

// Sequence tokens [seq_begin, +count) of `cache` (host or device) into a host payload.
Status GatherToHost(const PagedKvCache& cache, std::span<const int32_t> block_table,
                    int32_t seq_begin, int32_t count, const KvPayload& payload) {
#if RELAYKV_HAVE_CUDA
  if (cache.on_device) {
    return ExportFromDeviceCache(cache, block_table, seq_begin, count, payload, 0);
  }
#endif
  return GatherKv(cache, block_table, seq_begin, count, payload, 0);
}

uint64_t MixHiddenLayers(uint64_t id, const RecordMeta& meta) {
  if (meta.hidden_layers.empty()) return id;
  return XXH64(meta.hidden_layers.data(), meta.hidden_layers.size() * sizeof(int32_t),
               id ^ static_cast<uint64_t>(meta.hidden_size));
}

}  // namespace

Result<ExportResult> KvRelay::Export(const PagedKvCache& cache,
                                     std::span<const int32_t> block_table,
                                     std::span<const int32_t> tokens, int32_t seq_begin,
                                     const HiddenCheckpoints* hidden) {
  auto fail = [this](Status s) {
    m_.export_failures.fetch_add(1, std::memory_order_relaxed);
    return s;
  };
  if (Status s = CheckCache(cache); !s.ok()) return fail(s);
  if (tokens.empty()) return fail(InvalidArgument("nothing to export: no tokens"));
  if (seq_begin < 0) return fail(InvalidArgument("seq_begin must be >= 0"));
  const auto count = static_cast<int32_t>(tokens.size());
  if (Status s =
          ValidatePagedRange(cache, block_table, seq_begin, count, /*device=*/cache.on_device);
      !s.ok()) {
    return fail(s);
  }

  RecordMeta meta;
  meta.model_fingerprint = identity_.model_fingerprint;
  meta.layout = identity_.layout;
  meta.rope = identity_.rope;
  meta.tenant = identity_.tenant;
  if (hidden != nullptr) {
    if (Status s = AttachHidden(*hidden, count, meta); !s.ok()) return fail(s);
  }
  auto size = RecordSize(meta, count);
  if (!size.ok()) return fail(size.status());

  ExportResult result;
  result.record_id = MixHiddenLayers(RecordIdFor(identity_, tokens, seq_begin), meta);
  result.bytes = *size;
  auto dedup = [&] {
    result.deduplicated = true;
    m_.export_dedup.fetch_add(1, std::memory_order_relaxed);
    return result;
  };
  std::vector<int32_t> positions(tokens.size());
  for (int32_t i = 0; i < count; ++i) positions[i] = seq_begin + i;
  // Fills a record in `buf` (store memory or a staging buffer).
  auto build = [&](void* buf, size_t buf_size) -> Status {
    RELAYKV_ASSIGN_OR_RETURN(RecordWriter writer,
                             RecordWriter::Create(meta, tokens, positions, buf, buf_size));
    const KvPayload payload{writer.payload(), count, identity_.layout, /*on_device=*/false};
    RELAYKV_RETURN_IF_ERROR(
        GatherToHost(cache, block_table, seq_begin, count, payload).WithContext("export gather"));
    if (!meta.hidden_layers.empty()) {
      const size_t per_checkpoint = hidden->data.size() / meta.hidden_layers.size();
      for (size_t c = 0; c < meta.hidden_layers.size(); ++c) {
        std::memcpy(writer.hidden(static_cast<int32_t>(c)),
                    hidden->data.data() + c * per_checkpoint, per_checkpoint);
      }
    }
    writer.Seal();
    return Status::Ok();
  };

  if (store_ != nullptr) {
    if (store_->Contains(result.record_id)) {
      // The id covers every byte that decides the content, so the stored record is this one.
      return dedup();
    }
    auto handle = store_->Reserve(result.record_id, *size);
    if (!handle.ok()) {
      if (handle.status().code() == StatusCode::kAlreadyExists)
        return dedup();  // a concurrent export won
      return fail(handle.status().WithContext("export reserve"));
    }
    if (Status s = build(handle->data(), handle->size()); !s.ok()) return fail(s);
    if (Status s = handle->Seal(); !s.ok()) return fail(s);
  } else {
#if RELAYKV_HAVE_SERVER
    RecordBuffer staging;
    staging.Resize(*size);
    if (Status s = build(staging.data(), staging.size()); !s.ok()) return fail(s);
    Status s = remote_->Put(ns_, result.record_id, staging.bytes());
    if (s.code() == StatusCode::kAlreadyExists) {
      (void)index_->Insert(identity_.Namespace(), result.record_id, tokens);
      return dedup();
    }
    if (!s.ok()) return fail(s.WithContext("export put"));
#endif
  }
  // Index after sealing so a lookup never names a record a reader cannot get.
  if (Status s = index_->Insert(identity_.Namespace(), result.record_id, tokens); !s.ok()) {
    if (s.code() != StatusCode::kAlreadyExists) return fail(s);
  }
  m_.exports.fetch_add(1, std::memory_order_relaxed);
  m_.export_bytes.fetch_add(result.bytes, std::memory_order_relaxed);
  return result;
}

std::vector<Span> KvRelay::Lookup(std::span<const int32_t> prompt, int32_t begin) {
  // A failed sync is counted; the index answers with what it already knows.
  if (store_ == nullptr) (void)SyncIndex(/*force=*/false);
  std::vector<Span> spans = index_->Lookup(identity_.Namespace(), prompt, begin);
  m_.lookups.fetch_add(1, std::memory_order_relaxed);
  uint64_t matched = 0;
  for (const Span& s : spans) matched += static_cast<uint64_t>(s.length);
  m_.lookup_tokens_matched.fetch_add(matched, std::memory_order_relaxed);
  return spans;
}

Result<ImportResult> KvRelay::Import(const Span& span, std::span<const int32_t> prompt,
                                     const PagedKvCache& cache,
                                     std::span<const int32_t> block_table) {
  auto result = ImportLocked(span, prompt, cache, block_table);
  if (result.ok()) {
    m_.imports.fetch_add(1, std::memory_order_relaxed);
    m_.import_tokens.fetch_add(static_cast<uint64_t>(result->tokens), std::memory_order_relaxed);
    m_.import_bytes.fetch_add(result->bytes, std::memory_order_relaxed);
  } else {
    const auto reason = static_cast<size_t>(ClassifyImportFailure(result.status()));
    m_.import_failures[reason].fetch_add(1, std::memory_order_relaxed);
    if (store_ == nullptr && result.status().code() == StatusCode::kNotFound) {
      // No live server holds it any more (evicted, or its holder died without a
      // goodbye): stop offering it, or every later prompt would claim it again.
      std::lock_guard<std::mutex> lock(sync_mu_);
      index_->Remove(span.record_id);
      synced_ids_.erase(span.record_id);
    }
  }
  return result;
}

// Keeps an opened record's bytes: a lease on the embedded store, or the
// staging copy read from a store server.
struct KvRelay::RecordHold {
  ReadLease lease;
#if RELAYKV_HAVE_SERVER
  RecordBuffer buffer;
#endif
};

Result<RecordView> KvRelay::OpenSpan(const Span& span, std::span<const int32_t> prompt,
                                     RecordHold* hold) {
  if (span.length <= 0 || span.src_offset < 0 || span.dst_offset < 0 ||
      static_cast<int64_t>(span.dst_offset) + span.length > static_cast<int64_t>(prompt.size())) {
    return InvalidArgument("span [" + std::to_string(span.dst_offset) + ", +" +
                           std::to_string(span.length) + ") does not fit a prompt of " +
                           std::to_string(prompt.size()) + " tokens");
  }
  const void* bytes = nullptr;
  size_t size = 0;
  if (store_ != nullptr) {
    RELAYKV_ASSIGN_OR_RETURN(hold->lease, store_->Get(span.record_id));
    bytes = hold->lease.data();
    size = hold->lease.size();
  } else {
#if RELAYKV_HAVE_SERVER
    RELAYKV_RETURN_IF_ERROR(remote_->Get(ns_, span.record_id, &hold->buffer));
    bytes = hold->buffer.data();
    size = hold->buffer.size();
#endif
  }
  RELAYKV_ASSIGN_OR_RETURN(RecordView view, ParseRecord(bytes, size));
  RELAYKV_RETURN_IF_ERROR(CheckCompatible(view, identity_.model_fingerprint, identity_.layout,
                                          identity_.rope, identity_.tenant));
  if (static_cast<int64_t>(span.src_offset) + span.length > view.num_tokens()) {
    return Aborted("span reaches past the record's " + std::to_string(view.num_tokens()) +
                   " tokens");
  }
  // The index verified these tokens when it answered; the record may have been
  // replaced since, so they are checked again against the bytes being imported.
  const auto src_tokens = view.tokens().subspan(span.src_offset, span.length);
  if (!std::equal(src_tokens.begin(), src_tokens.end(), prompt.begin() + span.dst_offset)) {
    return Aborted("record " + std::to_string(span.record_id) +
                   " no longer holds the prompt's tokens");
  }
  return view;
}

Result<std::vector<uint8_t>> KvRelay::ReadHidden(const Span& span, std::span<const int32_t> prompt,
                                                 int32_t layer) {
  RecordHold hold;
  RELAYKV_ASSIGN_OR_RETURN(RecordView view, OpenSpan(span, prompt, &hold));
  const std::vector<int32_t>& layers = view.meta().hidden_layers;
  const auto it = std::find(layers.begin(), layers.end(), layer);
  if (it == layers.end()) {
    return NotFound("record " + std::to_string(span.record_id) +
                    " has no hidden-state checkpoint at layer " + std::to_string(layer));
  }
  const int64_t stride = view.hidden_token_stride();
  const uint8_t* rows = view.hidden(static_cast<int32_t>(it - layers.begin())) +
                        static_cast<int64_t>(span.src_offset) * stride;
  return std::vector<uint8_t>(rows, rows + static_cast<int64_t>(span.length) * stride);
}

Result<ImportResult> KvRelay::ImportLocked(const Span& span, std::span<const int32_t> prompt,
                                           const PagedKvCache& cache,
                                           std::span<const int32_t> block_table) {
  RELAYKV_RETURN_IF_ERROR(CheckCache(cache));
  RecordHold hold;
  RELAYKV_ASSIGN_OR_RETURN(RecordView view, OpenSpan(span, prompt, &hold));
  RELAYKV_RETURN_IF_ERROR(ValidatePagedRange(cache, block_table, span.dst_offset, span.length,
                                             /*device=*/cache.on_device));

  const KvPayload payload{const_cast<uint8_t*>(view.payload()), view.num_tokens(), identity_.layout,
                          /*on_device=*/false};
  // K was rotated at the record's positions; it is rotated to the prompt's.
  const auto src_pos = view.positions().subspan(span.src_offset, span.length);
  std::vector<int64_t> deltas(span.length);
  bool uniform = true;
  for (int32_t i = 0; i < span.length; ++i) {
    deltas[i] = static_cast<int64_t>(span.dst_offset) + i - src_pos[i];
    uniform = uniform && deltas[i] == deltas[0];
  }
  ImportResult result;
  result.tokens = span.length;
  result.bytes = static_cast<uint64_t>(span.length) * identity_.layout.TokenBytes() * 2 *
                 static_cast<uint64_t>(identity_.layout.num_layers);
  result.position_delta = deltas[0];
  if (cache.on_device) {
#if RELAYKV_HAVE_CUDA
    RELAYKV_RETURN_IF_ERROR(ImportToDeviceCache(
        payload, span.src_offset, span.length, cache, block_table, span.dst_offset, identity_.rope,
        uniform ? std::span<const int64_t>(deltas.data(), 1) : std::span<const int64_t>(deltas)));
    return result;
#endif
  }
  RELAYKV_RETURN_IF_ERROR(
      ScatterKv(payload, span.src_offset, span.length, cache, block_table, span.dst_offset));
  if (uniform) {
    RELAYKV_RETURN_IF_ERROR(
        RerotateK(cache, block_table, span.dst_offset, span.length, identity_.rope, deltas[0]));
  } else {
    RELAYKV_RETURN_IF_ERROR(
        RerotateKPerToken(cache, block_table, span.dst_offset, deltas, identity_.rope));
  }
  return result;
}

RelayMetrics KvRelay::Metrics() const {
  RelayMetrics out;
  out.exports = m_.exports.load();
  out.export_dedup = m_.export_dedup.load();
  out.export_failures = m_.export_failures.load();
  out.export_bytes = m_.export_bytes.load();
  out.imports = m_.imports.load();
  out.import_tokens = m_.import_tokens.load();
  out.import_bytes = m_.import_bytes.load();
  for (size_t i = 0; i < kNumImportFailures; ++i)
    out.import_failures[i] = m_.import_failures[i].load();
  out.lookups = m_.lookups.load();
  out.lookup_tokens_matched = m_.lookup_tokens_matched.load();
  out.index_syncs = m_.index_syncs.load();
  out.index_sync_failures = m_.index_sync_failures.load();
  return out;
}

#if RELAYKV_HAVE_SERVER
Result<std::unique_ptr<KvRelay>> KvRelay::CreateDistributed(
    InstanceIdentity identity, DistributedStoreOptions store_options,
    SpanIndexOptions index_options, std::chrono::milliseconds index_sync_interval) {
  RELAYKV_RETURN_IF_ERROR(identity.Validate());
  auto relay = std::unique_ptr<KvRelay>(new KvRelay(std::move(identity)));
  RELAYKV_ASSIGN_OR_RETURN(relay->index_, SpanIndex::Create(std::move(index_options)));
  RELAYKV_ASSIGN_OR_RETURN(relay->remote_, DistributedStore::Open(store_options));
  const InstanceIdentity& id = relay->identity_;
  relay->ns_ = RecordNamespaceKey(id.model_fingerprint, id.layout.Fingerprint(), id.tenant);
  relay->sync_interval_ = index_sync_interval;
  return relay;
}
#endif

Status KvRelay::SyncIndex(bool force) {
#if RELAYKV_HAVE_SERVER
  if (store_ != nullptr) return Status::Ok();
  std::lock_guard<std::mutex> lock(sync_mu_);
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - synced_at_ < sync_interval_) return Status::Ok();
  synced_at_ = now;
  const SpanNamespace ns = identity_.Namespace();
  auto add = [&](const RecordEntry& e) {
    if (index_->Insert(ns, e.id, e.tokens).ok()) synced_ids_.insert(e.id);
  };
  Directory& dir = remote_->directory();
  constexpr size_t kBatch = 4096;
  for (;;) {
    auto batch = dir.EventsSince(ns_, synced_seq_, kBatch);
    if (!batch.ok()) {
      m_.index_sync_failures.fetch_add(1, std::memory_order_relaxed);
      return batch.status().WithContext("span index sync");
    }
    if (batch->truncated) {
      // Fell behind the directory's event window: rebuild from the listing.
      auto all = dir.ListRecords(ns_);
      if (!all.ok()) {
        m_.index_sync_failures.fetch_add(1, std::memory_order_relaxed);
        return all.status().WithContext("span index resync");
      }
      std::unordered_set<uint64_t> live;
      for (const RecordEntry& e : *all) live.insert(e.id);
      for (auto it = synced_ids_.begin(); it != synced_ids_.end();) {
        if (!live.contains(*it)) {
          index_->Remove(*it);
          it = synced_ids_.erase(it);
        } else {
          ++it;
        }
      }
      for (const RecordEntry& e : *all) {
        if (!synced_ids_.contains(e.id)) add(e);
      }
      synced_seq_ = batch->last_seq;
      continue;
    }
    for (const DirectoryEvent& ev : batch->events) {
      if (ev.kind == DirectoryEvent::Kind::kAdded) {
        add(ev.entry);
      } else {
        index_->Remove(ev.entry.id);
        synced_ids_.erase(ev.entry.id);
      }
      synced_seq_ = ev.seq;
    }
    if (batch->events.size() < kBatch) break;
  }
  m_.index_syncs.fetch_add(1, std::memory_order_relaxed);
#else
  (void)force;
#endif
  return Status::Ok();
}

}  // namespace relaykv
