// sched/context.h
//
// The one context-switch site of weft. Boost.Context (fcontext) is used only
// in context.cc, together with the sanitizer fiber annotations that make ASan
// and TSan understand stack switches.
//
// An exec_context is a place execution can be suspended and resumed: a fiber
// or a worker's scheduler loop (which runs on the worker thread's own stack).
// weft only ever switches between a worker's scheduler context and a fiber,
// never fiber to fiber, so "the other side of the switch" is always the
// scheduler loop — that is where the park protocol publishes a parked fiber
// (see sched/park.cc).
//
// Who calls what:
//   make_fiber_context()   the thread creating a fiber, before anyone runs it
//   switch_context()       the thread currently running `from`
//   thread_context_init()  each worker thread once, for its scheduler context
#pragma once

#include <cstddef>

namespace weft::sched {

// The C++ runtime's per-thread exception state (the Itanium C++ ABI's
// __cxa_eh_globals, 2.2.2: the exceptions being handled, which `throw;`
// and std::current_exception() use, and std::uncaught_exceptions()). It
// belongs to whatever runs on the thread, so each context keeps its own
// while suspended: see *Exception state* in context.cc.
struct eh_state {
  void* caught = nullptr;    // __cxa_eh_globals::caughtExceptions
  unsigned int uncaught = 0;  // __cxa_eh_globals::uncaughtExceptions
};

struct exec_context {
  void* fctx = nullptr;             // suspended Boost.Context handle
  void (*entry)(void*) = nullptr;   // a fiber's body, run on its first resume
  void* entry_arg = nullptr;
  eh_state eh;                      // while suspended; see *Exception state*
  // Sanitizer state only in sanitizer builds: it is in every fiber's
  // control block, so it costs memory per fiber.
#if defined(WEFT_ASAN)
  std::byte* stack_lo = nullptr;    // the stack this context runs on
  std::size_t stack_size = 0;
  void* asan_fake_stack = nullptr;  // saved fake stack across a switch
#endif
#if defined(WEFT_TSAN)
  void* tsan_fiber = nullptr;       // its fiber handle
#endif
};

// A recycled stack may still carry ASan's poisoning of the frames of the
// fiber that last ran on it (it never returned from them); clears it before
// anything is written there. No-op without ASan.
void prepare_stack(std::byte* lo, std::byte* hi);

// Prepares `ctx` to run entry(arg) on [lo, hi) when first switched to.
// entry must never return: it ends by switching away for the last time with
// switch_context(..., /*final=*/true).
void make_fiber_context(exec_context& ctx, std::byte* lo, std::byte* hi,
                        void (*entry)(void*), void* arg);

// Suspends the running context into `from` and resumes `to`, each with its
// own exception state. Returns when some thread switches back to `from`. `final` means `from` will never be
// resumed (a fiber exiting): its sanitizer state is released.
void switch_context(exec_context& from, exec_context& to, bool final = false);

// Describes the calling thread's own stack as a scheduler context.
void thread_context_init(exec_context& ctx);

// TSan: the fiber handle is destroyed by the scheduler after the fiber's
// final switch. No-op without TSan.
void release_fiber_context(exec_context& ctx);

}  // namespace weft::sched
