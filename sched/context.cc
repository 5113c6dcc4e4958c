// sched/context.cc — the only file that includes Boost.Context, and the only
// place a stack switch happens. See sched/context.h.
//
// *Exception state*: the C++ runtime keeps the stack of exceptions being
// handled and the count of exceptions in flight in a per-thread record
// (__cxa_eh_globals, returned by __cxa_get_globals()). A fiber may switch
// away inside a catch block or inside a destructor that an exception is
// running (a park there is ordinary code: logging, an error reply, a lock),
// then resume on another thread, while other fibers throw and catch on the
// thread it left. Left per thread, that record would mix them: `throw;`
// and std::current_exception() would see another fiber's exception (or
// none: `throw;` then calls std::terminate), __cxa_end_catch would end
// another fiber's handler and free its exception, and
// std::uncaught_exceptions() would count other fibers' throws. So every
// switch saves the record into the context it leaves and installs the one
// of the context it resumes, as if each context had its own thread.
#include "sched/context.h"

#include <cxxabi.h>
#include <pthread.h>

#include <boost/context/detail/fcontext.hpp>

#include "alloc/check.h"

#if defined(WEFT_ASAN)
#include <sanitizer/asan_interface.h>
#endif
#if defined(WEFT_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

// eh_state (context.h) mirrors the two-field __cxa_eh_globals of the
// generic Itanium ABI; the ARM EH ABI adds a field.
#if defined(__ARM_EABI_UNWINDER__)
#error "sched/context.cc: eh_state does not mirror __cxa_eh_globals under the ARM EH ABI"
#endif

namespace bctx = boost::context::detail;

// *The switch itself.* Boost's jump_fcontext ends in an indirect `jmp` to
// the resumed context's return address, so the `call` that entered it is
// never matched by a `ret`: the CPU's return stack buffer is one entry off
// after every switch, and each return on the resumed fiber's way back up
// (switch_context, switch_to, park, the channel...) is mispredicted. On
// x86-64 weft switches with weft_jump_context instead: the same frame
// layout, registers and transfer_t as jump_fcontext (so either can resume
// a context the other suspended, and make_fcontext's fresh frames work
// with both), ending in `ret`. Two fibers that suspend through the same
// call chain (the common case: both parked in a channel operation, or
// both yielding) then see every return predicted.
//
// Both this routine and switch_context(), which calls it, start on a
// 64-byte boundary. At 16, an unrelated change elsewhere in the library
// moved them 32 bytes and `yield` went from 12.1 to 46 ns (bench/micro,
// alternating with the binary before; the profile put the time on the
// first stores of switch_context and switch_to after each return, on
// this AMD EPYC): how the call and the `ret` fall in fetch blocks
// matters to the return prediction. Aligned, the layout no longer moves
// with the code around it (12.6 ns).
//
// The frame, 0x40 bytes below the suspended stack pointer's old value:
//   0x00 MXCSR  0x04 x87 control word  0x08 r12  0x10 r13  0x18 r14
//   0x20 r15    0x28 rbx               0x30 rbp  0x38 return address
// The MXCSR and x87 control words are callee-saved in the SysV ABI, so
// each context keeps its own, as with Boost.
#if defined(__x86_64__) && defined(__linux__)
extern "C" bctx::transfer_t weft_jump_context(bctx::fcontext_t to, void* data);
asm(R"(
  .text
  .globl weft_jump_context
  .hidden weft_jump_context
  .type weft_jump_context, @function
  .p2align 6
weft_jump_context:
  leaq   -0x38(%rsp), %rsp
  stmxcsr (%rsp)
  fnstcw 0x4(%rsp)
  movq   %r12, 0x08(%rsp)
  movq   %r13, 0x10(%rsp)
  movq   %r14, 0x18(%rsp)
  movq   %r15, 0x20(%rsp)
  movq   %rbx, 0x28(%rsp)
  movq   %rbp, 0x30(%rsp)
  movq   %rsp, %rax
  movq   %rdi, %rsp
  ldmxcsr (%rsp)
  fldcw  0x4(%rsp)
  movq   0x08(%rsp), %r12
  movq   0x10(%rsp), %r13
  movq   0x18(%rsp), %r14
  movq   0x20(%rsp), %r15
  movq   0x28(%rsp), %rbx
  movq   0x30(%rsp), %rbp
  leaq   0x38(%rsp), %rsp
  movq   %rsi, %rdx
  movq   %rax, %rdi
  ret
  .size weft_jump_context, .-weft_jump_context
  .section .note.GNU-stack, "", @progbits
  .text
)");
#define WEFT_JUMP weft_jump_context
#else
#define WEFT_JUMP bctx::jump_fcontext
#endif

namespace weft::sched {

namespace {

// This thread's exception record (see *Exception state*), looked up once
// per thread instead of calling into the C++ runtime at every switch. Read
// only before a jump: a thread_local's address may be cached across the
// jump by the compiler, and after it we may be on another thread.
thread_local eh_state* tls_eh = nullptr;

[[gnu::noinline]] eh_state* lookup_eh() noexcept {
  // SAFETY: eh_state mirrors __cxa_eh_globals on this ABI (x86-64 Linux:
  // no ARM EHABI propagating list), as the Itanium C++ ABI lays it out.
  tls_eh = reinterpret_cast<eh_state*>(abi::__cxa_get_globals());
  return tls_eh;
}

// Passed through every jump: the suspending side records its handle in
// `from`; a fiber's first resume finds its body in `to`. Lives on the
// switcher's stack, which stays intact until it is resumed: on its real
// stack, so switch_context() is not instrumented by ASan. With
// detect_stack_use_after_return=1, ASan would put this address-taken
// local on the switcher's fake stack, which an exiting fiber's final
// switch destroys before the jump (__sanitizer_start_switch_fiber with
// no save pointer): the resumed side would read it from unmapped memory.
struct switch_record {
  exec_context* from;
  exec_context* to;
};

exec_context* land(bctx::transfer_t t) {
  auto* rec = static_cast<switch_record*>(t.data);
  rec->from->fctx = t.fctx;
  return rec->to;
}

void annotate_finish([[maybe_unused]] exec_context* self) {
#if defined(WEFT_ASAN)
  __sanitizer_finish_switch_fiber(self ? self->asan_fake_stack : nullptr, nullptr, nullptr);
#endif
}

[[noreturn]] void trampoline(bctx::transfer_t t) {
  annotate_finish(nullptr);
  exec_context* self = land(t);
  self->entry(self->entry_arg);
  WEFT_CHECK(false, "context: a fiber body returned instead of switching away");
  __builtin_unreachable();
}

}  // namespace

void prepare_stack([[maybe_unused]] std::byte* lo, [[maybe_unused]] std::byte* hi) {
#if defined(WEFT_ASAN)
  __asan_unpoison_memory_region(lo, static_cast<std::size_t>(hi - lo));
#endif
}

void make_fiber_context(exec_context& ctx, std::byte* lo, std::byte* hi,
                        void (*entry)(void*), void* arg) {
  const auto size = static_cast<std::size_t>(hi - lo);
#if defined(WEFT_ASAN)
  ctx.stack_lo = lo;
  ctx.stack_size = size;
#endif
  ctx.entry = entry;
  ctx.entry_arg = arg;
  // SAFETY: [lo, hi) is a stack no one else uses; make_fcontext writes the
  // initial frame just below hi.
  ctx.fctx = bctx::make_fcontext(hi, size, &trampoline);
#if defined(WEFT_TSAN)
  ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
}

// no_sanitize_address: `rec` on the real stack (see switch_record).
[[gnu::aligned(64), gnu::no_sanitize_address]] void switch_context(
    exec_context& from, exec_context& to, [[maybe_unused]] bool final) {
  switch_record rec{&from, &to};
  // *Exception state*: this thread's record, read before the jump (and
  // before the sanitizer hooks, which want nothing between them and the
  // jump); whoever resumes us installs ours on its thread the same way.
  eh_state* eh = tls_eh ? tls_eh : lookup_eh();
  from.eh = *eh;
  *eh = to.eh;
#if defined(WEFT_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &from.asan_fake_stack,
                                 to.stack_lo, to.stack_size);
#endif
#if defined(WEFT_TSAN)
  __tsan_switch_to_fiber(to.tsan_fiber, 0);
#endif
  // SAFETY: `to` is suspended (or fresh) and owned by this thread for the
  // duration of the switch; the park protocol guarantees no other thread
  // resumes it concurrently (see sched/park.cc).
  bctx::transfer_t t = WEFT_JUMP(to.fctx, &rec);
  annotate_finish(&from);
  land(t);
}

void thread_context_init([[maybe_unused]] exec_context& ctx) {
  pthread_attr_t attr;
  WEFT_CHECK(pthread_getattr_np(pthread_self(), &attr) == 0,
             "context: pthread_getattr_np failed");
  void* addr = nullptr;
  std::size_t size = 0;
  pthread_attr_getstack(&attr, &addr, &size);
  pthread_attr_destroy(&attr);
#if defined(WEFT_ASAN)
  ctx.stack_lo = static_cast<std::byte*>(addr);
  ctx.stack_size = size;
#endif
#if defined(WEFT_TSAN)
  ctx.tsan_fiber = __tsan_get_current_fiber();
#endif
}

void release_fiber_context([[maybe_unused]] exec_context& ctx) {
#if defined(WEFT_TSAN)
  if (ctx.tsan_fiber) __tsan_destroy_fiber(ctx.tsan_fiber);
  ctx.tsan_fiber = nullptr;
#endif
}

}  // namespace weft::sched
