// counters.cpp: the CUDA emulator's launch log (cuda_emulation.h: launch_log) and the names of
// the kernels in it.
//
// The per-access counting itself lives in emulator.cpp (count_global adds to the running CTA's
// own counters, which need no atomics: a CTA's fibers share one OS thread); a launch sums its
// CTAs and appends one record here.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emulator_internal.h"

namespace cuda_emulation {
namespace {

std::mutex g_log_mutex;  // guards the globals below
std::deque<LaunchRecord> g_log;
std::string g_op;
std::map<const void*, std::string> g_names;

// The symbol at `address` in the file it was loaded from. The kernels have internal linkage
// (an anonymous namespace), so they are in .symtab only, which dladdr does not search.
std::string local_symbol(const void* address) {
  Dl_info info{};
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  if (info.dli_sname != nullptr && info.dli_saddr == address) return info.dli_sname;
  const int fd = open(info.dli_fname, O_RDONLY);
  if (fd < 0) return "";
  struct stat st{};
  std::string found;
  if (fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(sizeof(ElfW(Ehdr)))) {
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const auto* base = static_cast<const unsigned char*>(map);
      const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
      const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
      const auto offset = reinterpret_cast<uintptr_t>(address) -
                          reinterpret_cast<uintptr_t>(info.dli_fbase);
      for (int i = 0; i < eh->e_shnum && found.empty(); ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
        const char* strtab = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
        const size_t n = sh[i].sh_size / sizeof(ElfW(Sym));
        for (size_t k = 0; k < n; ++k) {
          if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && syms[k].st_value == offset) {
            found = strtab + syms[k].st_name;
            break;
          }
        }
      }
      munmap(map, st.st_size);
    }
  }
  close(fd);
  return found;
}

// "void ns::(anonymous namespace)::welford_kernel<float, 4, false>(ns::Params<float, float>)"
// -> "welford_kernel<float, 4, false>".
std::string short_name(const std::string& mangled) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  if (status != 0 || demangled == nullptr) return mangled;
  std::string s(demangled);
  std::free(demangled);
  // The parameter list: the parenthesis that matches the final one.
  if (!s.empty() && s.back() == ')') {
    int depth = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') ++depth;
      if (s[i] == '(' && --depth == 0) {
        s.resize(i);
        break;
      }
    }
  }
  if (s.compare(0, 5, "void ") == 0) s.erase(0, 5);
  // The last "::" outside template arguments starts the unqualified name.
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (depth == 0 && s[i] == ':' && s[i + 1] == ':') start = i + 2;
  }
  return s.substr(start);
}

}  // namespace

namespace detail {

std::string kernel_name(const void* kernel, const std::string& fallback) {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  auto it = g_names.find(kernel);
  if (it == g_names.end()) {
    const std::string symbol = local_symbol(kernel);
    it = g_names.emplace(kernel, symbol.empty() ? fallback : short_name(symbol)).first;
  }
  return it->second;
}

std::string current_op() {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  return g_op;
}

void append_launch_record(LaunchRecord record) {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  g_log.push_back(std::move(record));
  if (g_log.size() > kLaunchLogSize) g_log.pop_front();
}

}  // namespace detail

std::vector<LaunchRecord> launch_log() {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  return std::vector<LaunchRecord>(g_log.begin(), g_log.end());
}

void reset_launch_log() {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  g_log.clear();
}

void set_op(const std::string& op) {
  std::lock_guard<std::mutex> lk(g_log_mutex);
  g_op = op;
}

}  // namespace cuda_emulation
