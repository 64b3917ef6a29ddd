// CUDA moe_ffn and moe_ffn_backward: the torch-facing half. Same contract and saved outputs as
// the CPU op (csrc/moe/cpu/moe_ffn.cpp): hidden (T*k, F1) and expert_out (T*k, D) hold the grouped
// rows (expert by expert, token order inside an expert), rows past the valid slots are zero.
//
//   route (moe_routing.cu: stable counting sort on the device) -> ONE device-to-host copy of
//   (first bad index, offsets[0..E]): the index check and the group sizes -> gather -> grouped
//   GEMM -> activation -> grouped GEMM -> weighted combine (float32, no atomics).
//
// Grouped GEMMs: the CUTLASS sm_90a ptr-array kernels (moe_grouped_gemm*.cu) for bfloat16 /
// float16 when D and F are multiples of 8, the operands 16-byte aligned and the GPU is sm_90a;
// otherwise one ATen matmul per non-empty expert on views of the same buffers. The fallback is
// by design for float32 (silent) and for widths that are not multiples of 8 (warned once); any
// other refusal of a problem that qualifies (16-byte alignment of an operand, a GPU that is not
// sm_90a, CUTLASS's can_implement) warns once naming why, and with MOEDIFFUSEQ_STRICT_CUTLASS=1
// in the environment it is an error: the switch that tests and the GPU check set.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda/device_check.h"
#include "common/kernel_dtype.h"
#include "moe/cuda/moe_kernels.h"
#include "moe/moe_checks.h"

namespace moediffuseq::cuda {
namespace {

struct DeviceRouting {
  at::Tensor row_of_slot;        // int32 (T*k): grouped row of a slot, -1 if dropped
  at::Tensor slot_of_row;        // int32 (T*k): slot of a grouped row (the first num_valid entries)
  std::vector<int64_t> offsets;  // (E + 1), on the host: expert e owns rows [offsets[e], offsets[e+1])

  int64_t num_valid() const { return offsets.back(); }
};

DeviceRouting route(const at::Tensor& indices, int64_t E, const char* op, cudaStream_t stream) {
  const int64_t N = indices.numel();
  TORCH_CHECK(N < INT_MAX, op, ": the CUDA kernels take fewer than 2^31 routing slots (T*k), got ", N);
  TORCH_CHECK(E <= kMoeMaxExperts, op, ": the CUDA kernels take at most ", kMoeMaxExperts, " experts, got ", E);
  const auto i32 = indices.options().dtype(at::kInt);
  at::Tensor scratch = at::empty({moe_routing_scratch_ints(N, static_cast<int>(E))}, i32);
  at::Tensor meta = at::empty({E + 2}, indices.options());
  DeviceRouting r;
  r.row_of_slot = at::empty({N}, i32);
  r.slot_of_row = at::empty({N}, i32);
  MoeRoutingParams p;
  p.num_slots = N;
  p.num_experts = static_cast<int>(E);
  p.indices = indices.data_ptr<int64_t>();
  p.scratch = scratch.data_ptr<int32_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.row_of_slot = r.row_of_slot.data_ptr<int32_t>();
  p.slot_of_row = r.slot_of_row.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_moe_routing(p, stream));
  const at::Tensor host = meta.to(at::kCPU);  // the one synchronising copy of the op
  const int64_t* m = host.data_ptr<int64_t>();
  if (m[0] >= 0) {
    const int64_t value = indices.reshape({-1})[m[0]].item<int64_t>();
    TORCH_CHECK(false, op, ": indices must lie in [0, ", E, ") (or -1 for a dropped slot), got ", value,
                " at flat position ", m[0]);
  }
  r.offsets.assign(m + 1, m + 2 + E);
  return r;
}

// The three operands of one expert's GEMM, d = a b, as views (the transposes are views too).
struct GemmOperands {
  at::Tensor a, b, d;
};

bool packed_row_major(const at::Tensor& t) {
  return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) == t.size(1));
}
bool packed_col_major(const at::Tensor& t) {
  return t.stride(0) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(0));
}
bool has_layout(const at::Tensor& t, bool row_major) { return row_major ? packed_row_major(t) : packed_col_major(t); }
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// MOEDIFFUSEQ_STRICT_CUTLASS=1: a refused CUTLASS grouped GEMM is an error, not a fallback (read once).
bool strict_cutlass() {
  static const bool strict = [] {
    const char* v = std::getenv("MOEDIFFUSEQ_STRICT_CUTLASS");
    return v != nullptr && std::string(v) == "1";
  }();
  return strict;
}

// The CUTLASS grouped GEMM was refused for `reason`: the per-expert matmuls run instead, with
// one warning per process (none for float32). `by_design`: the dtype or the widths rule the
// kernel out (tensor_core_refusal); otherwise the problem qualified and strict mode forbids it.
void refuse_cutlass(const char* op, const std::string& reason, bool by_design, bool is_float32) {
  TORCH_CHECK(by_design || !strict_cutlass(), op, ": the CUTLASS grouped GEMM cannot run (", reason,
              ") and MOEDIFFUSEQ_STRICT_CUTLASS=1 forbids the per-expert matmul fallback");
  if (!is_float32) {
    TORCH_WARN_ONCE(op, ": the CUTLASS grouped GEMM cannot run (", reason,
                    "); the experts run as per-expert matmuls, slower (warned once; "
                    "MOEDIFFUSEQ_STRICT_CUTLASS=1 makes it an error)");
  }
}

// One GEMM per non-empty expert: make(e, row0, n) gives the operands of expert e, whose grouped
// rows are [row0, row0 + n). `layout` names how the views of a and b are laid out.
// `no_tensor_cores` is empty when the dtype and widths suit the CUTLASS kernel, else why not.
template <typename Make>
void expert_gemms(const DeviceRouting& r, const std::string& no_tensor_cores, GemmLayout layout,
                  const at::Tensor& like, cudaStream_t stream, const char* op, const Make& make) {
  std::vector<GemmOperands> gemms;
  for (size_t e = 0; e + 1 < r.offsets.size(); ++e) {
    const int64_t n = r.offsets[e + 1] - r.offsets[e];
    if (n > 0) gemms.push_back(make(static_cast<int64_t>(e), r.offsets[e], n));
  }
  if (gemms.empty()) return;
  const bool a_row = layout != GemmLayout::kColRow, b_row = layout != GemmLayout::kRowCol;
  const bool tensor_cores = no_tensor_cores.empty();
  bool aligned = true;
  std::vector<GroupedGemmProblem> problems;
  for (const GemmOperands& g : gemms) {
    // (the layout test is only meaningful for the widths the tensor-core path takes, >= 8)
    TORCH_INTERNAL_ASSERT(!tensor_cores || (has_layout(g.a, a_row) && has_layout(g.b, b_row) &&
                                            packed_row_major(g.d)),
                          op, ": operand views do not match the GEMM layout");
    aligned = aligned && aligned16(g.a) && aligned16(g.b) && aligned16(g.d);
    GroupedGemmProblem p;
    p.m = static_cast<int>(g.d.size(0));
    p.n = static_cast<int>(g.d.size(1));
    p.k = static_cast<int>(g.a.size(1));
    p.a = g.a.data_ptr();
    p.b = g.b.data_ptr();
    p.d = g.d.data_ptr();
    problems.push_back(p);
  }
  const DType dtype = kernel_dtype(like, op);
  const int groups = static_cast<int>(problems.size());
  const int device = like.get_device();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int sms = props->multiProcessorCount;
  std::string refusal = no_tensor_cores;
  if (refusal.empty() && !aligned) {
    refusal = "alignment: an operand does not start on a 16-byte boundary";
  } else if (refusal.empty() && !device_runs_sm90a(static_cast<c10::DeviceIndex>(device))) {
    refusal = "device: the kernel is sm_90a code and cuda:" + std::to_string(device) + " is sm_" +
              std::to_string(props->major) + std::to_string(props->minor) + " (built for " MOEDIFFUSEQ_CUDA_ARCHS ")";
  } else if (refusal.empty()) {
    if (const char* status = moe_grouped_gemm_refusal(dtype, layout, groups, problems.data(), device, sms)) {
      refusal = std::string("CUTLASS can_implement refused the groups: ") + status;
    }
  }
  if (!refusal.empty()) {
    refuse_cutlass(op, refusal, /*by_design=*/!tensor_cores, /*is_float32=*/like.scalar_type() == at::kFloat);
    for (GemmOperands& g : gemms) at::mm_out(g.d, g.a, g.b);
    return;
  }
  const size_t bytes = moe_grouped_gemm_workspace_size(dtype, layout, groups, problems.data(), device, sms);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  const char* err =
      moe_grouped_gemm(dtype, layout, groups, problems.data(), workspace.data_ptr(), bytes, device, sms, stream);
  TORCH_CHECK(err == nullptr, op, ": grouped GEMM: ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tensor-core grouped GEMMs need 16-bit operands with 8-element (16-byte) aligned rows: empty
// when x and the widths qualify, else the reason.
std::string tensor_core_refusal(const at::Tensor& x, const MoeShapes& s) {
  if (x.scalar_type() == at::kFloat) return "dtype: float32 operands (the grouped GEMM takes bfloat16 / float16)";
  if (s.D == 0 || s.F == 0) return "widths: D = " + std::to_string(s.D) + ", F = " + std::to_string(s.F) + " (empty)";
  if (s.D % kGroupedGemmAlignment != 0 || s.F % kGroupedGemmAlignment != 0) {
    return "alignment: D = " + std::to_string(s.D) + " and F = " + std::to_string(s.F) + " must be multiples of " +
           std::to_string(kGroupedGemmAlignment);
  }
  return "";
}

void gather(const at::Tensor& src, const DeviceRouting& r, int64_t k, const float* scale, at::Tensor& dst,
            const char* op, cudaStream_t stream) {
  MoeGatherParams p;
  p.dtype = kernel_dtype(src, op);
  p.rows = dst.size(0);
  p.dim = src.size(1);
  p.k = static_cast<int>(k);
  p.slot_of_row = r.slot_of_row.data_ptr<int32_t>();
  p.src = src.data_ptr();
  p.scale = scale;
  p.dst = dst.data_ptr();
  C10_CUDA_CHECK(launch_moe_gather(p, stream));
}

void combine(const at::Tensor& rows, const DeviceRouting& r, int64_t T, int64_t k, const float* scale,
             at::Tensor& out, const char* op, cudaStream_t stream) {
  MoeCombineParams p;
  p.dtype = kernel_dtype(rows, op);
  p.tokens = T;
  p.dim = rows.size(1);
  p.k = static_cast<int>(k);
  p.row_of_slot = r.row_of_slot.data_ptr<int32_t>();
  p.rows = rows.data_ptr();
  p.scale = scale;
  p.out = out.data_ptr();
  C10_CUDA_CHECK(launch_moe_combine(p, stream));
}

MoeActivationParams activation_params(const at::Tensor& h, MoeActivation act, const MoeShapes& s, int64_t rows,
                                      const char* op) {
  MoeActivationParams p;
  p.dtype = kernel_dtype(h, op);
  p.act = act;
  p.rows = rows;
  p.width = s.F;
  p.h = h.data_ptr();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_ffn_cuda(const at::Tensor& x_in, const at::Tensor& weights_in,
                                                            const at::Tensor& indices_in, const at::Tensor& w1_in,
                                                            const at::Tensor& w2_in, c10::string_view activation) {
  const char* op = "moe_ffn";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeShapes s =
      check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op, true);
  const CudaOpGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), weights = weights_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const DeviceRouting r = route(indices, s.E, op, stream);
  const int64_t N = s.T * s.k, V = r.num_valid();
  const std::string tc = tensor_core_refusal(x, s);

  at::Tensor hidden = at::empty({N, s.F1}, x.options());
  at::Tensor expert_out = at::empty({N, s.D}, x.options());
  hidden.narrow(0, V, N - V).zero_();  // rows past V: dropped slots
  expert_out.narrow(0, V, N - V).zero_();
  at::Tensor xg = at::empty({V, s.D}, x.options());  // token rows grouped by expert
  at::Tensor a = at::empty({V, s.F}, x.options());   // activations
  gather(x, r, s.k, nullptr, xg, op, stream);
  expert_gemms(r, tc, GemmLayout::kRowRow, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{xg.narrow(0, row0, n), w1[e], hidden.narrow(0, row0, n)};
  });
  MoeActivationParams ap = activation_params(hidden, act, s, V, op);
  ap.a = a.data_ptr();
  C10_CUDA_CHECK(launch_moe_activation_forward(ap, stream));
  expert_gemms(r, tc, GemmLayout::kRowRow, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{a.narrow(0, row0, n), w2[e], expert_out.narrow(0, row0, n)};
  });
  at::Tensor y = at::empty({s.T, s.D}, x.options());
  combine(expert_out, r, s.T, s.k, weights.data_ptr<float>(), y, op, stream);
  return {y, hidden, expert_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_ffn_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weights_in, const at::Tensor& indices_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in, const at::Tensor& expert_out_in,
    c10::string_view activation) {
  const char* op = "moe_ffn_backward";
  const MoeActivation act = parse_moe_activation(std::string(activation), op);
  const MoeShapes s =
      check_moe_inputs(x_in, weights_in, indices_in, w1_in, w2_in, act == MoeActivation::kSwiglu, op, true);
  check_moe_backward_inputs(grad_y_in, x_in, hidden_in, expert_out_in, s, op);
  const CudaOpGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weights = weights_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous(), expert_out = expert_out_in.contiguous();
  const DeviceRouting r = route(indices, s.E, op, stream);
  const int64_t V = r.num_valid();
  const std::string tc = tensor_core_refusal(x, s);
  const float* w = weights.data_ptr<float>();

  // grad of the routing weights: <dy[t], expert_out[row(t, j)]>, 0 for a dropped slot.
  at::Tensor grad_weights = at::empty({s.T, s.k}, weights.options());
  MoeGradWeightsParams gp;
  gp.dtype = kernel_dtype(x, op);
  gp.num_slots = s.T * s.k;
  gp.dim = s.D;
  gp.k = static_cast<int>(s.k);
  gp.row_of_slot = r.row_of_slot.data_ptr<int32_t>();
  gp.grad_y = grad_y.data_ptr();
  gp.expert_out = expert_out.data_ptr();
  gp.grad_weights = grad_weights.data_ptr<float>();
  C10_CUDA_CHECK(launch_moe_grad_weights(gp, stream));

  // dyg = weight * dy per grouped row; da = dyg w2^T; (a, dh) from (hidden, da) in one pass.
  at::Tensor dyg = at::empty({V, s.D}, x.options());
  gather(grad_y, r, s.k, w, dyg, op, stream);
  at::Tensor da = at::empty({V, s.F}, x.options());
  expert_gemms(r, tc, GemmLayout::kRowCol, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{dyg.narrow(0, row0, n), w2[e].t(), da.narrow(0, row0, n)};
  });
  at::Tensor a = at::empty({V, s.F}, x.options());
  at::Tensor dh = at::empty({V, s.F1}, x.options());
  MoeActivationParams ap = activation_params(hidden, act, s, V, op);
  ap.da = da.data_ptr();
  ap.a = a.data_ptr();
  ap.dh = dh.data_ptr();
  C10_CUDA_CHECK(launch_moe_activation_backward(ap, stream));

  // Weight gradients (K = the expert's rows); experts without rows get zeros.
  at::Tensor grad_w2 = at::empty_like(w2);
  at::Tensor grad_w1 = at::empty_like(w1);
  expert_gemms(r, tc, GemmLayout::kColRow, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{a.narrow(0, row0, n).t(), dyg.narrow(0, row0, n), grad_w2[e]};
  });
  at::Tensor xg = at::empty({V, s.D}, x.options());
  gather(x, r, s.k, nullptr, xg, op, stream);
  expert_gemms(r, tc, GemmLayout::kColRow, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{xg.narrow(0, row0, n).t(), dh.narrow(0, row0, n), grad_w1[e]};
  });
  for (int64_t e = 0; e < s.E; ++e) {
    if (r.offsets[e + 1] == r.offsets[e]) {
      grad_w1[e].zero_();
      grad_w2[e].zero_();
    }
  }

  // dx per grouped row = dh w1^T (into dyg's buffer, dead after the grad_w2 GEMM, stream order),
  // then each token sums its k rows in float32.
  at::Tensor dxg = dyg;
  expert_gemms(r, tc, GemmLayout::kRowCol, x, stream, op, [&](int64_t e, int64_t row0, int64_t n) {
    return GemmOperands{dh.narrow(0, row0, n), w1[e].t(), dxg.narrow(0, row0, n)};
  });
  at::Tensor grad_x = at::empty({s.T, s.D}, x.options());
  combine(dxg, r, s.T, s.k, nullptr, grad_x, op, stream);
  return {grad_x, grad_weights, grad_w1, grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(moediffuseq, CUDA, m) {
  m.impl("moe_ffn", &moe_ffn_cuda);
  m.impl("moe_ffn_backward", &moe_ffn_backward_cuda);
}

}  // namespace moediffuseq::cuda
