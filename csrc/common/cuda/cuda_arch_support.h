// Which compiled CUDA code runs on which GPU: the decision behind the device check of the CUDA
// glue (csrc/common/cuda/device_check.cpp). Plain C++, no CUDA or torch header, so that a host program
// tests it on any machine (tests/cuda_host/cuda_arch_support.cu).
//
// The list is the build's CMake CUDA_ARCHITECTURES (cmake/cuda_archs.cmake), ',' or ';'
// separated: "90a-real" = SASS for sm_90a, "90a-virtual" = PTX for compute_90a, "90a" = both.
// What runs where (CUDA's compatibility rules):
//   SASS sm_XY    capability X.Z with Z >= Y (binary compatibility within a major version)
//   SASS sm_XYf   the same (family-specific features: X.Z with Z >= Y)
//   SASS sm_XYa   capability X.Y only (arch-specific features: sm_90a runs on 9.0 alone)
//   PTX  XY       any capability >= X.Y (the driver compiles it)
//   PTX  XYf      X.Z with Z >= Y;   PTX XYa   X.Y only
#pragma once

#include <cctype>
#include <string>
#include <vector>

namespace moediffuseq {

struct CudaArch {
  int major = 0;
  int minor = 0;
  char variant = 0;  // 0, 'a' (arch-specific) or 'f' (family-specific)
  bool sass = false;
  bool ptx = false;
};

// Parses one entry "XY[a|f][-real|-virtual]" (the last digit of the number is the minor
// version: "100f" is 10.0f); false when it is not of that form.
inline bool parse_cuda_arch(const std::string& entry, CudaArch& out) {
  std::string body = entry;
  CudaArch a;
  a.sass = a.ptx = true;
  const std::string real = "-real", virt = "-virtual";
  if (body.size() > real.size() && body.compare(body.size() - real.size(), real.size(), real) == 0) {
    body.resize(body.size() - real.size());
    a.ptx = false;
  } else if (body.size() > virt.size() && body.compare(body.size() - virt.size(), virt.size(), virt) == 0) {
    body.resize(body.size() - virt.size());
    a.sass = false;
  }
  if (!body.empty() && (body.back() == 'a' || body.back() == 'f')) {
    a.variant = body.back();
    body.pop_back();
  }
  if (body.size() < 2 || body.size() > 4) return false;
  for (char c : body) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  a.minor = body.back() - '0';
  a.major = std::stoi(body.substr(0, body.size() - 1));
  out = a;
  return true;
}

// The entries of a list; unreadable entries are left out.
inline std::vector<CudaArch> parse_cuda_archs(const std::string& list) {
  std::vector<CudaArch> out;
  std::string cur;
  auto flush = [&] {
    CudaArch a;
    if (!cur.empty() && parse_cuda_arch(cur, a)) out.push_back(a);
    cur.clear();
  };
  for (char c : list) {
    if (c == ',' || c == ';' || c == ' ') {
      flush();
    } else {
      cur.push_back(c);
    }
  }
  flush();
  return out;
}

// Whether the code of `a` runs on a device of capability major.minor (rules above).
inline bool cuda_arch_runs_on(const CudaArch& a, int major, int minor) {
  const bool exact = major == a.major && minor == a.minor;
  const bool same_major_newer = major == a.major && minor >= a.minor;
  if (a.variant == 'a') return exact;
  if (a.variant == 'f') return same_major_newer;
  if (a.sass && same_major_newer) return true;
  return a.ptx && (major > a.major || same_major_newer);
}

inline bool cuda_archs_run_on(const std::string& list, int major, int minor) {
  for (const CudaArch& a : parse_cuda_archs(list)) {
    if (cuda_arch_runs_on(a, major, minor)) return true;
  }
  return false;
}

// Whether the list holds code for arch major.minor[variant] exactly (SASS or PTX): e.g. the
// sm_90a CUTLASS kernels are in the build only when 90a is.
inline bool cuda_archs_contain(const std::string& list, int major, int minor, char variant) {
  for (const CudaArch& a : parse_cuda_archs(list)) {
    if (a.major == major && a.minor == minor && a.variant == variant) return true;
  }
  return false;
}

inline std::string cuda_arch_name(int major, int minor, char variant = 0) {
  std::string s = std::to_string(major) + std::to_string(minor);
  if (variant) s.push_back(variant);
  return s;
}

// "sm_90a", "sm_80, sm_90a + PTX compute_90a": the list for messages.
inline std::string describe_cuda_archs(const std::string& list) {
  std::string out;
  for (const CudaArch& a : parse_cuda_archs(list)) {
    const std::string name = cuda_arch_name(a.major, a.minor, a.variant);
    if (!out.empty()) out += ", ";
    if (a.sass) out += "sm_" + name;
    if (a.sass && a.ptx) out += " + ";
    if (a.ptx) out += "PTX compute_" + name;
  }
  return out.empty() ? "no architecture" : out;
}

// The TORCH_CUDA_ARCH_LIST entry that builds for a device: the kernels use sm_90a features on
// capability 9.0, the plain architecture elsewhere.
inline std::string torch_arch_list_for(int major, int minor) {
  return std::to_string(major) + "." + std::to_string(minor) + (major == 9 && minor == 0 ? "a" : "");
}

// Empty when the build's code runs on the device, else the error message naming the fix.
inline std::string cuda_arch_mismatch(const std::string& list, const std::string& device, int major, int minor) {
  if (cuda_archs_run_on(list, major, minor)) return "";
  return "moediffuseq: the CUDA kernels were built for " + describe_cuda_archs(list) + " but " + device + " is sm_" +
         cuda_arch_name(major, minor) + "; rebuild with TORCH_CUDA_ARCH_LIST=" + torch_arch_list_for(major, minor);
}

}  // namespace moediffuseq
