// What the CPU kernels do about fork(), so that a DataLoader worker (or any child forked after
// the parent ran the ops) neither deadlocks nor inherits the parent's scratch.
//
// Two kinds of process state do not survive fork():
//   * State behind a mutex (the scratch caches of kept_cache.h). If another thread of the parent
//     holds the mutex at the fork, the child's copy stays locked forever. The handlers below lock
//     every registered member before the fork and unlock it on both sides after, and in the child
//     drop what the member keeps: its scratch belongs to the parent's calls (the child sees it
//     copy-on-write and would otherwise hold it for its whole life).
//   * GNU OpenMP's thread pool. A child of a process that ran a parallel team has the pool's
//     bookkeeping but none of its threads, and its next team of more than one thread waits for
//     them forever (torch's own ops hang there too; DataLoader workers avoid it by running with
//     torch.set_num_threads(1)). The kernels note when they start a team of more than one worker;
//     a child forked after that runs their work on the calling thread (team_lost()).
// Header-only, with no ATen dependency: the one guard lives in a function-local static shared by
// every translation unit of the extension.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

namespace fastattnreg::cpu {

// State that the fork handlers lock, unlock and reset.
class ForkSensitive {
 public:
  virtual void lock_for_fork() = 0;
  virtual void unlock_after_fork() = 0;
  // In the child, with lock_for_fork() still held by the only thread: forget the parent's state.
  virtual void reset_in_child() = 0;
  // Values kept now (the tests read it to see the child's scratch dropped).
  virtual int64_t entries() = 0;

 protected:
  ~ForkSensitive() = default;
};

class ForkGuard {
 public:
  // The process's guard; the fork handlers are installed when it is first used. Never destroyed
  // (fork may run during exit, after static destructors).
  static ForkGuard& get() {
    static ForkGuard* guard = [] {
      auto* g = new ForkGuard;
      pthread_atfork(&ForkGuard::prepare, &ForkGuard::parent, &ForkGuard::child);
      return g;
    }();
    return *guard;
  }

  void add(ForkSensitive* member) {
    std::lock_guard<std::mutex> lock(mu_);
    members_.push_back(member);
  }

  // A kernel started an OpenMP team of more than one thread in this process.
  void note_parallel_team() { team_started_.store(true, std::memory_order_relaxed); }

  // True in a process forked (at any depth) from one that had started such a team.
  bool team_lost() const { return team_lost_.load(std::memory_order_relaxed); }

  int64_t kept_entries() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t n = 0;
    for (ForkSensitive* m : members_) n += m->entries();
    return n;
  }

 private:
  ForkGuard() = default;

  static void prepare() {
    ForkGuard& g = get();
    g.mu_.lock();
    for (ForkSensitive* m : g.members_) m->lock_for_fork();
  }
  static void parent() {
    ForkGuard& g = get();
    for (ForkSensitive* m : g.members_) m->unlock_after_fork();
    g.mu_.unlock();
  }
  static void child() {
    ForkGuard& g = get();
    for (ForkSensitive* m : g.members_) {
      m->reset_in_child();
      m->unlock_after_fork();
    }
    if (g.team_started_.load(std::memory_order_relaxed))
      g.team_lost_.store(true, std::memory_order_relaxed);
    g.mu_.unlock();
  }

  std::mutex mu_;  // guards members_; held across fork() with every member's own lock
  std::vector<ForkSensitive*> members_;
  std::atomic<bool> team_started_{false};
  std::atomic<bool> team_lost_{false};
};

}  // namespace fastattnreg::cpu
