// The CUDA kernels of the MoE ops (the table of moe/moe_backend.h): the torch-facing half of
// moe_routing.cu, moe_elementwise.cu and the CUTLASS grouped GEMMs (moe_grouped_gemm*.cu). Each
// function enqueues on the current stream of the op's device (the host entry holds the device
// guard) and checks the launch.
//
// Routing: a stable counting sort on the device, then ONE device-to-host copy of (first bad
// index, offsets[0..E]): the index check and the group sizes. Limits: E <= 1024 experts and
// T*k < 2^31 slots (int32 grouped rows).
//
// Grouped GEMMs: the CUTLASS sm_90a ptr-array kernels for bfloat16 / float16 when D and F are
// multiples of 8, the operands 16-byte aligned and the GPU is sm_90a; otherwise one ATen matmul
// per non-empty expert on views of the same buffers. The fallback is by design for float32
// (silent) and for widths that are not multiples of 8 (warned once); any other refusal of a
// problem that qualifies (16-byte alignment of an operand, a GPU that is not sm_90a, CUTLASS's
// can_implement) warns once naming why, and with MOEDIFFUSEQ_STRICT_CUTLASS=1 in the
// environment it is an error: the switch that tests and the GPU check set.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CachingHostAllocator.h>
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cuda/device_check.h"
#include "common/cuda/stream_launch.h"
#include "common/kernel_dtype.h"
#include "moe/cuda/moe_kernels.h"
#include "moe/moe_backend.h"

namespace moediffuseq::cuda {
namespace {

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

MoeGroups route(const at::Tensor& indices, int64_t E, const char* op) {
  const int64_t N = indices.numel();
  TORCH_CHECK(N < INT_MAX, op, ": the CUDA kernels take fewer than 2^31 routing slots (T*k), got ", N);
  TORCH_CHECK(E <= kMoeMaxExperts, op, ": the CUDA kernels take at most ", kMoeMaxExperts, " experts, got ", E);
  const auto i32 = indices.options().dtype(at::kInt);
  at::Tensor scratch = at::empty({moe_routing_scratch_ints(N, static_cast<int>(E))}, i32);
  at::Tensor meta = at::empty({E + 2}, indices.options());
  MoeGroups g;
  g.row_of_slot = at::empty({N}, i32);
  g.slot_of_row = at::empty({N}, i32);
  MoeRoutingParams p;
  p.num_slots = N;
  p.num_experts = static_cast<int>(E);
  p.indices = indices.data_ptr<int64_t>();
  p.scratch = scratch.data_ptr<int32_t>();
  p.meta = meta.data_ptr<int64_t>();
  p.row_of_slot = g.row_of_slot.data_ptr<int32_t>();
  p.slot_of_row = g.slot_of_row.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_moe_routing(p, current_stream()));
  const at::Tensor host = meta.to(at::kCPU);  // the one synchronising copy of the op
  const int64_t* m = host.data_ptr<int64_t>();
  if (m[0] >= 0) {
    const int64_t value = indices.reshape({-1})[m[0]].item<int64_t>();
    TORCH_CHECK(false, op, ": indices must lie in [0, ", E, ") (or -1 for a dropped slot), got ", value,
                " at flat position ", m[0]);
  }
  g.offsets.assign(m + 1, m + 2 + E);
  return g;
}

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

void grouped_gemm(std::vector<MoeGemm>& gemms, GemmLayout layout, const MoeShapes& s, const at::Tensor& like,
                  const char* op) {
  const std::string no_tensor_cores = tensor_core_refusal(like, s);
  const bool a_row = layout != GemmLayout::kColRow, b_row = layout != GemmLayout::kRowCol;
  const bool tensor_cores = no_tensor_cores.empty();
  bool aligned = true;
  std::vector<GroupedGemmProblem> problems;
  for (const MoeGemm& g : gemms) {
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
    for (MoeGemm& g : gemms) at::mm_out(g.d, g.a, g.b);
    return;
  }
  const size_t bytes = moe_grouped_gemm_workspace_size(dtype, layout, groups, problems.data(), device, sms);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  // The problem arrays go through pinned memory from torch's caching host allocator: the copy is
  // asynchronous (no host synchronisation per launch, five launches per MoE backward) and the
  // event recorded after it keeps the block from reuse until the copy has run.
  at::HostAllocator* host_allocator = at::getHostAllocator(at::kCUDA);
  c10::DataPtr staging = host_allocator->allocate(bytes);
  const cudaStream_t stream = current_stream();
  const char* err = moe_grouped_gemm(dtype, layout, groups, problems.data(), workspace.data_ptr(), bytes,
                                     staging.get(), bytes, device, sms, stream);
  host_allocator->record_event(staging.get(), staging.get_context(), at::cuda::getCurrentCUDAStream().unwrap());
  TORCH_CHECK(err == nullptr, op, ": grouped GEMM: ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fields every row-moving kernel shares, for rows of `t`'s dtype and width.
template <typename Params>
Params rows_params(const at::Tensor& t, int64_t k, const char* op) {
  Params p;
  p.dtype = kernel_dtype(t, op);
  p.dim = t.size(1);
  p.k = static_cast<int>(k);
  return p;
}

void gather(const at::Tensor& src, const MoeGroups& g, int64_t k, const float* scale, int64_t row0, at::Tensor& dst,
            const char* op) {
  auto p = rows_params<MoeGatherParams>(src, k, op);
  p.rows = dst.size(0);
  p.src = src.data_ptr();
  p.slot_of_row = g.slot_of_row.data_ptr<int32_t>() + row0;
  p.dst = dst.data_ptr();
  p.scale = scale;
  C10_CUDA_CHECK(launch_moe_gather(p, current_stream()));
}

void combine(const at::Tensor& rows, const MoeGroups& g, int64_t k, const float* scale, at::Tensor& out,
             const char* op) {
  auto p = rows_params<MoeCombineParams>(rows, k, op);
  p.tokens = out.size(0);
  p.row_of_slot = g.row_of_slot.data_ptr<int32_t>();
  p.scale = scale;
  p.rows = rows.data_ptr();
  p.out = out.data_ptr();
  C10_CUDA_CHECK(launch_moe_combine(p, current_stream()));
}

void grad_weights(const at::Tensor& grad_y, const at::Tensor& expert_out, const MoeGroups& g, int64_t k,
                  at::Tensor& out, const char* op) {
  auto p = rows_params<MoeGradWeightsParams>(grad_y, k, op);
  p.num_slots = out.numel();
  p.grad_y = grad_y.data_ptr();
  p.expert_out = expert_out.data_ptr();
  p.row_of_slot = g.row_of_slot.data_ptr<int32_t>();
  p.grad_weights = out.data_ptr<float>();
  C10_CUDA_CHECK(launch_moe_grad_weights(p, current_stream()));
}

// h (V, F1) -> a (V, F); backward: da (V, F) -> a and dh (V, F1).
MoeActivationParams activation_params(const at::Tensor& h, MoeActivation act, at::Tensor& a, const char* op) {
  MoeActivationParams p;
  p.dtype = kernel_dtype(h, op);
  p.act = act;
  p.rows = a.size(0);
  p.width = a.size(1);
  p.h = h.data_ptr();
  p.a = a.data_ptr();
  return p;
}

void activation_forward(const at::Tensor& h, MoeActivation act, at::Tensor& a, const char* op) {
  C10_CUDA_CHECK(launch_moe_activation_forward(activation_params(h, act, a, op), current_stream()));
}

void activation_backward(const at::Tensor& h, const at::Tensor& da, MoeActivation act, at::Tensor& a,
                         at::Tensor& dh, const char* op) {
  MoeActivationParams p = activation_params(h, act, a, op);
  p.da = da.data_ptr();
  p.dh = dh.data_ptr();
  C10_CUDA_CHECK(launch_moe_activation_backward(p, current_stream()));
}

const MoeKernels kKernels{/*allow_half=*/true, /*pass_rows=*/0,
                          &launch_on_current_stream<MoeTopkSoftmaxParams, launch_moe_topk_softmax>,
                          &route, &gather, &grouped_gemm, &activation_forward, &activation_backward, &combine,
                          &grad_weights};
const KernelsRegistration<MoeKernels> kRegistration(c10::DeviceType::CUDA, kKernels);

}  // namespace
}  // namespace moediffuseq::cuda
