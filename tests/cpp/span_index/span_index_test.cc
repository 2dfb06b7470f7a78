#include "connector/span_index/span_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace relaykv {

// gtest prints spans readably in failure messages.
void PrintTo(const Span& s, std::ostream* os) {
  *os << "{rec " << s.record_id << " src " << s.src_offset << " dst " << s.dst_offset << " len "
      << s.length << "}";
}

namespace {

using Tokens = std::vector<int32_t>;

const SpanNamespace kNs{1, 2, "tenant-a"};

std::unique_ptr<SpanIndex> MakeIndex(SpanIndexOptions options = {}) {
  auto index = SpanIndex::Create(std::move(options));
  EXPECT_TRUE(index.ok()) << index.status().ToString();
  return std::move(index).value();
}

// Tokens never produced before in this process: no incidental matches.
Tokens Unique(int n) {
  static std::atomic<int32_t> next{1000};
  Tokens t(static_cast<size_t>(n));
  const int32_t first = next.fetch_add(n);
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = first + i;
  return t;
}

Tokens Slice(const Tokens& t, int begin, int len) {
  return Tokens(t.begin() + begin, t.begin() + begin + len);
}

Tokens Concat(std::initializer_list<Tokens> parts) {
  Tokens out;
  for (const Tokens& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// ---------------------------------------------------------------------------
// Options

TEST(SpanIndexOptionsTest, DefaultsAreValid) { EXPECT_TRUE(SpanIndexOptions{}.Validate().ok()); }

TEST(SpanIndexOptionsTest, MinSpanMustCoverAWindow) {
  SpanIndexOptions o;
  o.kgram_tokens = 8;
  o.window_kgrams = 9;
  o.min_span_tokens = 15;  // < 8 + 9 - 1
  Status s = o.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("min_span_tokens"), std::string::npos) << s.ToString();
  EXPECT_FALSE(SpanIndex::Create(o).ok());
  o.min_span_tokens = 16;
  EXPECT_TRUE(SpanIndex::Create(o).ok());
}

TEST(SpanIndexOptionsTest, RejectsNonPositiveFields) {
  for (int field = 0; field < 3; ++field) {
    SpanIndexOptions o;
    if (field == 0) o.kgram_tokens = 0;
    if (field == 1) o.window_kgrams = -1;
    if (field == 2) o.max_postings_per_hash = 0;
    Status s = o.Validate();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << field;
  }
}

// ---------------------------------------------------------------------------
// Constructed cases (default options: min_span_tokens = 16)

TEST(SpanIndexTest, RecordBehindANewPrefix) {
  auto index = MakeIndex();
  const Tokens rec = Unique(100);
  ASSERT_TRUE(index->Insert(kNs, 7, rec).ok());
  const Tokens query = Concat({Unique(37), Slice(rec, 10, 80), Unique(20)});
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{7, 10, 37, 80}}));
  // Whole record, at the very start and at the very end of the query.
  EXPECT_EQ(index->Lookup(kNs, Concat({rec, Unique(5)})), (std::vector<Span>{{7, 0, 0, 100}}));
  EXPECT_EQ(index->Lookup(kNs, Concat({Unique(5), rec})), (std::vector<Span>{{7, 0, 5, 100}}));
}

TEST(SpanIndexTest, TwoRecordsBackToBack) {
  auto index = MakeIndex();
  const Tokens a = Unique(60);
  const Tokens b = Unique(90);
  ASSERT_TRUE(index->Insert(kNs, 1, a).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, b).ok());
  const Tokens query = Concat({Unique(11), Slice(a, 0, 50), Slice(b, 20, 60), Unique(3)});
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{1, 0, 11, 50}, {2, 20, 61, 60}}));
}

TEST(SpanIndexTest, OverlappingCandidatesLongestFirstThenTrimmed) {
  auto index = MakeIndex();
  const Tokens text = Unique(180);
  // a covers text[0, 100), b covers text[70, 180): they overlap on [70, 100).
  ASSERT_TRUE(index->Insert(kNs, 1, Concat({Slice(text, 0, 100), Unique(10)})).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, Concat({Unique(4), Slice(text, 70, 110)})).ok());
  const Tokens query = Concat({Unique(20), text, Unique(20)});
  EXPECT_EQ(index->FindRuns(kNs, query), (std::vector<Span>{{1, 0, 20, 100}, {2, 4, 90, 110}}));
  // b (110) wins; a is trimmed to what b leaves: text[0, 70).
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{1, 0, 20, 70}, {2, 4, 90, 110}}));
}

TEST(SpanIndexTest, TrimmedCandidateBelowMinimumIsDropped) {
  auto index = MakeIndex();
  const Tokens text = Unique(200);
  ASSERT_TRUE(index->Insert(kNs, 1, Slice(text, 0, 100)).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, Slice(text, 5, 195)).ok());
  const Tokens query = Concat({Unique(9), text});
  // Record 2 takes text[5, 200); record 1 would keep only text[0, 5).
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{2, 0, 14, 195}}));
}

TEST(SpanIndexTest, GapBetweenTwoWinnersFilledFromALongerLoser) {
  auto index = MakeIndex();
  const Tokens text = Unique(300);
  // 2 (text[150, 300), 150) wins first; 3 (text[60, 200), 140) overlaps it and
  // waits; 1 (text[0, 120), 120) fits. The gap text[120, 150) between the two
  // winners is then filled from 3, trimmed on both sides.
  ASSERT_TRUE(index->Insert(kNs, 1, Slice(text, 0, 120)).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, Slice(text, 150, 150)).ok());
  ASSERT_TRUE(index->Insert(kNs, 3, Slice(text, 60, 140)).ok());
  const Tokens query = Concat({Unique(1), text});
  EXPECT_EQ(index->Lookup(kNs, query),
            (std::vector<Span>{{1, 0, 1, 120}, {3, 60, 121, 30}, {2, 0, 151, 150}}));
}

TEST(SpanIndexTest, RecordMatchingTwice) {
  auto index = MakeIndex();
  const Tokens rec = Unique(64);
  ASSERT_TRUE(index->Insert(kNs, 5, rec).ok());
  const Tokens query =
      Concat({Unique(3), Slice(rec, 0, 40), Unique(7), Slice(rec, 20, 44), Unique(2)});
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{5, 0, 3, 40}, {5, 20, 50, 44}}));
}

TEST(SpanIndexTest, RecordContainingTheQuotedTextTwicePicksTheFirstCopy) {
  auto index = MakeIndex();
  const Tokens para = Unique(30);
  ASSERT_TRUE(index->Insert(kNs, 5, Concat({Unique(2), para, Unique(9), para})).ok());
  const Tokens query = Concat({Unique(4), para, Unique(4)});
  EXPECT_EQ(index->FindRuns(kNs, query), (std::vector<Span>{{5, 2, 4, 30}, {5, 41, 4, 30}}));
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{5, 2, 4, 30}}));
}

TEST(SpanIndexTest, RunsShorterThanMinimumAreIgnored) {
  auto index = MakeIndex();
  const Tokens rec = Unique(100);
  ASSERT_TRUE(index->Insert(kNs, 1, rec).ok());
  EXPECT_TRUE(index->Lookup(kNs, Concat({Unique(10), Slice(rec, 30, 15), Unique(10)})).empty());
  EXPECT_EQ(index->Lookup(kNs, Concat({Unique(10), Slice(rec, 30, 16), Unique(10)})),
            (std::vector<Span>{{1, 30, 10, 16}}));
  // A record shorter than the minimum is stored but never matches.
  const Tokens tiny = Unique(15);
  ASSERT_TRUE(index->Insert(kNs, 2, tiny).ok());
  EXPECT_EQ(index->num_records(), 2u);
  EXPECT_TRUE(index->Lookup(kNs, Concat({Unique(3), tiny, Unique(3)})).empty());
}

TEST(SpanIndexTest, QueryBeginIsHonoured) {
  auto index = MakeIndex();
  const Tokens a = Unique(60);
  const Tokens b = Unique(40);
  ASSERT_TRUE(index->Insert(kNs, 1, a).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, b).ok());
  const Tokens query = Concat({a, Unique(5), b});
  EXPECT_EQ(index->Lookup(kNs, query, 0), (std::vector<Span>{{1, 0, 0, 60}, {2, 0, 65, 40}}));
  // Spans are clipped to start at query_begin, offsets stay absolute.
  EXPECT_EQ(index->Lookup(kNs, query, 30), (std::vector<Span>{{1, 30, 30, 30}, {2, 0, 65, 40}}));
  EXPECT_EQ(index->Lookup(kNs, query, 50), (std::vector<Span>{{2, 0, 65, 40}}));
  EXPECT_EQ(index->Lookup(kNs, query, 70), (std::vector<Span>{{2, 5, 70, 35}}));
  EXPECT_TRUE(index->Lookup(kNs, query, 90).empty());
  EXPECT_TRUE(index->Lookup(kNs, query, static_cast<int32_t>(query.size())).empty());
  EXPECT_TRUE(index->Lookup(kNs, query, -1).empty());
  EXPECT_TRUE(index->Lookup(kNs, query, static_cast<int32_t>(query.size()) + 1).empty());
}

TEST(SpanIndexTest, TiesGoToTheMostRecentRecord) {
  auto index = MakeIndex();
  const Tokens text = Unique(50);
  ASSERT_TRUE(index->Insert(kNs, 10, text).ok());
  ASSERT_TRUE(index->Insert(kNs, 11, text).ok());
  ASSERT_TRUE(index->Insert(kNs, 9, text).ok());  // newest, despite the smallest id
  const Tokens query = Concat({Unique(8), text});
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{9, 0, 8, 50}}));
  ASSERT_TRUE(index->Remove(9));
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{11, 0, 8, 50}}));
}

TEST(SpanIndexTest, DuplicateIdIsRejected) {
  auto index = MakeIndex();
  ASSERT_TRUE(index->Insert(kNs, 1, Unique(30)).ok());
  Status s = index->Insert(kNs, 1, Unique(30));
  EXPECT_EQ(s.code(), StatusCode::kAlreadyExists);
  // Ids are global: another namespace does not make a duplicate acceptable.
  EXPECT_EQ(index->Insert(SpanNamespace{9, 9, "other"}, 1, Unique(30)).code(),
            StatusCode::kAlreadyExists);
  EXPECT_EQ(index->num_records(), 1u);
}

TEST(SpanIndexTest, NamespacesAreIsolated) {
  auto index = MakeIndex();
  const Tokens text = Unique(64);
  const SpanNamespace other_tenant{1, 2, "tenant-b"};
  const SpanNamespace other_model{3, 2, "tenant-a"};
  const SpanNamespace other_layout{1, 4, "tenant-a"};
  ASSERT_TRUE(index->Insert(kNs, 1, text).ok());
  ASSERT_TRUE(index->Insert(other_tenant, 2, text).ok());
  ASSERT_TRUE(index->Insert(other_model, 3, text).ok());
  const Tokens query = Concat({Unique(4), text});
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{1, 0, 4, 64}}));
  EXPECT_EQ(index->Lookup(other_tenant, query), (std::vector<Span>{{2, 0, 4, 64}}));
  EXPECT_EQ(index->Lookup(other_model, query), (std::vector<Span>{{3, 0, 4, 64}}));
  EXPECT_TRUE(index->Lookup(other_layout, query).empty());
  EXPECT_TRUE(index->FindRuns(other_layout, query).empty());
  // Removing the only record of a namespace leaves the others untouched.
  ASSERT_TRUE(index->Remove(2));
  EXPECT_TRUE(index->Lookup(other_tenant, query).empty());
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{1, 0, 4, 64}}));
}

TEST(SpanIndexTest, RemoveMakesSpansDisappear) {
  auto index = MakeIndex();
  const Tokens a = Unique(80);
  const Tokens b = Unique(80);
  ASSERT_TRUE(index->Insert(kNs, 1, a).ok());
  ASSERT_TRUE(index->Insert(kNs, 2, b).ok());
  const size_t bytes_two = index->MemoryBytes();
  const Tokens query = Concat({Unique(4), a, b});
  EXPECT_EQ(index->Lookup(kNs, query).size(), 2u);
  EXPECT_TRUE(index->Remove(1));
  EXPECT_FALSE(index->Remove(1));
  EXPECT_FALSE(index->Remove(12345));
  EXPECT_EQ(index->num_records(), 1u);
  EXPECT_LT(index->MemoryBytes(), bytes_two);
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{2, 0, 84, 80}}));
  EXPECT_TRUE(index->Remove(2));
  EXPECT_TRUE(index->Lookup(kNs, query).empty());
  EXPECT_EQ(index->num_records(), 0u);
  // The id is free again, and a slot reused by a new record finds only its tokens.
  ASSERT_TRUE(index->Insert(kNs, 1, b).ok());
  EXPECT_EQ(index->Lookup(kNs, query), (std::vector<Span>{{1, 0, 84, 80}}));
}

TEST(SpanIndexTest, PostingCapKeepsTheNewestRecords) {
  SpanIndexOptions o;
  o.max_postings_per_hash = 2;
  auto index = MakeIndex(o);
  const Tokens text = Unique(40);
  for (uint64_t id = 1; id <= 5; ++id) ASSERT_TRUE(index->Insert(kNs, id, text).ok());
  const Tokens query = Concat({Unique(4), text});
  EXPECT_EQ(index->FindRuns(kNs, query), (std::vector<Span>{{4, 0, 4, 40}, {5, 0, 4, 40}}));
  // An older record is still reached through an anchor of its own and
  // extended across the shared text.
  const Tokens own = Unique(30);
  ASSERT_TRUE(index->Insert(kNs, 6, Concat({text, own})).ok());
  for (uint64_t id = 7; id <= 9; ++id) ASSERT_TRUE(index->Insert(kNs, id, text).ok());
  EXPECT_EQ(index->Lookup(kNs, Concat({Unique(4), text, own})), (std::vector<Span>{{6, 0, 4, 70}}));
}

TEST(SpanIndexTest, MemoryAccountingCountsTokens) {
  auto index = MakeIndex();
  const size_t empty = index->MemoryBytes();
  ASSERT_TRUE(index->Insert(kNs, 1, Unique(10000)).ok());
  EXPECT_GE(index->MemoryBytes(), empty + 10000 * sizeof(int32_t));
}

// ---------------------------------------------------------------------------
// Reference: brute force over every pair of positions, then the selection
// rule written out plainly.

struct RefRecord {
  uint64_t id;
  uint64_t seq;
  Tokens tokens;
};

struct RefRun {
  Span span;
  uint64_t seq;
};

std::vector<RefRun> BruteForceRuns(const std::vector<RefRecord>& records, const Tokens& q,
                                   int begin, int min_len) {
  std::vector<RefRun> runs;
  for (const RefRecord& rec : records) {
    const Tokens& r = rec.tokens;
    for (int i = begin; i < static_cast<int>(q.size()); ++i) {
      for (int j = 0; j < static_cast<int>(r.size()); ++j) {
        if (q[i] != r[j]) continue;
        if (i > begin && j > 0 && q[i - 1] == r[j - 1]) continue;  // not a run's start
        int len = 0;
        while (i + len < static_cast<int>(q.size()) && j + len < static_cast<int>(r.size()) &&
               q[i + len] == r[j + len]) {
          ++len;
        }
        if (len >= min_len) runs.push_back({Span{rec.id, j, i, len}, rec.seq});
      }
    }
  }
  return runs;
}

// (length, seq, dst, src) order of the selection rule.
bool RefBefore(const RefRun& a, const RefRun& b) {
  if (a.span.length != b.span.length) return a.span.length > b.span.length;
  if (a.seq != b.seq) return a.seq > b.seq;
  if (a.span.dst_offset != b.span.dst_offset) return a.span.dst_offset < b.span.dst_offset;
  return a.span.src_offset < b.span.src_offset;
}

void RefFill(const std::vector<RefRun>& runs, int gap_begin, int gap_end, int min_len,
             std::vector<RefRun>* out) {
  bool found = false;
  RefRun best{};
  for (const RefRun& r : runs) {
    const int b = std::max(gap_begin, r.span.dst_offset);
    const int e = std::min(gap_end, r.span.dst_offset + r.span.length);
    if (e - b < min_len) continue;
    RefRun piece{Span{r.span.record_id, r.span.src_offset + b - r.span.dst_offset, b, e - b},
                 r.seq};
    if (!found || RefBefore(piece, best)) best = piece;
    found = true;
  }
  if (!found) return;
  out->push_back(best);
  RefFill(runs, gap_begin, best.span.dst_offset, min_len, out);
  RefFill(runs, best.span.dst_offset + best.span.length, gap_end, min_len, out);
}

std::vector<Span> RefSelect(std::vector<RefRun> runs, int begin, int end, int min_len) {
  std::sort(runs.begin(), runs.end(), RefBefore);
  std::vector<RefRun> chosen;
  for (const RefRun& r : runs) {
    bool overlaps = false;
    for (const RefRun& c : chosen) {
      overlaps |= r.span.dst_offset < c.span.dst_offset + c.span.length &&
                  c.span.dst_offset < r.span.dst_offset + r.span.length;
    }
    if (!overlaps) chosen.push_back(r);
  }
  std::sort(chosen.begin(), chosen.end(),
            [](const RefRun& a, const RefRun& b) { return a.span.dst_offset < b.span.dst_offset; });
  std::vector<RefRun> all = chosen;
  int prev = begin;
  for (const RefRun& c : chosen) {
    RefFill(runs, prev, c.span.dst_offset, min_len, &all);
    prev = c.span.dst_offset + c.span.length;
  }
  RefFill(runs, prev, end, min_len, &all);
  std::sort(all.begin(), all.end(),
            [](const RefRun& a, const RefRun& b) { return a.span.dst_offset < b.span.dst_offset; });
  std::vector<Span> out;
  for (const RefRun& r : all) out.push_back(r.span);
  return out;
}

std::vector<Span> SortedForFindRuns(std::vector<RefRun> runs) {
  std::vector<Span> out;
  for (const RefRun& r : runs) out.push_back(r.span);
  std::sort(out.begin(), out.end(), [](const Span& a, const Span& b) {
    if (a.dst_offset != b.dst_offset) return a.dst_offset < b.dst_offset;
    if (a.record_id != b.record_id) return a.record_id < b.record_id;
    return a.src_offset < b.src_offset;
  });
  return out;
}

// Records and queries cut from one shared text over a small vocabulary, with
// point mutations: many overlapping runs at unrelated offsets, runs that end
// by chance one token after the quoted piece, records quoted twice.
struct RandomCase {
  std::vector<RefRecord> records;
  Tokens query;
  int begin;
};

RandomCase MakeRandomCase(std::mt19937_64& rng, int vocab, int num_records) {
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Tokens text(2000);
  for (auto& t : text) t = uni(0, vocab - 1);
  auto piece = [&](int len) {
    const int at = uni(0, static_cast<int>(text.size()) - len);
    Tokens p = Slice(text, at, len);
    for (auto& t : p) {
      if (uni(0, 99) == 0) t = uni(0, vocab - 1);
    }
    return p;
  };
  RandomCase c;
  for (int i = 0; i < num_records; ++i) {
    Tokens tokens = piece(uni(1, 250));
    c.records.push_back(RefRecord{static_cast<uint64_t>(uni(0, 1 << 30)) * 64 + i,
                                  static_cast<uint64_t>(i), std::move(tokens)});
  }
  while (c.query.size() < 500) {
    Tokens p;
    if (uni(0, 3) == 0) {
      p.resize(static_cast<size_t>(uni(1, 30)));
      for (auto& t : p) t = uni(0, vocab - 1);
    } else if (uni(0, 2) == 0) {
      const RefRecord& r = c.records[static_cast<size_t>(uni(0, num_records - 1))];
      const int b = uni(0, static_cast<int>(r.tokens.size()) - 1);
      p = Slice(r.tokens, b, uni(1, static_cast<int>(r.tokens.size()) - b));
    } else {
      p = piece(uni(5, 120));
    }
    c.query.insert(c.query.end(), p.begin(), p.end());
  }
  c.begin = uni(0, 3) == 0 ? uni(0, 200) : 0;
  return c;
}

void ExpectMatchesReference(const SpanIndexOptions& options, int vocab, int trials, uint64_t seed,
                            int num_records = 30) {
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < trials; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    RandomCase c = MakeRandomCase(rng, vocab, num_records);
    auto index = MakeIndex(options);
    for (const RefRecord& r : c.records) ASSERT_TRUE(index->Insert(kNs, r.id, r.tokens).ok());
    const int min_len = options.min_span_tokens;
    const std::vector<RefRun> runs = BruteForceRuns(c.records, c.query, c.begin, min_len);
    // Completeness: every maximal common run of min_len is found, nothing else.
    EXPECT_EQ(index->FindRuns(kNs, c.query, c.begin), SortedForFindRuns(runs));
    const std::vector<Span> got = index->Lookup(kNs, c.query, c.begin);
    const std::vector<Span> want =
        RefSelect(runs, c.begin, static_cast<int>(c.query.size()), min_len);
    EXPECT_EQ(got, want);
  }
}

SpanIndexOptions Uncapped(int k, int w, int min_len) {
  SpanIndexOptions o;
  o.kgram_tokens = k;
  o.window_kgrams = w;
  o.min_span_tokens = min_len;
  o.max_postings_per_hash = 1 << 30;
  return o;
}

TEST(SpanIndexRandomTest, DefaultOptionsMatchBruteForce) {
  SpanIndexOptions o;
  o.max_postings_per_hash = 1 << 30;
  ExpectMatchesReference(o, 6, 12, 1);
}

TEST(SpanIndexRandomTest, SmallWindowsMatchBruteForce) {
  ExpectMatchesReference(Uncapped(3, 4, 6), 12, 12, 2);
  ExpectMatchesReference(Uncapped(1, 1, 4), 40, 8, 3);
}

TEST(SpanIndexRandomTest, MinimumAboveTheWindowMatchesBruteForce) {
  ExpectMatchesReference(Uncapped(8, 9, 24), 4, 12, 4);
}

// ---------------------------------------------------------------------------
// Collisions: a hash that says everything is equal must change nothing.

TEST(SpanIndexCollisionTest, ConstantHashGivesTheSameSpans) {
  SpanIndexOptions o = Uncapped(6, 11, 16);
  o.kgram_hash_for_testing = [](std::span<const int32_t>) { return uint64_t{42}; };
  ExpectMatchesReference(o, 6, 4, 5, /*num_records=*/8);
}

TEST(SpanIndexCollisionTest, WeakHashGivesTheSameSpans) {
  SpanIndexOptions o = Uncapped(4, 5, 8);
  // Two bits of hash; keys differ only in their top bits, so the table sees them too.
  o.kgram_hash_for_testing = [](std::span<const int32_t> g) {
    return static_cast<uint64_t>((g[0] + g[1]) & 3) << 62;
  };
  ExpectMatchesReference(o, 8, 4, 6);
}

TEST(SpanIndexCollisionTest, CollidingHashesNeverMakeASpan) {
  SpanIndexOptions o;  // default cap: most postings are dropped, none may lie
  o.kgram_hash_for_testing = [](std::span<const int32_t>) { return uint64_t{7} << 40; };
  auto index = MakeIndex(o);
  std::mt19937_64 rng(7);
  std::vector<Tokens> records;
  for (uint64_t id = 0; id < 20; ++id) {
    Tokens t = Unique(200);
    // Runs of 15 equal tokens with the query: one short of the minimum.
    for (int i = 0; i < 15; ++i) t[static_cast<size_t>(i)] = 7 + i;
    records.push_back(t);
    ASSERT_TRUE(index->Insert(kNs, id, t).ok());
  }
  Tokens query = Unique(400);
  for (int i = 0; i < 15; ++i) query[static_cast<size_t>(100 + i)] = 7 + i;
  EXPECT_TRUE(index->Lookup(kNs, query).empty());
  EXPECT_TRUE(index->FindRuns(kNs, query).empty());
  // A real quote is still verified token by token before it is returned.
  const Tokens quoted = Concat({Unique(5), Slice(records[3], 50, 100)});
  for (const Span& s : index->Lookup(kNs, quoted)) {
    ASSERT_EQ(s.record_id, 3u);
    for (int i = 0; i < s.length; ++i) {
      ASSERT_EQ(quoted[static_cast<size_t>(s.dst_offset + i)],
                records[3][static_cast<size_t>(s.src_offset + i)]);
    }
  }
}

// ---------------------------------------------------------------------------
// Concurrency: lookups never see a torn index while records come and go.

TEST(SpanIndexConcurrencyTest, ReadersAndAWriter) {
  auto index = MakeIndex();
  const SpanNamespace ns = kNs;
  std::vector<Tokens> stable;
  for (uint64_t id = 0; id < 50; ++id) {
    stable.push_back(Unique(120));
    ASSERT_TRUE(index->Insert(ns, id, stable.back()).ok());
  }
  std::vector<Tokens> churn;
  for (int i = 0; i < 200; ++i) churn.push_back(Unique(300));

  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(400);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> lookups{0};
  std::atomic<int64_t> failures{0};
  auto reader = [&](int seed) {
    std::mt19937 rng(static_cast<uint32_t>(seed));
    while (!stop.load(std::memory_order_relaxed)) {
      const int a = static_cast<int>(rng() % stable.size());
      const int c = static_cast<int>(rng() % churn.size());
      // A stable record is always found; a churning one is found whole or not at all.
      const Tokens query = Concat({Unique(3), stable[a], Slice(churn[c], 10, 200)});
      const std::vector<Span> got = index->Lookup(ns, query);
      const bool ok =
          !got.empty() && got[0] == Span{static_cast<uint64_t>(a), 0, 3, 120} &&
          (got.size() == 1 || (got.size() == 2 && got[1] == Span{1000u + c, 10, 123, 200}));
      if (!ok) failures.fetch_add(1);
      lookups.fetch_add(1, std::memory_order_relaxed);
    }
  };
  std::thread r1(reader, 1);
  std::thread r2(reader, 2);
  std::mt19937 rng(3);
  int64_t writes = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    const int c = static_cast<int>(rng() % churn.size());
    if (index->Remove(1000u + c)) {
      ++writes;
    } else {
      ASSERT_TRUE(index->Insert(ns, 1000u + c, churn[c]).ok());
      ++writes;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  stop = true;
  r1.join();
  r2.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(lookups.load(), 100);
  EXPECT_GT(writes, 100);
}

}  // namespace
}  // namespace relaykv
