// The pybind11 module moediffuseq._C: build information only. Tensors cross into the library
// through the dispatcher (torch.ops.moediffuseq.*), registered in registration.cpp; importing
// this module loads those registrations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace {

std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : archs) {
    if (c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moediffuseq compiled kernels (ops live under torch.ops.moediffuseq)";
  m.attr("has_cuda") = static_cast<bool>(MOEDIFFUSEQ_WITH_CUDA);
  m.attr("cuda_archs") = split_archs(MOEDIFFUSEQ_CUDA_ARCHS);
  m.attr("cutlass_version") = std::string(MOEDIFFUSEQ_CUTLASS_VERSION);
  m.attr("cpu_isa") = std::string(MOEDIFFUSEQ_CPU_ISA);
}
