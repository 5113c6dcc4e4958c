// sched/fls.cc — see sched/fls.h.
#include "sched/fls.h"

#include <atomic>
#include <utility>
#include <vector>

#include "alloc/check.h"
#include "sched/park.h"

namespace weft::sched {
namespace {
std::atomic<std::size_t> g_next_key{0};
using table = std::vector<fls_slot>;
}  // namespace

std::size_t fls_new_key() noexcept {
  return g_next_key.fetch_add(1, std::memory_order_relaxed);  // relaxed: unique keys only
}

fls_slot& fls_get(std::size_t key) {
  fiber* f = current_fiber();
  WEFT_CHECK(f, "fiber_local: used outside a fiber");
  if (!f->fls_) f->fls_ = new table;
  auto& t = *static_cast<table*>(f->fls_);
  if (t.size() <= key) t.resize(key + 1);
  return t[key];
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
