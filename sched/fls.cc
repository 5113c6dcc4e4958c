// sched/fls.cc — see sched/fls.h.
#include "sched/fls.h"

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <utility>
#include <vector>

#include "alloc/check.h"
#include "sched/park.h"

namespace weft::sched {
namespace {
// A fiber's storage (fiber::fls_), owner only.
struct table {
  std::vector<fls_slot> slots;
  std::uint64_t stored = 0;  // values stored so far: the last one's order
  std::uint32_t destroying = 0;  // at exit, the round of the value being destroyed (*Exit*)
};

// The key allocator. Keys are made and dropped where fiber_locals are
// (static initialization, or objects that hold one): rare, so a mutex.
struct key_space {
  std::mutex mu;
  std::vector<std::uint32_t> gens;  // guarded by mu: per index, the last generation given
  std::vector<std::uint32_t> free;  // guarded by mu: indices no fiber_local holds
};
key_space& keys() {
  static key_space* k = new key_space;  // never destroyed: fiber_locals may outlive main
  return *k;
}

constexpr std::uint32_t key_index(std::uint64_t key) { return static_cast<std::uint32_t>(key); }
constexpr std::uint32_t key_gen(std::uint64_t key) { return static_cast<std::uint32_t>(key >> 32); }
}  // namespace

std::uint64_t fls_new_key() {
  key_space& k = keys();
  std::lock_guard g(k.mu);
  std::uint32_t i;
  if (!k.free.empty()) {
    i = k.free.back();
    k.free.pop_back();
  } else {
    i = static_cast<std::uint32_t>(k.gens.size());
    k.gens.push_back(0);
  }
  // Generation 0 is a fresh slot's, never a key's; an index is retired
  // before its generation would wrap (fls_free_key).
  ++k.gens[i];
  return std::uint64_t{k.gens[i]} << 32 | i;
}

void fls_free_key(std::uint64_t key) noexcept {
  key_space& k = keys();
  std::lock_guard g(k.mu);
  // An index whose generations are used up is retired, never reused: a
  // generation must not come round again while a fiber may still hold a
  // value of its first owner (a fiber_local<T> read back as a U).
  std::uint32_t i = key_index(key);
  if (k.gens[i] != UINT32_MAX) k.free.push_back(i);
}

fls_slot& fls_get(std::uint64_t key) {
  fiber* f = current_fiber();
  WEFT_CHECK(f, "fiber_local: used outside a fiber");
  if (!f->fls_) f->fls_ = new table;
  auto& t = static_cast<table*>(f->fls_)->slots;
  const std::uint32_t i = key_index(key), gen = key_gen(key);
  if (t.size() <= i) t.resize(i + 1);
  for (;;) {
    fls_slot& s = t[i];
    if (s.gen == gen) return s;
    if (!s.value) {
      s = {.gen = gen};
      return s;
    }
    // A value of the index's previous owner, which no longer exists. Its
    // destructor may use fiber-local storage (and grow the table): take
    // it out first, look the slot up again after.
    void* v = std::exchange(s.value, nullptr);
    std::exchange(s.destroy, nullptr)(v);
  }
}

void fls_put(std::uint64_t key, void* value, void (*destroy)(void*)) {
  fls_slot& s = fls_get(key);  // may run destructors of stale values: look up first
  WEFT_DCHECK(!s.value, "fls_put: the slot already holds a value");
  auto* t = static_cast<table*>(current_fiber()->fls_);
  s.value = value;
  s.destroy = destroy;
  s.order = ++t->stored;
  s.round = t->destroying + 1;  // stored outside fls_destroy_all(): round 1
}

void fls_destroy_all(fiber* f) noexcept {
  auto* t = static_cast<table*>(f->fls_);
  if (!t) return;
  // The newest value first (*Order*), one at a time: a destructor may use
  // fiber-local storage, storing new values (newer still: destroyed next)
  // or growing t->slots (reallocating it). So the search runs again after
  // every destructor, by index, never holding a reference across one. The
  // cost is a scan of the table per value, for the few values a fiber has.
  // Values past the last round are skipped, and left (*Exit*).
  for (;;) {
    std::vector<fls_slot>& slots = t->slots;
    std::size_t newest = slots.size();
    for (std::size_t i = 0; i < slots.size(); ++i)
      if (slots[i].value && slots[i].round <= kDestroyRounds &&
          (newest == slots.size() || slots[i].order > slots[newest].order))
        newest = i;
    if (newest == slots.size()) break;
    fls_slot& s = slots[newest];
    void* v = std::exchange(s.value, nullptr);
    const std::uint32_t outer = std::exchange(t->destroying, s.round);
    std::exchange(s.destroy, nullptr)(v);  // may resize slots: s is dead from here
    t->destroying = outer;
  }
  std::size_t left = 0;
  for (const fls_slot& s : t->slots) left += s.value != nullptr;
  if (left)
    std::fprintf(stderr,
                 "weft: fiber %llu \"%s\": %zu fiber_local value%s set again by destructors "
                 "after %u rounds, left undestroyed\n",
                 static_cast<unsigned long long>(f->id_), f->name_, left, left == 1 ? "" : "s",
                 kDestroyRounds);
  delete t;
  f->fls_ = nullptr;
}

}  // namespace weft::sched
