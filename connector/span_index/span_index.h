// Span index: for a new prompt, finds the runs of tokens that equal runs of
// stored records, at any offset in either.
//
// An exported record is found again when another agent quotes it behind its own
// prefix, so neither the record's start nor the quote's start can be assumed to
// line up with anything: matching is content-defined. Each sequence (stored
// record or query) is reduced to "anchors": the minimum-hash k-gram of every
// window of w consecutive k-grams (minimizers). Equal content yields equal
// anchors wherever it sits, so every common run of at least w + k - 1 tokens
// shares one anchor between query and record. A query probes only its own
// anchors, and every hit is extended left and right by comparing tokens against
// the copy of the record kept here: a hash is a hint, never evidence.
//
// Thread safety: all methods may be called concurrently; lookups share a lock,
// Insert and Remove take it exclusively.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "transfer/common/status.h"

namespace relaykv {

// KV is only reusable between the same model, the same cache layout and the
// same tenant; records of different namespaces never match each other.
struct SpanNamespace {
  uint64_t model_fingerprint = 0;
  uint64_t layout_fingerprint = 0;
  std::string tenant;

  bool operator==(const SpanNamespace&) const = default;
};

// Query tokens [dst_offset, dst_offset + length) equal record tokens
// [src_offset, src_offset + length).
struct Span {
  uint64_t record_id = 0;
  int32_t src_offset = 0;
  int32_t dst_offset = 0;
  int32_t length = 0;

  bool operator==(const Span&) const = default;
};

struct SpanIndexOptions {
  // Shorter runs are not worth a transfer and a rectification.
  int32_t min_span_tokens = 16;
  // k: tokens per hashed k-gram. Larger k makes incidental matches of common
  // short phrases rarer; smaller k leaves room for a larger window.
  int32_t kgram_tokens = 6;
  // w: k-grams per minimizer window. About 2 / (w + 1) of all positions become
  // anchors, so a larger window means fewer probes per query.
  int32_t window_kgrams = 11;
  // Postings kept per anchor key; beyond it the oldest record's posting is
  // replaced. Bounds the work on text many records share (system prompts,
  // boilerplate): every posting of a probed key costs a random read of a
  // record. The newest records keep such text findable, and an older record's
  // own run is still reached through its other anchors and extended across the
  // shared part; what can be lost is an old record's run whose anchors all sit
  // in shared text (in practice a few tokens past a shared prefix, which a
  // newer record covers up to there).
  int32_t max_postings_per_hash = 16;
  // Test hook: replaces the k-gram hash (e.g. by a deliberately colliding one).
  // Must be deterministic; the span results must not depend on its quality.
  std::function<uint64_t(std::span<const int32_t> kgram)> kgram_hash_for_testing;

  // Checks every field; min_span_tokens >= kgram_tokens + window_kgrams - 1 is
  // what guarantees that every common run of min_span_tokens is found (as long
  // as max_postings_per_hash dropped none of its postings).
  Status Validate() const;
};

class SpanIndex {
 public:
  static Result<std::unique_ptr<SpanIndex>> Create(SpanIndexOptions options = {});
  ~SpanIndex();
  SpanIndex(const SpanIndex&) = delete;
  SpanIndex& operator=(const SpanIndex&) = delete;

  // Indexes a record's tokens (copied). Record ids are unique across all
  // namespaces: AlreadyExists for an id that is present.
  Status Insert(const SpanNamespace& ns, uint64_t record_id, std::span<const int32_t> tokens);

  // Forgets a record (the store evicted or deleted it). False if unknown.
  bool Remove(uint64_t record_id);

  // The spans to import for `query`, considering only tokens from query_begin
  // on: maximal common runs of at least min_span_tokens, non-overlapping in the
  // query, sorted by dst_offset. Chosen greedily, longest first (ties: most
  // recently inserted record, then lowest dst_offset, then lowest src_offset);
  // the gaps left are then filled the same way from the remaining runs trimmed
  // to the gap, as long as a trimmed run keeps min_span_tokens.
  // An out-of-range query_begin yields no spans.
  std::vector<Span> Lookup(const SpanNamespace& ns, std::span<const int32_t> query,
                           int32_t query_begin = 0) const;

  // Every maximal common run of at least min_span_tokens between the query
  // (from query_begin on) and a record of `ns`, overlapping or not, sorted by
  // (dst_offset, record_id, src_offset). The candidates Lookup selects from;
  // also what a caller falls back on when the chosen record is gone.
  std::vector<Span> FindRuns(const SpanNamespace& ns, std::span<const int32_t> query,
                             int32_t query_begin = 0) const;

  // Bytes held: token copies, posting tables, bookkeeping.
  size_t MemoryBytes() const;
  size_t num_records() const;
  const SpanIndexOptions& options() const;

 private:
  class Impl;
  explicit SpanIndex(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace relaykv
