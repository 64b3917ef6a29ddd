// Host-side check of the device check's decision (csrc/common/cuda/cuda_arch_support.h): which
// built architectures run on which compute capability, and the message for a GPU the build
// has no code for. No GPU needed (cmake/cuda_compile_check builds and runs it).
#include <cstdio>
#include <string>

#include "common/cuda/cuda_arch_support.h"

using namespace moediffuseq;

namespace {

int errors = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && errors++ < 40) std::printf("FAILED: %s\n", what.c_str());
}

void runs(const char* list, int major, int minor, bool expected) {
  const bool got = cuda_archs_run_on(list, major, minor);
  expect(got == expected, std::string("cuda_archs_run_on(\"") + list + "\", " + std::to_string(major) + "." +
                              std::to_string(minor) + ") = " + (got ? "true" : "false"));
}

void check_parse() {
  CudaArch a;
  expect(parse_cuda_arch("90a-real", a) && a.major == 9 && a.minor == 0 && a.variant == 'a' && a.sass && !a.ptx,
         "parse 90a-real");
  expect(parse_cuda_arch("80", a) && a.major == 8 && a.minor == 0 && a.variant == 0 && a.sass && a.ptx, "parse 80");
  expect(parse_cuda_arch("100f-virtual", a) && a.major == 10 && a.minor == 0 && a.variant == 'f' && !a.sass && a.ptx,
         "parse 100f-virtual");
  expect(parse_cuda_arch("121a", a) && a.major == 12 && a.minor == 1 && a.variant == 'a', "parse 121a");
  expect(!parse_cuda_arch("sm_90", a) && !parse_cuda_arch("9.0a", a) && !parse_cuda_arch("", a) &&
             !parse_cuda_arch("a", a) && !parse_cuda_arch("-real", a),
         "unreadable entries refused");
  expect(parse_cuda_archs("80-real, 90a;;100f").size() == 3, "list separators ',', ';' and spaces");
}

void check_runs() {
  // sm_90a: capability 9.0 only, never 8.x nor 10.x (arch-specific SASS; its PTX neither).
  runs("90a-real", 9, 0, true);
  runs("90a-real", 8, 0, false);
  runs("90a-real", 8, 9, false);
  runs("90a-real", 10, 0, false);
  runs("90a-real", 12, 0, false);
  runs("90a", 10, 0, false);
  runs("90a-virtual", 9, 0, true);
  // plain SASS: same major, minor at least the built one
  runs("80-real", 8, 0, true);
  runs("80-real", 8, 6, true);
  runs("86-real", 8, 0, false);
  runs("80-real", 9, 0, false);
  runs("90-real", 9, 0, true);
  runs("90-real", 10, 0, false);
  // plain PTX: any capability at least the built one
  runs("80", 9, 0, true);
  runs("80", 12, 0, true);
  runs("80", 7, 5, false);
  runs("80-virtual", 8, 6, true);
  runs("90-virtual", 8, 9, false);
  // family: same major, minor at least the built one
  runs("100f-real", 10, 3, true);
  runs("100f-real", 10, 0, true);
  runs("100f", 12, 0, false);
  runs("103f-real", 10, 0, false);
  // lists: any entry
  runs("80-real,90a-real", 9, 0, true);
  runs("80-real;90a-real", 8, 6, true);
  runs("80-real,90a-real", 12, 0, false);
  runs("", 9, 0, false);
  runs("sm_90a", 9, 0, false);
}

void check_messages() {
  const std::string m = cuda_arch_mismatch("90a-real", "cuda:0 (NVIDIA A100-SXM4-80GB)", 8, 0);
  std::printf("message: %s\n", m.c_str());
  expect(m == "moediffuseq: the CUDA kernels were built for sm_90a but cuda:0 (NVIDIA A100-SXM4-80GB) is sm_80; "
              "rebuild with TORCH_CUDA_ARCH_LIST=8.0",
         "A100 message");
  expect(cuda_arch_mismatch("90a-real", "cuda:1 (NVIDIA H200)", 9, 0).empty(), "H200 runs sm_90a");
  const std::string h = cuda_arch_mismatch("80-real", "cuda:0 (NVIDIA H100)", 9, 0);
  expect(h.find("built for sm_80 but cuda:0 (NVIDIA H100) is sm_90; rebuild with TORCH_CUDA_ARCH_LIST=9.0a") !=
             std::string::npos,
         "H100 message asks for 9.0a: " + h);
  expect(describe_cuda_archs("80-real,90a") == "sm_80, sm_90a + PTX compute_90a", describe_cuda_archs("80-real,90a"));
  expect(describe_cuda_archs("100f-virtual") == "PTX compute_100f", describe_cuda_archs("100f-virtual"));
  expect(cuda_archs_contain("80-real,90a-real", 9, 0, 'a') && !cuda_archs_contain("90-real", 9, 0, 'a'),
         "cuda_archs_contain");
  expect(torch_arch_list_for(8, 6) == "8.6" && torch_arch_list_for(9, 0) == "9.0a" &&
             torch_arch_list_for(12, 0) == "12.0",
         "torch_arch_list_for");
}

}  // namespace

int main() {
  check_parse();
  check_runs();
  check_messages();
  if (errors) {
    std::printf("cuda_arch_support: %d check(s) failed\n", errors);
    return 1;
  }
  std::printf("cuda_arch_support: all checks passed\n");
  return 0;
}
