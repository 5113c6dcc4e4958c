// runtime/quit_dump.h
//
// SIGQUIT prints every fiber (weft::dump()) while a runtime runs, as Go's
// runtime does — and, unlike Go, the program goes on. A signal handler may
// not take the registry's locks, so the handler only writes to an eventfd,
// whichever thread it lands on; one small thread reads it and dumps.
// Installed if SIGQUIT has its default action or is ignored, so a
// program's own handler wins; the disposition found is restored when run()
// returns. Ignored counts as no handler: a shell starts a background job
// (`server &`) with SIGQUIT ignored, and that is where a dump is wanted.
// Go's runtime respects an inherited SIG_IGN only for SIGHUP and SIGINT.
//
// Who calls what: run_main() constructs it before starting the workers and
// destroys it after they joined.
#pragma once

#include <signal.h>

#include <atomic>
#include <thread>

namespace weft::detail {

class quit_dumper {
 public:
  quit_dumper();
  ~quit_dumper();
  quit_dumper(const quit_dumper&) = delete;
  quit_dumper& operator=(const quit_dumper&) = delete;

 private:
  int efd_ = -1;
  struct sigaction old_ {};
  // Set by the destructor before it wakes the thread; acquire/release:
  // the thread sees it after its read returns.
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace weft::detail
