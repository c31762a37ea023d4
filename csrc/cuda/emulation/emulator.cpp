// emulator.cpp: the CUDA emulator behind include/cuda_runtime.h (interface and checks:
// cuda_emulation.h; the fake devices: device.cpp; the launch log: counters.cpp). Torch-free;
// built with the kernels into one shared library whose only thread_local variables are the
// kernels' __shared__ arrays and the two pointers below, so the whole of the library's TLS block
// can be poisoned at CTA start.
#include "cuda_emulation.h"

#include <boost/fiber/all.hpp>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include "emulator_internal.h"

namespace {
using cuda_emulation::detail::kMaxDynamicShared;
}  // namespace

// The dynamic shared memory that kernel sources declare as
// `extern __shared__ __align__(16) unsigned char batchrenorm_dynamic_smem[];` (one per CTA), as
// large as any fake device lets a CTA opt in to.
alignas(16) thread_local unsigned char batchrenorm_dynamic_smem[kMaxDynamicShared];

namespace cuda_emulation {
namespace {

using Clock = std::chrono::steady_clock;

uint3 make_uint3(unsigned x, unsigned y, unsigned z) {
  uint3 v;
  v.x = x;
  v.y = y;
  v.z = z;
  return v;
}

std::mutex g_mutex;  // guards the globals below
uint64_t g_seed = 0;
std::string g_fault;
cudaError_t g_last_error = cudaSuccess;
std::atomic<uint64_t> g_launches{0}, g_ctas{0}, g_threads{0}, g_barriers{0}, g_shuffles{0};
std::atomic<uint64_t> g_bytes_read{0}, g_bytes_written{0};

enum SlotState : int { kRunnable = 0, kGridWait = 1, kDone = 2 };

struct Fiber {
  uint3 tid;
  int linear = 0;
  bool waiting = false;
  bool exited = false;
  Site wait{};
};

struct Warp {
  uint32_t arrived = 0;
  uint32_t mask = 0;
  int members = 32;
  Site site{};
  uint64_t gen = 0;
  uint64_t vals[2][32] = {};
  boost::fibers::condition_variable cv;
};

// The reads a CTA made since its last barrier: a set of (address, size), cleared by every
// barrier. A read found in it is not counted again: on a GPU the lanes of a warp reading one
// address are one request, and a value the CTA read moments ago comes from L1. A pass over a
// tensor in each phase of a kernel still counts each time. The set is exact (open addressing
// that grows, never evicts): fibers run a barrier-free stretch of code one thread after another,
// so a per-channel value all threads read is far apart in time, and a lossy filter would count
// it again for many threads.
class ReadFilter {
 public:
  ReadFilter() : key_(kInitial), interval_(kInitial) {}

  void next_interval() {
    ++now_;
    live_ = 0;
  }

  // True when (address, bytes) is new in this interval (and records it).
  bool first_read(const void* address, size_t bytes) {
    const uint64_t k =
        reinterpret_cast<uintptr_t>(address) ^ (static_cast<uint64_t>(bytes) << 56);
    const size_t mask = key_.size() - 1;
    for (size_t i = mix(k) & mask;; i = (i + 1) & mask) {
      if (interval_[i] != now_) {
        key_[i] = k;
        interval_[i] = now_;
        if (2 * ++live_ > key_.size()) grow();
        return true;
      }
      if (key_[i] == k) return false;
    }
  }

 private:
  static constexpr size_t kInitial = 4096;

  static uint64_t mix(uint64_t h) {  // splitmix64's finaliser
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
    return h ^ (h >> 31);
  }

  void grow() {
    std::vector<uint64_t> keys(2 * key_.size()), intervals(2 * key_.size());
    const size_t mask = keys.size() - 1;
    for (size_t j = 0; j < key_.size(); ++j) {
      if (interval_[j] != now_) continue;
      size_t i = mix(key_[j]) & mask;
      while (intervals[i] == now_) i = (i + 1) & mask;
      keys[i] = key_[j];
      intervals[i] = now_;
    }
    key_.swap(keys);
    interval_.swap(intervals);
  }

  std::vector<uint64_t> key_;
  std::vector<uint64_t> interval_;  // the interval a slot was filled in; 0: never
  uint64_t now_ = 1;
  size_t live_ = 0;
};

struct Launch;

struct Cta {
  Launch* launch = nullptr;
  int slot = 0;
  uint3 idx{};
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Warp>> warps;
  boost::fibers::mutex mtx;
  boost::fibers::condition_variable bar_cv;
  int arrived = 0;
  uint64_t gen = 0;
  Site bar_site{};
  int exited = 0;
  int blocked = 0;
  std::mt19937_64 rng;
  // Global memory this CTA moved (count_global). Only this CTA's fibers, which share one OS
  // thread and switch only at synchronisation calls, touch them: no atomics.
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  ReadFilter seen;
};

// One wave of CTAs alive at once (a cooperative launch is one wave), run one CTA at a time: the
// CTA holding the baton runs; it hands the baton on at grid.sync(), at exit and (random
// schedules) after a barrier.
struct Launch {
  const void* kernel;
  KernelBody body;
  void** args;
  std::string type;
  dim3 grid, block;
  size_t shared_bytes;
  bool cooperative;
  uint64_t seed;
  std::mt19937_64 rng;
  std::vector<uint3> cta_idx;
  std::mutex m;
  std::condition_variable cv;
  std::vector<int> state;
  int holder = 0;
  int grid_arrived = 0;
  uint64_t grid_gen = 0;
  Site grid_site{};
  int done = 0;
  std::atomic<bool> aborted{false};
  std::string fault;
  std::atomic<uint64_t> progress{0};
  // Sums over the wave's CTAs, added as each CTA exits (under m).
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t max_cta_bytes = 0;
};

thread_local Cta* tls_cta;
thread_local Fiber* tls_fiber;

std::string str(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << "," << v.y << "," << v.z << ")";
  return s.str();
}

std::string str(const Site& s) {
  std::ostringstream o;
  const char* file = s.file ? s.file : "?";
  const char* slash = std::strrchr(file, '/');
  o << s.what << " at " << (slash ? slash + 1 : file) << ":" << s.line << " in "
    << (s.function ? s.function : "?");
  return o.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.what, b.what) == 0 &&
         std::strcmp(a.file ? a.file : "", b.file ? b.file : "") == 0;
}

// "kernel <type> CTA (x,y,z) thread (x,y,z): "
std::string where(const Cta& c, const Fiber* f) {
  std::ostringstream o;
  o << "kernel " << c.launch->type << ", CTA " << str(c.idx);
  if (f) o << ", thread " << str(f->tid);
  o << ": ";
  return o.str();
}

void record_fault(Launch& L, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lk(L.m);
    if (L.fault.empty()) L.fault = msg;
    L.aborted = true;
  }
  L.cv.notify_all();
}

void wake_all(Cta& c) {
  c.bar_cv.notify_all();
  for (auto& w : c.warps) w->cv.notify_all();
}

// After a fault every synchronisation call returns at once, so the kernel runs to its end and no
// exception crosses a fiber stack (AddressSanitizer cannot follow those without fiber
// annotations in Boost.Context); what the launch computed is discarded.
void trap(Cta& c, const std::string& msg) {
  record_fault(*c.launch, msg);
  wake_all(c);
}

bool check_abort(Cta& c) {
  if (!c.launch->aborted) return false;
  wake_all(c);
  return true;
}

// Where every live thread of the CTA is, grouped by call site.
std::string describe(const Cta& c) {
  std::map<std::string, std::vector<int>> by_site;
  for (const Fiber& f : c.fibers) {
    if (f.exited) {
      by_site["exited"].push_back(f.linear);
    } else {
      by_site[f.waiting ? "waiting at " + str(f.wait) : "running"].push_back(f.linear);
    }
  }
  std::ostringstream o;
  for (const auto& [site, ids] : by_site) {
    o << "; " << ids.size() << " thread(s) " << site << " (threads " << ids.front();
    if (ids.size() > 1) o << " .. " << ids.back();
    o << ")";
  }
  return o.str();
}

// Called before a thread blocks on a CTA-level wait: if every other live thread is blocked too,
// nothing can ever wake them.
void block_or_deadlock(Cta& c, Fiber& me, const Site& site) {
  me.waiting = true;
  me.wait = site;
  ++c.blocked;
  if (c.blocked == c.nthreads - c.exited) {
    trap(c, where(c, &me) + "deadlock: every live thread of the CTA waits and none can proceed" +
                describe(c));
  }
}

// A waiter resumes (its release already counted it as unblocked).
void unblock(Cta& c, Fiber& me) {
  tls_fiber = &me;
  check_abort(c);  // wakes the rest of the CTA after a fault
}

// The releasing thread marks the waiters it releases as running again, so that the deadlock
// check does not count released threads that have not been scheduled yet.
void release(Cta& c, int first, int count, uint32_t lanes) {
  for (int i = first; i < first + count; ++i) {
    Fiber& f = c.fibers[i];
    if (f.waiting && (lanes >> ((i - first) % 32) & 1u)) {
      f.waiting = false;
      --c.blocked;
    }
  }
}

int pick_runnable(Launch& L, int after) {
  const int n = static_cast<int>(L.state.size());
  if (L.seed != 0) {
    std::vector<int> ready;
    for (int s = 0; s < n; ++s) {
      if (L.state[s] == kRunnable) ready.push_back(s);
    }
    return ready.empty() ? -1 : ready[L.rng() % ready.size()];
  }
  for (int k = 1; k <= n; ++k) {
    const int s = (after + k) % n;
    if (L.state[s] == kRunnable) return s;
  }
  return -1;
}

// The OS-level half of grid.sync(), done by the last thread of a CTA to arrive.
void grid_wait(Cta& c, Fiber& me, const Site& site) {
  Launch& L = *c.launch;
  std::unique_lock<std::mutex> lk(L.m);
  if (L.aborted) {
    lk.unlock();
    if (check_abort(c)) return;
  }
  if (L.done > 0) {
    lk.unlock();
    return trap(c, where(c, &me) + str(site) + " is waited on while " + std::to_string(L.done) +
                " CTA(s) of the grid have exited without reaching it");
  }
  if (L.grid_arrived == 0) {
    L.grid_site = site;
  } else if (!same_site(L.grid_site, site)) {
    lk.unlock();
    return trap(c, where(c, &me) + "CTAs wait at different grid barriers: " + str(site) + " and " +
                str(L.grid_site));
  }
  L.state[c.slot] = kGridWait;
  const uint64_t gen = L.grid_gen;
  if (++L.grid_arrived == static_cast<int>(L.state.size())) {
    L.grid_arrived = 0;
    ++L.grid_gen;
    ++g_barriers;
    for (int& s : L.state) {
      if (s == kGridWait) s = kRunnable;
    }
    L.holder = L.seed != 0 ? pick_runnable(L, c.slot) : 0;
  } else {
    L.holder = pick_runnable(L, c.slot);
  }
  ++L.progress;
  L.cv.notify_all();
  L.cv.wait(lk, [&] { return L.aborted || (L.holder == c.slot && L.grid_gen != gen); });
  lk.unlock();
  tls_fiber = &me;
  if (check_abort(c)) return;
}

// Random schedules: after a barrier, sometimes let another CTA run first.
void maybe_preempt(Cta& c) {
  Launch& L = *c.launch;
  if (L.seed == 0 || c.rng() % 4 != 0) return;
  std::unique_lock<std::mutex> lk(L.m);
  L.holder = pick_runnable(L, c.slot);
  L.cv.notify_all();
  L.cv.wait(lk, [&] { return L.aborted || L.holder == c.slot; });
}

void barrier(const Site& site, bool grid) {
  Cta& c = *tls_cta;
  Fiber& me = *tls_fiber;
  Launch& L = *c.launch;
  if (check_abort(c)) return;
  ++L.progress;
  if (grid && !L.cooperative) {
    return trap(c, where(c, &me) + str(site) + " in a kernel not launched with "
                                        "cudaLaunchCooperativeKernel");
  }
  if (c.exited > 0) {
    return trap(c, where(c, &me) + str(site) + " is reached after " + std::to_string(c.exited) +
                " thread(s) of the CTA exited: they can never arrive" + describe(c));
  }
  if (c.arrived == 0) {
    c.bar_site = site;
  } else if (!same_site(c.bar_site, site)) {
    return trap(c, where(c, &me) + "divergent barriers: this thread is at " + str(site) +
                " while others wait at " + str(c.bar_site) + describe(c));
  }
  if (++c.arrived == c.nthreads) {
    c.arrived = 0;
    if (grid) {
      grid_wait(c, me, site);
    } else {
      ++g_barriers;
      maybe_preempt(c);
      tls_fiber = &me;
    }
    ++c.gen;
    c.seen.next_interval();
    release(c, 0, c.nthreads, 0xffffffffu);
    c.bar_cv.notify_all();
    if (check_abort(c)) return;
    return;
  }
  const uint64_t gen = c.gen;
  block_or_deadlock(c, me, site);
  {
    std::unique_lock<boost::fibers::mutex> lk(c.mtx);
    c.bar_cv.wait(lk, [&] { return c.gen != gen || L.aborted.load(); });
  }
  unblock(c, me);
}

void on_exit(Cta& c, Fiber& me) {
  me.exited = true;
  ++c.exited;
  ++c.launch->progress;
  if (c.launch->aborted) {
    wake_all(c);
    return;
  }
  std::string problem;
  if (c.arrived > 0) {
    problem = "exits while " + std::to_string(c.arrived) + " thread(s) wait at " +
              str(c.bar_site);
  }
  const int lane = me.linear % 32;
  const Warp& w = *c.warps[me.linear / 32];
  if (problem.empty() && w.arrived != 0 && (w.mask >> lane & 1u)) {
    problem = "exits while its warp waits for it at " + str(w.site) + " (mask names its lane " +
              std::to_string(lane) + ")";
  }
  if (problem.empty() && c.blocked > 0 && c.blocked == c.nthreads - c.exited) {
    problem = "exits, and every thread still alive waits: deadlock";
  }
  if (!problem.empty()) {
    record_fault(*c.launch, where(c, &me) + problem + describe(c));
    wake_all(c);
  }
}

void fiber_main(Cta& c, int linear) {
  Fiber& me = c.fibers[linear];
  tls_fiber = &me;
  Launch& L = *c.launch;
  try {
    L.body(L.kernel, L.args);
  } catch (const std::exception& e) {
    record_fault(L, where(c, &me) + "exception: " + e.what());
    wake_all(c);
  }
  tls_fiber = &me;
  on_exit(c, me);
}

// Fibers round-robin (seed 0) or drawn at random at every switch.
class Scheduler final : public boost::fibers::algo::algorithm {
 public:
  explicit Scheduler(uint64_t seed) : random_(seed != 0), rng_(seed) {}
  void awakened(boost::fibers::context* ctx) noexcept override { ready_.push_back(ctx); }
  boost::fibers::context* pick_next() noexcept override {
    if (ready_.empty()) return nullptr;
    boost::fibers::context* ctx;
    if (random_) {
      const size_t i = rng_() % ready_.size();
      ctx = ready_[i];
      ready_[i] = ready_.back();
      ready_.pop_back();
    } else {
      ctx = ready_.front();
      ready_.pop_front();
    }
    return ctx;
  }
  bool has_ready_fibers() const noexcept override { return !ready_.empty(); }
  void suspend_until(Clock::time_point const& tp) noexcept override {
    std::unique_lock<std::mutex> lk(m_);
    if (tp == Clock::time_point::max()) {
      cv_.wait(lk, [&] { return flag_; });
    } else {
      cv_.wait_until(lk, tp, [&] { return flag_; });
    }
    flag_ = false;
  }
  void notify() noexcept override {
    {
      std::lock_guard<std::mutex> lk(m_);
      flag_ = true;
    }
    cv_.notify_all();
  }

 private:
  bool random_;
  std::mt19937_64 rng_;
  std::deque<boost::fibers::context*> ready_;
  std::mutex m_;
  std::condition_variable cv_;
  bool flag_ = false;
};

// The calling thread's TLS block of this library, and its size.
struct TlsBlock {
  void* handle = nullptr;
  size_t size = 0;
};

int find_tls(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<std::pair<ElfW(Addr), size_t>*>(data);
  if (info->dlpi_addr != want->first) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) want->second = info->dlpi_phdr[i].p_memsz;
  }
  return 1;
}

const TlsBlock& tls_block() {
  static const TlsBlock block = [] {
    TlsBlock b;
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&find_tls), &info) == 0) return b;
    b.handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    std::pair<ElfW(Addr), size_t> want{reinterpret_cast<ElfW(Addr)>(info.dli_fbase), 0};
    dl_iterate_phdr(&find_tls, &want);
    b.size = want.second;
    return b;
  }();
  return block;
}

// Shared memory at CTA start: every byte 0xFF (NaN in float, double, half and bfloat16).
void poison_shared_memory(size_t dynamic_bytes) {
  tls_cta = nullptr;  // allocates this thread's block
  const TlsBlock& b = tls_block();
  void* data = nullptr;
  if (b.handle == nullptr || dlinfo(b.handle, RTLD_DI_TLS_DATA, &data) != 0 || data == nullptr) {
    throw std::runtime_error("cuda emulation: cannot find the TLS block of the kernel library");
  }
  // All of it but the dynamic array past this launch's size: the array is as large as the
  // largest opt-in (227 KiB), and poisoning all of it for each of thousands of CTAs would cost
  // more than running most of them.
  unsigned char* begin = static_cast<unsigned char*>(data);
  unsigned char* const end = begin + b.size;
  unsigned char* const skip = batchrenorm_dynamic_smem + dynamic_bytes;
  unsigned char* const resume = batchrenorm_dynamic_smem + kMaxDynamicShared;
  if (skip >= begin && resume <= end) {
    std::memset(begin, 0xFF, static_cast<size_t>(skip - begin));
    std::memset(resume, 0xFF, static_cast<size_t>(end - resume));
  } else {
    std::memset(begin, 0xFF, b.size);
  }
#if defined(__SANITIZE_ADDRESS__)
  // Past the launch's dynamic shared memory is out of bounds.
  ASAN_POISON_MEMORY_REGION(batchrenorm_dynamic_smem + dynamic_bytes,
                            kMaxDynamicShared - dynamic_bytes);
#else
  (void)dynamic_bytes;
#endif
}

#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kFiberStack = 256 * 1024;
#else
constexpr size_t kFiberStack = 64 * 1024;
#endif

void run_cta(Launch& L, int slot) {
  poison_shared_memory(L.shared_bytes);
  Cta c;
  c.launch = &L;
  c.slot = slot;
  c.idx = L.cta_idx[slot];
  c.nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  c.rng.seed(L.seed * 0x9E3779B97F4A7C15ull + slot + 1);
  c.fibers.resize(c.nthreads);
  for (int i = 0; i < c.nthreads; ++i) {
    Fiber& f = c.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
  }
  for (int w = 0; w < (c.nthreads + 31) / 32; ++w) {
    c.warps.push_back(std::make_unique<Warp>());
    c.warps.back()->members = std::min(32, c.nthreads - 32 * w);
  }
  tls_cta = &c;
  tls_fiber = nullptr;
  boost::fibers::use_scheduling_algorithm<Scheduler>(L.seed == 0 ? 0 : (c.rng() | 1));
  {
    std::unique_lock<std::mutex> lk(L.m);
    L.cv.wait(lk, [&] { return L.aborted || L.holder == slot; });
  }
  if (!L.aborted) {
    std::vector<boost::fibers::fiber> fibers;
    fibers.reserve(c.nthreads);
    for (int i = 0; i < c.nthreads; ++i) {
      fibers.emplace_back(std::allocator_arg, boost::fibers::fixedsize_stack(kFiberStack),
                          [&c, i] { fiber_main(c, i); });
    }
    for (auto& f : fibers) f.join();
  }
  g_threads += c.nthreads;
  ++g_ctas;
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(batchrenorm_dynamic_smem, kMaxDynamicShared);
#endif
  g_bytes_read += c.bytes_read;
  g_bytes_written += c.bytes_written;
  tls_cta = nullptr;
  std::lock_guard<std::mutex> lk(L.m);
  L.bytes_read += c.bytes_read;
  L.bytes_written += c.bytes_written;
  L.max_cta_bytes = std::max(L.max_cta_bytes, c.bytes_read + c.bytes_written);
  L.state[slot] = kDone;
  ++L.done;
  ++L.progress;
  if (L.grid_arrived > 0 && !L.aborted) {
    L.aborted = true;
    if (L.fault.empty()) {
      L.fault = "kernel " + L.type + ", CTA " + str(c.idx) + ": exits while " +
                std::to_string(L.grid_arrived) + " CTA(s) wait at " + str(L.grid_site);
    }
  }
  L.holder = pick_runnable(L, slot);
  L.cv.notify_all();
}

double watchdog_seconds() {
  const char* s = std::getenv("BRN_CUDA_EMULATION_WATCHDOG_S");
  return s ? std::atof(s) : 300.0;
}

// Runs one wave; returns the fault ("" if none).
std::string run_wave(Launch& L) {
  const int n = static_cast<int>(L.cta_idx.size());
  L.state.assign(n, kRunnable);
  L.holder = L.seed != 0 ? static_cast<int>(L.rng() % n) : 0;
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int s = 0; s < n; ++s) {
    threads.emplace_back([&L, s] {
      try {
        run_cta(L, s);
      } catch (const std::exception& e) {
        record_fault(L, e.what());
      }
    });
  }
  const double limit = watchdog_seconds();
  uint64_t seen = L.progress;
  auto last = Clock::now();
  std::unique_lock<std::mutex> lk(L.m);
  while (L.done < n) {
    L.cv.wait_for(lk, std::chrono::seconds(1));
    if (L.progress != seen) {
      seen = L.progress;
      last = Clock::now();
    } else if (std::chrono::duration<double>(Clock::now() - last).count() > limit) {
      std::fprintf(stderr,
                   "cuda emulation watchdog: kernel %s made no progress for %.0f s (CTA slot %d "
                   "holds the baton, %d of %d CTAs done, %d at grid.sync); aborting\n",
                   L.type.c_str(), limit, L.holder, L.done, n, L.grid_arrived);
      std::abort();
    }
  }
  lk.unlock();
  for (auto& t : threads) t.join();
  return L.fault;
}

cudaError_t set_error(cudaError_t err, const std::string& fault) {
  std::lock_guard<std::mutex> lk(g_mutex);
  g_fault = fault;
  if (err != cudaSuccess) g_last_error = err;
  return err;
}

std::string short_type(const char* pretty) {
  // "... [with P = {batchrenorm::cuda::{anonymous}::Params<float, float>}]" -> the braces.
  std::string s(pretty);
  const size_t at = s.find("P = {");
  if (at == std::string::npos) return s;
  const size_t end = s.rfind('}');
  return s.substr(at + 5, end == std::string::npos ? std::string::npos : end - at - 5);
}

}  // namespace

uint3 thread_idx() { return tls_fiber->tid; }
uint3 block_idx() { return tls_cta->idx; }
dim3 block_dim() { return tls_cta->launch->block; }
dim3 grid_dim() { return tls_cta->launch->grid; }

void sync_threads(Site site) { barrier(site, false); }
void sync_grid(Site site) { barrier(site, true); }

uint64_t shuffle(unsigned mask, uint64_t bits, ShuffleMode mode, int arg, int width, Site site) {
  Cta& c = *tls_cta;
  Fiber& me = *tls_fiber;
  if (check_abort(c)) return bits;
  ++c.launch->progress;
  const int lane = me.linear % 32;
  Warp& w = *c.warps[me.linear / 32];
  if (!(mask >> lane & 1u)) {
    trap(c, where(c, &me) + str(site) + ": the mask does not name the calling lane " +
                std::to_string(lane));
    return bits;
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    trap(c, where(c, &me) + str(site) + ": width must be a power of 2 <= 32, got " +
                std::to_string(width));
    return bits;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= w.members) {
      trap(c, where(c, &me) + str(site) + ": the mask names lane " + std::to_string(l) +
                  ", which the CTA does not have");
      return bits;
    }
    if (c.fibers[(me.linear / 32) * 32 + l].exited) {
      trap(c, where(c, &me) + str(site) + ": the mask names lane " + std::to_string(l) +
                  ", which has exited and cannot take part");
      return bits;
    }
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.site = site;
  } else if (w.mask != mask || !same_site(w.site, site)) {
    std::ostringstream o;
    o << std::hex << "lanes of a warp disagree: this lane is at " << str(site) << " with mask 0x"
      << mask << ", others at " << str(w.site) << " with mask 0x" << w.mask;
    trap(c, where(c, &me) + o.str() + describe(c));
    return bits;
  }
  const int buf = static_cast<int>(w.gen & 1u);
  w.vals[buf][lane] = bits;
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    w.arrived = 0;
    ++w.gen;
    ++g_shuffles;
    release(c, (me.linear / 32) * 32, w.members, w.mask);
    w.cv.notify_all();
  } else {
    const uint64_t gen = w.gen;
    block_or_deadlock(c, me, site);
    {
      std::unique_lock<boost::fibers::mutex> lk(c.mtx);
      w.cv.wait(lk, [&] { return w.gen != gen || c.launch->aborted.load(); });
    }
    unblock(c, me);
  }
  const int base = lane & ~(width - 1);
  int src = lane;
  switch (mode) {
    case ShuffleMode::kDown:
      if ((lane - base) + arg < width) src = lane + arg;
      break;
    case ShuffleMode::kUp:
      if (lane - base >= arg) src = lane - arg;
      break;
    case ShuffleMode::kXor:
      src = lane ^ arg;
      if (src >= base + width) src = lane;
      break;
    case ShuffleMode::kIndex:
      src = base + (arg % width);
      break;
  }
  if (!(mask >> src & 1u)) {
    trap(c, where(c, &me) + str(site) + ": lane " + std::to_string(lane) + " reads lane " +
                std::to_string(src) + ", which the mask does not name (undefined value)");
    return bits;
  }
  return w.vals[buf][src];
}

cudaError_t launch(const void* kernel, KernelBody body, void** args, const char* kernel_type,
                   dim3 grid, dim3 block, size_t shared_bytes, bool cooperative) {
  ++g_launches;
  const std::string type = short_type(kernel_type);
  int device = 0;
  const DeviceProperties dev = detail::current_device(&device);
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lk(g_mutex);
    seed = g_seed;
  }
  LaunchRecord record{};
  record.kernel = detail::kernel_name(kernel, type);
  record.op = detail::current_op();
  record.grid[0] = grid.x, record.grid[1] = grid.y, record.grid[2] = grid.z;
  record.block[0] = block.x, record.block[1] = block.y, record.block[2] = block.z;
  record.shared_bytes = shared_bytes;
  record.cooperative = cooperative;
  record.seed = seed;
  record.device = device;
  record.ctas = uint64_t(grid.x) * grid.y * grid.z;
  // Every launch is logged, a failed one too (ok = false), so a caller counting launches sees
  // the attempt.
  auto finish = [&](cudaError_t err, const std::string& fault) {
    record.ok = err == cudaSuccess;
    detail::append_launch_record(record);
    return set_error(err, fault);
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || record.ctas == 0) {
    return finish(cudaErrorInvalidConfiguration,
                  "launch of " + type + ": invalid grid or block size");
  }
  const size_t max_shared = detail::max_dynamic_shared(kernel);
  if (shared_bytes > max_shared) {
    return finish(cudaErrorInvalidValue,
                  "launch of " + type + ": " + std::to_string(shared_bytes) +
                      " bytes of dynamic shared memory > the kernel's limit of " +
                      std::to_string(max_shared) + " on " + dev.name +
                      " (cudaFuncAttributeMaxDynamicSharedMemorySize raises it up to " +
                      std::to_string(dev.shared_per_block_optin) + ")");
  }
  const uint64_t resident =
      uint64_t(dev.sms) * detail::occupancy(dev, static_cast<int>(threads), shared_bytes);
  if (cooperative && record.ctas > resident) {
    return finish(cudaErrorCooperativeLaunchTooLarge,
                  "cooperative launch of " + type + ": " + std::to_string(record.ctas) +
                      " CTAs, but the device holds " + std::to_string(resident));
  }
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
  std::mt19937_64 rng(seed);
  if (seed != 0 && !cooperative) std::shuffle(order.begin(), order.end(), rng);
  // A non-cooperative grid runs in waves of resident CTAs (at most 64 OS threads at once).
  const size_t wave =
      cooperative ? order.size() : std::max<uint64_t>(1, std::min<uint64_t>(resident, 64));
  for (size_t first = 0; first < order.size(); first += wave) {
    Launch L;
    L.kernel = kernel;
    L.body = body;
    L.args = args;
    L.type = type;
    L.grid = grid;
    L.block = block;
    L.shared_bytes = shared_bytes;
    L.cooperative = cooperative;
    L.seed = seed;
    L.rng.seed(rng());
    L.cta_idx.assign(order.begin() + first, order.begin() + std::min(order.size(), first + wave));
    const std::string fault = run_wave(L);
    record.grid_syncs += L.grid_gen;
    record.bytes_read += L.bytes_read;
    record.bytes_written += L.bytes_written;
    record.max_cta_bytes = std::max(record.max_cta_bytes, L.max_cta_bytes);
    if (!fault.empty()) return finish(cudaErrorLaunchFailure, fault);
  }
  return finish(cudaSuccess, "");
}

void count_global(const void* address, size_t bytes, bool is_write) {
  Cta* c = tls_cta;
  if (c == nullptr) {  // not from a kernel (a test calling the helpers on the host)
    (is_write ? g_bytes_written : g_bytes_read) += bytes;
    return;
  }
  if (is_write) {
    c->bytes_written += bytes;
  } else if (c->seen.first_read(address, bytes)) {
    c->bytes_read += bytes;
  }
}

void set_schedule(uint64_t seed) {
  std::lock_guard<std::mutex> lk(g_mutex);
  g_seed = seed;
}

std::string last_fault() {
  std::lock_guard<std::mutex> lk(g_mutex);
  return g_fault;
}

Counters counters() {
  return {g_launches.load(), g_ctas.load(),        g_threads.load(),      g_barriers.load(),
          g_shuffles.load(), g_bytes_read.load(), g_bytes_written.load()};
}

}  // namespace cuda_emulation

// The C runtime API the kernels' host code calls (the device queries: device.cpp).
cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lk(cuda_emulation::g_mutex);
  const cudaError_t err = cuda_emulation::g_last_error;
  cuda_emulation::g_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lk(cuda_emulation::g_mutex);
  return cuda_emulation::g_last_error;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
    default: return "cudaError (other)";
  }
}

const char* cudaGetErrorString(cudaError_t err) { return cudaGetErrorName(err); }
