// sched/fls.cc — see sched/fls.h.
#include "sched/fls.h"

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "alloc/check.h"
#include "sched/park.h"

namespace weft::sched {
namespace {
using table = std::vector<fls_slot>;

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
  auto& t = *static_cast<table*>(f->fls_);
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

void fls_destroy_all(fiber* f) noexcept {
  auto* t = static_cast<table*>(f->fls_);
  if (!t) return;
  // A destructor may itself use fiber-local storage: loop until empty. By
  // index, re-reading the size, never holding a reference across a
  // destructor: one that uses a newer fiber_local grows (reallocates) *t.
  while (true) {
    bool any = false;
    for (std::size_t i = 0; i < t->size(); ++i) {
      fls_slot& s = (*t)[i];
      if (!s.value) continue;
      any = true;
      void* v = std::exchange(s.value, nullptr);
      void (*destroy)(void*) = s.destroy;
      destroy(v);  // may resize *t: s is dead from here
    }
    if (!any) break;
  }
  delete t;
  f->fls_ = nullptr;
}

}  // namespace weft::sched
