// tests/chat_server_test.cc — examples/chat_server end to end: the real
// binary on 127.0.0.1, driven by plain blocking sockets (every read bounded
// by SO_RCVTIMEO, so a broken server fails the test instead of hanging it).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

extern char** environ;

namespace {

using namespace std::chrono_literals;

int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

// The server as a child process; killed at the end of the test.
class server {
 public:
  server(int port, const char* idle) : port_(port) {
    std::string bin = std::string(std::getenv("TEST_SRCDIR")) + "/weft/examples/chat_server";
    std::string p = std::to_string(port);
    const char* argv[] = {bin.c_str(), "--port", p.c_str(), "--workers", "2", "--idle", idle, nullptr};
    EXPECT_EQ(::posix_spawn(&pid_, bin.c_str(), nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  }
  ~server() {
    if (pid_ < 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  // Sends `sig` and waits up to 10 s for the exit: the wait status, or -1
  // if it did not exit (it is killed then).
  int stop_with(int sig) {
    ::kill(pid_, sig);
    for (int i = 0; i < 1000; ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      std::this_thread::sleep_for(10ms);
    }
    return -1;
  }
  // A connected client socket, retrying while the server starts.
  int connect() const {
    for (int i = 0; i < 200; ++i) {
      int s = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(port_);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
        timeval tv{5, 0};
        ::setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        return s;
      }
      ::close(s);
      std::this_thread::sleep_for(20ms);
    }
    return -1;
  }

 private:
  int port_;
  pid_t pid_ = -1;
};

// Reads until `want` has arrived (true), or EOF / timeout (false).
bool read_until(int s, const std::string& want, std::string* got = nullptr) {
  std::string buf;
  char tmp[512];
  while (buf.find(want) == std::string::npos) {
    ssize_t n = ::recv(s, tmp, sizeof tmp, 0);
    if (n <= 0) break;
    buf.append(tmp, static_cast<std::size_t>(n));
  }
  if (got) *got = buf;
  return buf.find(want) != std::string::npos;
}

TEST(ChatServer, EveryConnectedPeerSeesEveryLine) {
  server srv(free_port(), "60");
  std::vector<int> peers;
  for (int i = 0; i < 3; ++i) {
    int s = srv.connect();
    ASSERT_GE(s, 0);
    peers.push_back(s);
    ASSERT_TRUE(read_until(s, "joined\n"));  // its own join notice
  }
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(read_until(peers[i], "joined\n"));  // the later ones'
  const std::string msg = "hello from the first peer\n";
  ASSERT_EQ(::send(peers[0], msg.data(), msg.size(), MSG_NOSIGNAL), ssize_t(msg.size()));
  for (int s : peers) {
    std::string got;
    EXPECT_TRUE(read_until(s, ": hello from the first peer\n", &got)) << got;
  }
  ::close(peers[2]);
  EXPECT_TRUE(read_until(peers[0], " left\n"));
  for (int i = 0; i < 2; ++i) ::close(peers[i]);
}

TEST(ChatServer, ASilentPeerIsDisconnectedAfterTheIdleTimeout) {
  server srv(free_port(), "1");
  int s = srv.connect();
  ASSERT_GE(s, 0);
  ASSERT_TRUE(read_until(s, "joined\n"));
  auto t0 = std::chrono::steady_clock::now();
  char tmp[64];
  ssize_t n;
  while ((n = ::recv(s, tmp, sizeof tmp, 0)) > 0) {
  }
  EXPECT_EQ(n, 0) << "expected the server to end the connection";
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 500ms);
  ::close(s);
}

// SIGTERM (and SIGINT) stop the server gracefully: it stops accepting,
// unwinds its connection fibers, whose sockets close, and exits with 0.
TEST(ChatServer, SigtermShutsTheServerDownCleanly) {
  for (int sig : {SIGTERM, SIGINT}) {
    server srv(free_port(), "60");
    int s = srv.connect();
    ASSERT_GE(s, 0);
    ASSERT_TRUE(read_until(s, "joined\n"));
    int status = srv.stop_with(sig);
    ASSERT_NE(status, -1) << "the server did not exit on signal " << sig;
    ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
    EXPECT_EQ(WEXITSTATUS(status), 0);
    char tmp[64];
    ssize_t n;
    while ((n = ::recv(s, tmp, sizeof tmp, 0)) > 0) {
    }
    EXPECT_EQ(n, 0) << "the connection should end with EOF";
    ::close(s);
  }
}

}  // namespace
