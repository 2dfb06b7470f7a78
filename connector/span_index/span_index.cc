#include "connector/span_index/span_index.h"

#include <xxhash.h>

#include <algorithm>
#include <iterator>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "connector/span_index/anchors.h"
#include "connector/span_index/posting_table.h"
#include "transfer/common/check.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace relaykv {
namespace {

using span_internal::Anchor;
using span_internal::AnchorSelector;
using span_internal::Posting;
using span_internal::PostingTable;

struct NamespaceHash {
  size_t operator()(const SpanNamespace& ns) const {
    const uint64_t h = XXH3_64bits_withSeed(ns.tenant.data(), ns.tenant.size(),
                                            ns.model_fingerprint ^ 0x9e3779b97f4a7c15ull);
    return static_cast<size_t>(h ^ (ns.layout_fingerprint * 0xc2b2ae3d27d4eb4full));
  }
};

// Number of leading positions where a[i] == b[i], at most `max`.
size_t MatchForward(const int32_t* a, const int32_t* b, size_t max) {
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= max; i += 4) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    const unsigned eq = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi32(x, y)));
    if (eq != 0xffffu) return i + static_cast<size_t>(__builtin_ctz(~eq)) / 4;
  }
#endif
  while (i < max && a[i] == b[i]) ++i;
  return i;
}

// Number of positions i where a_end[-1 - i] == b_end[-1 - i], counted from the
// end backwards until the first difference, at most `max`.
size_t MatchBackward(const int32_t* a_end, const int32_t* b_end, size_t max) {
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= max; i += 4) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a_end - i - 4));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b_end - i - 4));
    const unsigned ne = ~static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi32(x, y))) & 0xffffu;
    if (ne != 0) {
      // Lane 3 holds the element nearest to the end; the highest differing
      // lane bounds the run.
      const unsigned lane = (31u - static_cast<unsigned>(__builtin_clz(ne))) / 4;
      return i + 3 - lane;
    }
  }
#endif
  while (i < max &&
         a_end[-1 - static_cast<ptrdiff_t>(i)] == b_end[-1 - static_cast<ptrdiff_t>(i)]) {
    ++i;
  }
  return i;
}

// A verified maximal common run, before selection.
struct Run {
  uint64_t seq;  // insertion order of the record: newer wins ties
  uint64_t record_id;
  int32_t src;
  int32_t dst;
  int32_t len;
};

// Longest first, then newest record, then leftmost in the query, then in the
// record: a total order, so the selection never depends on probe order.
bool SelectsBefore(int32_t len_a, uint64_t seq_a, int32_t dst_a, int32_t src_a, int32_t len_b,
                   uint64_t seq_b, int32_t dst_b, int32_t src_b) {
  if (len_a != len_b) return len_a > len_b;
  if (seq_a != seq_b) return seq_a > seq_b;
  if (dst_a != dst_b) return dst_a < dst_b;
  return src_a < src_b;
}

struct Hit {
  int32_t q;  // absolute position in the query
  uint32_t slot;
  int32_t r;      // position in the record
  uint32_t next;  // next hit on the same (record, diagonal), kNoHit at the end
};
constexpr uint32_t kNoHit = std::numeric_limits<uint32_t>::max();

// The hits of one (record, diagonal), chained through Hit::next in q order.
struct Diagonal {
  uint32_t first;
  uint32_t last;
};

// uint64 key -> uint32 value, cleared in O(1) by a generation counter. Lives in
// per-thread scratch so a lookup allocates nothing in the steady state.
class FlatMap {
 public:
  void Reset(size_t expected_keys) {
    size_t need = 64;
    int bits = 6;
    while (need < 2 * expected_keys) {
      need *= 2;
      ++bits;
    }
    if (entries_.size() < need) {
      entries_.assign(need, Entry{});
      gen_ = 0;
    }
    if (++gen_ == 0) {
      std::fill(entries_.begin(), entries_.end(), Entry{});
      gen_ = 1;
    }
    mask_ = need - 1;
    shift_ = 64 - bits;
  }

  // The value stored for `key`, or a new entry holding `value_if_new`.
  // Returns the value slot and whether it was new.
  std::pair<uint32_t*, bool> FindOrInsert(uint64_t key, uint32_t value_if_new) {
    for (size_t i = static_cast<size_t>((key * 0x9e3779b97f4a7c15ull) >> shift_);;
         i = (i + 1) & mask_) {
      Entry& e = entries_[i];
      if (e.gen != gen_) {
        e = Entry{key, value_if_new, gen_};
        return {&e.value, true};
      }
      if (e.key == key) return {&e.value, false};
    }
  }

 private:
  struct Entry {
    uint64_t key = 0;
    uint32_t value = 0;
    uint32_t gen = 0;
  };
  std::vector<Entry> entries_;
  size_t mask_ = 0;
  int shift_ = 58;
  uint32_t gen_ = 0;
};

struct Scratch {
  std::vector<Anchor> anchors;
  std::vector<Hit> hits;
  std::vector<Diagonal> diagonals;
  FlatMap diagonal_of;  // (slot, diagonal) -> index in `diagonals`
  FlatMap run_of;       // (dst, len) -> index in `runs`
  std::vector<Run> runs;
};

Scratch& LocalScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Greedy selection (see SpanIndex::Lookup). `runs` is reordered.
std::vector<Span> SelectSpans(std::vector<Run>* runs, int32_t min_len, int32_t begin, int32_t end) {
  auto before = [](const Run& a, const Run& b) {
    return SelectsBefore(a.len, a.seq, a.dst, a.src, b.len, b.seq, b.dst, b.src);
  };
  std::sort(runs->begin(), runs->end(), before);

  std::vector<Run> chosen;  // sorted by dst, non-overlapping
  std::vector<Run> rest;
  for (const Run& r : *runs) {
    auto it = std::lower_bound(chosen.begin(), chosen.end(), r.dst,
                               [](const Run& c, int32_t dst) { return c.dst < dst; });
    const bool overlaps = (it != chosen.end() && it->dst < r.dst + r.len) ||
                          (it != chosen.begin() && std::prev(it)->dst + std::prev(it)->len > r.dst);
    if (overlaps) {
      rest.push_back(r);
    } else {
      chosen.insert(it, r);
    }
  }

  // Fill each gap with the best remaining run trimmed to it; what is left of
  // the gap on either side is filled the same way.
  std::vector<std::pair<int32_t, int32_t>> gaps;
  int32_t prev_end = begin;
  for (const Run& c : chosen) {
    if (c.dst - prev_end >= min_len) gaps.emplace_back(prev_end, c.dst);
    prev_end = c.dst + c.len;
  }
  if (end - prev_end >= min_len) gaps.emplace_back(prev_end, end);
  const size_t num_chosen = chosen.size();
  while (!rest.empty() && !gaps.empty()) {
    const auto [gap_begin, gap_end] = gaps.back();
    gaps.pop_back();
    const Run* best = nullptr;
    int32_t best_begin = 0;
    int32_t best_len = 0;
    for (const Run& r : rest) {
      const int32_t b = std::max(gap_begin, r.dst);
      const int32_t len = std::min(gap_end, r.dst + r.len) - b;
      if (len < min_len) continue;
      const int32_t src = r.src + (b - r.dst);
      if (best == nullptr || SelectsBefore(len, r.seq, b, src, best_len, best->seq, best_begin,
                                           best->src + (best_begin - best->dst))) {
        best = &r;
        best_begin = b;
        best_len = len;
      }
    }
    if (best == nullptr) continue;
    chosen.push_back(Run{best->seq, best->record_id, best->src + (best_begin - best->dst),
                         best_begin, best_len});
    if (best_begin - gap_begin >= min_len) gaps.emplace_back(gap_begin, best_begin);
    if (gap_end - (best_begin + best_len) >= min_len) {
      gaps.emplace_back(best_begin + best_len, gap_end);
    }
  }
  if (chosen.size() != num_chosen) {
    std::sort(chosen.begin(), chosen.end(),
              [](const Run& a, const Run& b) { return a.dst < b.dst; });
  }

  std::vector<Span> spans;
  spans.reserve(chosen.size());
  for (const Run& c : chosen) spans.push_back(Span{c.record_id, c.src, c.dst, c.len});
  return spans;
}

}  // namespace

Status SpanIndexOptions::Validate() const {
  // Bounded so that k + w and the per-window bookkeeping cannot overflow.
  constexpr int32_t kMaxTokens = 1 << 20;
  if (kgram_tokens < 1 || kgram_tokens > kMaxTokens) {
    return InvalidArgument("span index option kgram_tokens = " + std::to_string(kgram_tokens) +
                           ", expected 1.." + std::to_string(kMaxTokens));
  }
  if (window_kgrams < 1 || window_kgrams > kMaxTokens) {
    return InvalidArgument("span index option window_kgrams = " + std::to_string(window_kgrams) +
                           ", expected 1.." + std::to_string(kMaxTokens));
  }
  const int32_t guaranteed = kgram_tokens + window_kgrams - 1;
  if (min_span_tokens < guaranteed) {
    return InvalidArgument(
        "span index option min_span_tokens = " + std::to_string(min_span_tokens) +
        ", expected >= kgram_tokens + " + "window_kgrams - 1 = " + std::to_string(guaranteed) +
        " (shorter runs could share no anchor and be missed)");
  }
  if (max_postings_per_hash < 1) {
    return InvalidArgument("span index option max_postings_per_hash = " +
                           std::to_string(max_postings_per_hash) + ", expected >= 1");
  }
  return Status::Ok();
}

class SpanIndex::Impl {
 public:
  explicit Impl(SpanIndexOptions options)
      : options_(std::move(options)),
        selector_(options_.kgram_tokens, options_.window_kgrams, options_.kgram_hash_for_testing) {}

  Status Insert(const SpanNamespace& ns, uint64_t record_id, std::span<const int32_t> tokens) {
    if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
      return InvalidArgument("record " + std::to_string(record_id) + " has " +
                             std::to_string(tokens.size()) + " tokens, more than 2^31 - 1");
    }
    // Hashing and copying need no lock; readers wait only for the postings.
    std::vector<Anchor> anchors;
    selector_.Select(tokens, &anchors);
    std::vector<int32_t> copy(tokens.begin(), tokens.end());

    std::unique_lock lock(mu_);
    if (slot_of_.contains(record_id)) {
      return AlreadyExists("record " + std::to_string(record_id) + " is already indexed");
    }
    std::unique_ptr<Shard>& shard = shards_[ns];
    if (shard == nullptr) {
      shard = std::make_unique<Shard>();
      shard->ns = ns;
    }
    uint32_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      RELAYKV_CHECK(records_.size() < std::numeric_limits<uint32_t>::max());
      slot = static_cast<uint32_t>(records_.size());
      records_.emplace_back();
    }
    Record& rec = records_[slot];
    rec.id = record_id;
    rec.seq = next_seq_++;
    rec.shard = shard.get();
    token_bytes_ += copy.capacity() * sizeof(int32_t);
    rec.tokens = std::move(copy);
    slot_of_.emplace(record_id, slot);
    ++shard->num_records;
    const auto age_of = [this](uint32_t s) { return records_[s].seq; };
    for (const Anchor& a : anchors) {
      shard->table.Add(a.key, slot, a.pos, options_.max_postings_per_hash, age_of);
    }
    return Status::Ok();
  }

  bool Remove(uint64_t record_id) {
    std::unique_lock lock(mu_);
    auto it = slot_of_.find(record_id);
    if (it == slot_of_.end()) return false;
    const uint32_t slot = it->second;
    slot_of_.erase(it);
    Record& rec = records_[slot];
    Shard* shard = rec.shard;
    // The record's anchors are recomputed from its tokens rather than stored:
    // removal is rare, memory is not.
    std::vector<Anchor>& anchors = LocalScratch().anchors;
    selector_.Select(rec.tokens, &anchors);
    for (const Anchor& a : anchors) {
      shard->table.Erase(a.key, slot, a.pos);
    }
    token_bytes_ -= rec.tokens.capacity() * sizeof(int32_t);
    rec = Record{};
    free_slots_.push_back(slot);
    if (--shard->num_records == 0) shards_.erase(shards_.find(shard->ns));
    return true;
  }

  // Every verified maximal common run >= min_span_tokens, unordered. With
  // dedupe_intervals, of the runs covering the same query interval only the
  // one the selection prefers.
  void CollectRuns(const SpanNamespace& ns, std::span<const int32_t> query, int32_t begin,
                   bool dedupe_intervals, Scratch* s) const {
    s->runs.clear();
    if (query.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) return;
    const int32_t n = static_cast<int32_t>(query.size());
    const int32_t min_len = options_.min_span_tokens;
    if (begin < 0 || begin > n || n - begin < min_len) return;
    selector_.Select(query.subspan(static_cast<size_t>(begin)), &s->anchors);
    if (s->anchors.empty()) return;

    std::shared_lock lock(mu_);
    auto shard_it = shards_.find(ns);
    if (shard_it == shards_.end()) return;
    const Shard* shard = shard_it->second.get();
    const PostingTable& table = shard->table;

    // Probes are independent cache misses into a table of hundreds of MB;
    // prefetching a few ahead overlaps them instead of paying them in turn.
    constexpr size_t kAhead = 16;
    const size_t num_anchors = s->anchors.size();
    for (size_t i = 0; i < std::min(kAhead, num_anchors); ++i) {
      __builtin_prefetch(table.HomeAddress(s->anchors[i].key));
    }
    s->hits.clear();
    for (size_t i = 0; i < num_anchors; ++i) {
      if (i + kAhead < num_anchors) {
        __builtin_prefetch(table.HomeAddress(s->anchors[i + kAhead].key));
      }
      const int32_t q = begin + s->anchors[i].pos;
      table.ForEach(s->anchors[i].key, [&](const Posting& p) {
        s->hits.push_back(Hit{q, p.slot, p.offset, kNoHit});
      });
    }

    // Group the hits by (record, diagonal). Hits come in increasing q, so each
    // chain is in q order too.
    s->diagonals.clear();
    s->diagonal_of.Reset(s->hits.size());
    for (uint32_t i = 0; i < s->hits.size(); ++i) {
      Hit& h = s->hits[i];
      h.next = kNoHit;
      const uint64_t key = (uint64_t{h.slot} << 32) | static_cast<uint32_t>(h.r - h.q);
      auto [d, is_new] =
          s->diagonal_of.FindOrInsert(key, static_cast<uint32_t>(s->diagonals.size()));
      if (is_new) {
        s->diagonals.push_back(Diagonal{i, i});
      } else {
        s->hits[s->diagonals[*d].last].next = i;
        s->diagonals[*d].last = i;
      }
    }

    // Extending a hit reads a record nothing else touched: a cache miss each.
    // Diagonals are independent, so the records of later ones are prefetched
    // (descriptor first, then its tokens) while earlier ones are compared.
    // Every run comes from a distinct hit: the hit count bounds the keys.
    if (dedupe_intervals) s->run_of.Reset(s->hits.size());
    constexpr size_t kRecordAhead = 16;
    constexpr size_t kTokensAhead = 8;
    const size_t num_diagonals = s->diagonals.size();
    const int32_t* qt = query.data();
    for (size_t g = 0; g < num_diagonals; ++g) {
      if (g + kRecordAhead < num_diagonals) {
        __builtin_prefetch(&records_[s->hits[s->diagonals[g + kRecordAhead].first].slot]);
      }
      if (g + kTokensAhead < num_diagonals) {
        const Hit& h = s->hits[s->diagonals[g + kTokensAhead].first];
        const Record& rec = records_[h.slot];
        if (static_cast<size_t>(h.r) < rec.tokens.size()) {
          __builtin_prefetch(rec.tokens.data() + h.r);
        }
      }
      const uint32_t slot = s->hits[s->diagonals[g].first].slot;
      const Record& rec = records_[slot];
      // A posting always belongs to its shard's records; checked anyway since
      // crossing namespaces would hand out another tenant's KV.
      if (rec.shard != shard) continue;
      const int32_t* rt = rec.tokens.data();
      const int32_t rn = static_cast<int32_t>(rec.tokens.size());
      // A hit inside the run last extended on this diagonal belongs to it.
      int32_t q_end = std::numeric_limits<int32_t>::min();
      for (uint32_t i = s->diagonals[g].first; i != kNoHit; i = s->hits[i].next) {
        const Hit& h = s->hits[i];
        if (h.q < q_end || h.r < 0 || h.r >= rn) continue;
        const int32_t right = static_cast<int32_t>(
            MatchForward(qt + h.q, rt + h.r, static_cast<size_t>(std::min(n - h.q, rn - h.r))));
        q_end = h.q + std::max(right, 1);
        // A colliding hash whose own token differs: extending it to the left
        // could only rediscover the run that ended just before it.
        if (right == 0) continue;
        const int32_t left = static_cast<int32_t>(
            MatchBackward(qt + h.q, rt + h.r, static_cast<size_t>(std::min(h.q - begin, h.r))));
        if (left + right < min_len) continue;
        const Run run{rec.seq, rec.id, h.r - left, h.q - left, left + right};
        if (!dedupe_intervals) {
          s->runs.push_back(run);
          continue;
        }
        // Runs over the same query interval (common text in many records):
        // only the one the selection would prefer can ever be chosen.
        const uint64_t key =
            (uint64_t{static_cast<uint32_t>(run.dst)} << 32) | static_cast<uint32_t>(run.len);
        auto [idx, is_new] = s->run_of.FindOrInsert(key, static_cast<uint32_t>(s->runs.size()));
        if (is_new) {
          s->runs.push_back(run);
        } else {
          Run& kept = s->runs[*idx];
          if (SelectsBefore(run.len, run.seq, run.dst, run.src, kept.len, kept.seq, kept.dst,
                            kept.src)) {
            kept = run;
          }
        }
      }
    }
  }

  std::vector<Span> Lookup(const SpanNamespace& ns, std::span<const int32_t> query,
                           int32_t begin) const {
    Scratch& s = LocalScratch();
    CollectRuns(ns, query, begin, /*dedupe_intervals=*/true, &s);
    if (s.runs.empty()) return {};
    return SelectSpans(&s.runs, options_.min_span_tokens, begin,
                       static_cast<int32_t>(query.size()));
  }

  std::vector<Span> FindRuns(const SpanNamespace& ns, std::span<const int32_t> query,
                             int32_t begin) const {
    Scratch& s = LocalScratch();
    CollectRuns(ns, query, begin, /*dedupe_intervals=*/false, &s);
    std::vector<Span> spans;
    spans.reserve(s.runs.size());
    for (const Run& r : s.runs) spans.push_back(Span{r.record_id, r.src, r.dst, r.len});
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      if (a.dst_offset != b.dst_offset) return a.dst_offset < b.dst_offset;
      if (a.record_id != b.record_id) return a.record_id < b.record_id;
      return a.src_offset < b.src_offset;
    });
    return spans;
  }

  size_t MemoryBytes() const {
    std::shared_lock lock(mu_);
    size_t bytes = sizeof(*this) + token_bytes_ + records_.capacity() * sizeof(Record) +
                   free_slots_.capacity() * sizeof(uint32_t);
    // Node-based map: one node (key, value, next, cached hash) per id plus buckets.
    bytes += slot_of_.size() * (sizeof(std::pair<const uint64_t, uint32_t>) + 2 * sizeof(void*)) +
             slot_of_.bucket_count() * sizeof(void*);
    for (const auto& [ns, shard] : shards_) {
      bytes += sizeof(Shard) + 2 * sizeof(void*) + ns.tenant.capacity() +
               shard->ns.tenant.capacity() + shard->table.MemoryBytes();
    }
    return bytes;
  }

  size_t num_records() const {
    std::shared_lock lock(mu_);
    return slot_of_.size();
  }

  const SpanIndexOptions& options() const { return options_; }

 private:
  struct Shard {
    SpanNamespace ns;
    PostingTable table;
    size_t num_records = 0;
  };
  struct Record {
    uint64_t id = 0;
    uint64_t seq = 0;
    Shard* shard = nullptr;  // null: free slot
    std::vector<int32_t> tokens;
  };

  const SpanIndexOptions options_;
  const AnchorSelector selector_;
  mutable std::shared_mutex mu_;
  std::unordered_map<SpanNamespace, std::unique_ptr<Shard>, NamespaceHash> shards_;
  std::vector<Record> records_;  // by slot, the id postings carry
  std::vector<uint32_t> free_slots_;
  std::unordered_map<uint64_t, uint32_t> slot_of_;
  uint64_t next_seq_ = 1;
  size_t token_bytes_ = 0;
};

Result<std::unique_ptr<SpanIndex>> SpanIndex::Create(SpanIndexOptions options) {
  RELAYKV_RETURN_IF_ERROR(options.Validate());
  return std::unique_ptr<SpanIndex>(new SpanIndex(std::make_unique<Impl>(std::move(options))));
}

SpanIndex::SpanIndex(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpanIndex::~SpanIndex() = default;

Status SpanIndex::Insert(const SpanNamespace& ns, uint64_t record_id,
                         std::span<const int32_t> tokens) {
  return impl_->Insert(ns, record_id, tokens);
}

bool SpanIndex::Remove(uint64_t record_id) { return impl_->Remove(record_id); }

std::vector<Span> SpanIndex::Lookup(const SpanNamespace& ns, std::span<const int32_t> query,
                                    int32_t query_begin) const {
  return impl_->Lookup(ns, query, query_begin);
}

std::vector<Span> SpanIndex::FindRuns(const SpanNamespace& ns, std::span<const int32_t> query,
                                      int32_t query_begin) const {
  return impl_->FindRuns(ns, query, query_begin);
}

size_t SpanIndex::MemoryBytes() const { return impl_->MemoryBytes(); }
size_t SpanIndex::num_records() const { return impl_->num_records(); }
const SpanIndexOptions& SpanIndex::options() const { return impl_->options(); }

}  // namespace relaykv
